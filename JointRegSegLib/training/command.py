"""``jointregseg train``: its options and what it runs (registered by `JointRegSegLib.cli`).

- ``jointregseg train NETWORK [--minutes M | --iterations N] [--device D] [--option KEY=VALUE ...]``
  trains one network (tto needs ``--stage teacher|student``), resuming from its checkpoint;
- ``jointregseg train all --minutes M [--round-minutes R] [--device cpu|cuda] [--output DIR]
  [--archive FILE.tar]`` trains every network in sequence (`training.all`);
- ``jointregseg train pack`` builds the data bank every network draws from (`training.bank`; copy
  ``.training/bank`` to train where ../shared/data is absent, e.g. on a GPU machine);
- ``jointregseg train throughput`` measures data generation against the network step (`training.throughput`);
- ``jointregseg train adopt DIR`` takes the weights of another run's output folder where they validate
  better than the shipped ones (`training.all.adopt`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..methods.options import parse_options
from . import NETWORKS

ACTIONS = ("all", "pack", "throughput", "adopt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's options."""
    parser.add_argument("network", help=f"one of: {', '.join([*NETWORKS, *ACTIONS])}")
    parser.add_argument("folder", nargs="?", type=Path, help="adopt: the output folder of another run")
    parser.add_argument("--stage", help="tto: teacher or student")
    parser.add_argument("--minutes", type=float, help="minutes of training (this call)")
    parser.add_argument("--iterations", type=int, help="total iterations of the network (resumable)")
    parser.add_argument("--round-minutes", type=float, help="all: length of one round through every network (default: --minutes)")
    parser.add_argument("--only", action="append", help="all / throughput: only the networks whose name starts with this (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--output", help="folder for weights, manifest and curves (default Resources/weights)")
    parser.add_argument("--archive", type=Path, help="all: also pack the output folder's files into this tar")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes making the batches (CPU)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="training setting (JSON value), repeatable")


def run(args: argparse.Namespace) -> None:
    """Run the ``train`` invocation ``args`` describes; print its summary as JSON."""
    from ..errors import InputError

    options = parse_options(args.option)
    if args.network == "pack":
        print(json.dumps(pack(), indent=2))
        return
    if args.network == "throughput":
        from .throughput import run as measure, table

        print(table(measure(iterations=args.iterations or 5, workers=args.workers, only=args.only)))
        return
    if args.network == "adopt":
        from .all import adopt

        if args.folder is None:
            raise InputError("train adopt needs the output folder of another run: jointregseg train adopt DIR")
        print(json.dumps({"adopted": adopt(args.folder)}, indent=2))
        return
    if args.network == "all":
        from .all import archive, failures, train_all

        if args.minutes is None:
            raise InputError("train all needs --minutes (the time for every network together)")
        summaries = train_all(
            args.minutes, args.device, args.round_minutes, args.output, args.threads, args.seed, args.only,
            {**options, "workers": args.workers},
        )
        if args.archive is not None:
            from ..weights import weights_dir

            archive(Path(args.output) if args.output else weights_dir(), args.archive)
        print(json.dumps(summaries, indent=2, default=str))
        failed = failures(summaries)
        if failed:
            raise InputError("training failed for " + "; ".join(failed) + " (the traceback is in the log above); "
                             "the other networks' weights were written")
        return
    from . import train

    if args.minutes is None and args.iterations is None:
        raise InputError(f"train {args.network} needs --minutes or --iterations")
    config = {
        **options, "stage": args.stage, "iterations": args.iterations, "seed": args.seed, "device": args.device,
        "threads": args.threads, "output": args.output, "workers": args.workers,
        "time_limit": None if args.minutes is None else 60.0 * args.minutes,
    }
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=f"train {args.network}", file=sys.stderr)

    def progress(fraction: float, stage: str) -> None:
        bar.n = int(round(1000 * fraction))
        bar.set_postfix_str(stage, refresh=False)
        bar.refresh()

    summary = train(args.network, {k: v for k, v in config.items() if v is not None}, progress)
    bar.close()
    print(json.dumps(summary, indent=2, default=str))


def pack() -> dict[str, object]:
    """Build every bank entry the networks of `all.SCHEDULE` read (from ../shared/data) and say where they are."""
    from . import make_trainer
    from .all import SCHEDULE, label
    from .bank import bank_dir, size_mb

    built = []
    for name, settings, _ in SCHEDULE:
        if settings.get("stage") == "student":
            continue  # the student reads the teacher's bank entries and needs teacher weights
        make_trainer(name, {**settings, "iterations": 0, "threads": 1})
        built.append(label(name, settings))
    return {"bank": str(bank_dir()), "megabytes": round(size_mb(), 1), "networks": built}
