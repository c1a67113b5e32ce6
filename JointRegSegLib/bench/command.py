"""``jointregseg bench``: its options and what it runs (registered by `JointRegSegLib.cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..methods.options import parse_options
from .peers import PEERS, PRESETS

DEFAULT_PEERS = ",".join(PEERS)


def split_names(text: str) -> list[str]:
    """Comma-separated names; commas inside brackets (a method's options) do not separate."""
    names, depth, current = [], 0, ""
    for char in text + ",":
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth <= 0:
            names.append(current.strip())
            current = ""
        else:
            current += char
    return [name for name in names if name]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    parser.add_argument("--pairs", default="shared", help="shared (../shared/data/pair), sample (bundled, 2 mm), synthetic (known fields), contrast (known fields, FLAIR-like moving images), or a pair-list CSV")
    parser.add_argument(
        "--methods",
        default="tto",
        help="our methods, comma-separated, each with its own options in brackets if needed, e.g. "
        "'tto,segreg,segreg[variant=learned;mask_loss=edt]' ('' for none; default tto)",
    )
    parser.add_argument("--peers", default=DEFAULT_PEERS, help=f"peer tools, comma-separated ('' for none; default {DEFAULT_PEERS})")
    parser.add_argument("--out", type=Path, required=True, help="output folder (tables, figures, every run's outputs)")
    parser.add_argument("--device", default="cpu", help="device of our methods: cpu, cuda, cuda:N or auto (peers run on the CPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for every tool (default: all cores)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and pair; the time is their median")
    parser.add_argument("--peer-settings", choices=PRESETS, default="default", help="default: each tool's defaults; fast: few iterations (tests)")
    parser.add_argument(
        "--peer-python",
        default=os.environ.get("JRS_PEER_PYTHON", sys.executable),
        help="the Python that runs the peers (default $JRS_PEER_PYTHON, else this one); antspyx needs numpy < 2.4, so it may live in its own environment",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every tool (and of the synthetic set)")
    parser.add_argument("--iterations", type=int, help="iteration cap passed to our methods")
    parser.add_argument("--time-budget", type=float, help="seconds of optimisation allowed to our methods")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="option of our methods (JSON value), repeatable")
    parser.add_argument("--synthetic-count", type=int, default=3, help="pairs in the synthetic set")
    parser.add_argument("--synthetic-spacing", type=float, help="resample the synthetic set's brain to this spacing (mm) first")
    parser.add_argument("--timeout", type=float, help="seconds after which a tool's run is stopped and reported as failed")
    parser.add_argument("--own-warped", action="store_true", help="also keep each peer's own warped image (own_warped.nii.gz)")


def run(args: argparse.Namespace) -> Path:
    """Run the benchmark an invocation describes; print the Markdown table; return the output folder."""
    from .pairs import SyntheticOptions, resolve_pairs
    from .runner import BenchSettings, run_benchmark

    settings = BenchSettings(
        methods=split_names(args.methods),
        peers=split_names(args.peers),
        device=args.device,
        threads=args.threads,
        repeats=args.repeats,
        preset=args.peer_settings,
        peer_python=args.peer_python,
        seed=args.seed,
        iterations=args.iterations,
        time_budget=args.time_budget,
        options=parse_options(args.option),
        own_warped=args.own_warped,
        timeout_s=args.timeout,
    )
    settings.check()
    synthetic = SyntheticOptions(count=args.synthetic_count, seed=args.seed, spacing=args.synthetic_spacing)
    out = args.out.resolve()
    pairs = resolve_pairs(args.pairs, out, synthetic)
    run_benchmark(pairs, settings, out)
    print((out / "results.md").read_text())
    print(f"tables, figures and every run's outputs in {out}")
    return out
