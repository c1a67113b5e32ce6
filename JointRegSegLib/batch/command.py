"""``jointregseg batch``: its options and what it runs (registered by `JointRegSegLib.cli`).

Exit codes: 0 every pair and method has a result, 1 some failed (see failures.csv), 2 a problem
with the command's own inputs, 130 stopped by Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import DEFAULT_SEG_SUFFIX

EXIT_SOME_FAILED = 1
EXIT_CANCELLED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``batch`` subcommand's options."""
    parser.add_argument(
        "pairs", type=Path,
        help="a pair-list CSV (the benchmark's format: id (or name), fixed, moving, fixed_seg, moving_seg, ...; paths "
        "relative to the CSV) or a folder of images, each registered to --fixed (default: the shipped atlas)",
    )
    parser.add_argument("--methods", default="tto", help="methods, comma-separated, each with its own options in brackets, e.g. 'tto,segreg[variant=learned]' (default tto)")
    parser.add_argument("--out", type=Path, required=True, help="batch folder: DIR/<id>/<method>/ per result, summary.csv, failures.csv, figures/")
    parser.add_argument("--fixed", type=Path, help="folder form: the fixed image of every pair (default: the shipped atlas)")
    parser.add_argument("--fixed-seg", type=Path, help="folder form: the label map of --fixed")
    parser.add_argument("--seg-suffix", default=DEFAULT_SEG_SUFFIX, help=f"folder form: NAME{DEFAULT_SEG_SUFFIX}.nii.gz is the label map of NAME.nii.gz (default {DEFAULT_SEG_SUFFIX})")
    parser.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://HOST:PORT); default: a local cluster on this machine")
    parser.add_argument("--workers", type=int, help="local cluster: Dask worker processes (default: half the cores, at most one per 4 GB; with --device cuda one per GPU)")
    parser.add_argument("--threads-per-worker", type=int, help="local cluster: tasks each worker runs at once (default 1)")
    parser.add_argument("--threads", type=int, help="CPU threads of each registration (default: local cluster: the cores shared among the tasks running at once; scheduler: the workers' OMP_NUM_THREADS, else torch's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu, or cuda: one task per GPU at a time (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of every registration")
    parser.add_argument("--iterations", type=int, help="iteration cap passed to the methods")
    parser.add_argument("--time-budget", type=float, help="seconds of optimisation allowed to each registration")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="option of every method (JSON value), repeatable")
    parser.add_argument("--no-pictures", action="store_true", help="do not write each result's PNG pictures")
    parser.add_argument("--timeout", type=float, help="seconds after which a registration is stopped and reported as failed")
    parser.add_argument("--retry-failed", action="store_true", help="run pairs that failed before with the same inputs and options again")


def run(args: argparse.Namespace) -> int:
    """Run the batch an invocation describes; print where the summary is; return the exit code."""
    from ..bench.command import split_names
    from ..methods.options import parse_options
    from .cluster import ClusterOptions
    from .pairlist import cohort_pairs
    from .runner import BatchSettings, run_batch

    settings = BatchSettings(
        methods=split_names(args.methods),
        device=args.device,
        seed=args.seed,
        iterations=args.iterations,
        time_budget=args.time_budget,
        options=parse_options(args.option),
        pictures=not args.no_pictures,
        threads=args.threads,
        timeout_s=args.timeout,
        retry_failed=args.retry_failed,
    )
    settings.check()
    for name in ("workers", "threads_per_worker"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1.")
    pairs = cohort_pairs(args.pairs, args.fixed, args.fixed_seg, args.seg_suffix)
    cluster = ClusterOptions(args.scheduler, args.workers, args.threads_per_worker, args.device)
    with _sigterm_as_ctrl_c():
        report = run_batch(pairs, settings, args.out, cluster)
    if report.cancelled:
        print("stopped: finished results are kept, nothing partial was left; run the same command again to continue.")
        return EXIT_CANCELLED
    if report.failed:
        print(f"{report.failed} of {len(report.rows)} task(s) failed: see {args.out / 'failures.csv'}")
        return EXIT_SOME_FAILED
    print(f"all {len(report.rows)} task(s) have results: see {args.out / 'summary.csv'}")
    return 0



class _sigterm_as_ctrl_c:
    """While the batch runs, SIGTERM (``kill``, a job scheduler's pre-emption) stops it as Ctrl-C does."""

    def __enter__(self) -> None:
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._interrupt)

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    @staticmethod
    def _interrupt(*_: Any) -> None:
        raise KeyboardInterrupt
