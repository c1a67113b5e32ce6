"""``jointregseg``: register, demo, train and make the sample data from the command line.

``register`` runs the same job code as the background worker (JointRegSegLib.worker), in this
process, with a tqdm progress bar instead of the JSON event stream.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from .errors import InputError, WeightsError
from .methods import method_names
from .worker.events import EventWriter
from .worker.job import Job

DEMO_OUT = Path("jointregseg_demo")


class ProgressBar(EventWriter):
    """Worker events shown as a tqdm bar (progress) and plain lines (logs) on stderr."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.bar = tqdm(total=1000, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{postfix}", file=sys.stderr)

    def emit(self, event: str, **fields: Any) -> None:
        if event == "progress":
            self.bar.n = int(round(1000 * fields["fraction"]))
            self.bar.set_description(fields["stage"][:28].ljust(28))
            left = fields["seconds_left"]
            self.bar.set_postfix_str("?" if left is None else f"{left:.0f} s left", refresh=True)
        elif event == "log":
            self.bar.write(f"[{fields['level']}] {fields['message']}")
        elif event == "result":
            self.bar.close()

    def close(self) -> None:
        self.bar.close()


def _register_args(parser: argparse.ArgumentParser, with_inputs: bool = True) -> None:
    if with_inputs:
        parser.add_argument(
            "--fixed", type=Path,
            help="fixed (reference) image: NIfTI, NRRD, MHA or MGZ; required, except for methods that need an atlas "
            "(jers), where it defaults to the shipped atlas (Resources/Atlas) and its labels",
        )
        parser.add_argument("--moving", type=Path, required=True, help="moving image, warped onto the fixed image")
        parser.add_argument("--fixed-seg", type=Path, help="label map of the fixed image (for Dice/HD95 or methods that need it)")
        parser.add_argument("--moving-seg", type=Path, help="label map of the moving image")
        parser.add_argument("--out", type=Path, required=True, help="output folder (written whole at the end)")
    parser.add_argument("--method", default="tto", help=f"one of: {', '.join(method_names())} (default tto)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--iterations", type=int, help="iteration cap for optimisation (tto: test-time optimisation steps)")
    parser.add_argument(
        "--time-budget", type=float,
        help="seconds allowed for optimisation (tto: test-time optimisation and refinement); default none: "
        "the result then does not depend on how busy the machine is",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same result on CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice, usually the core count)")
    parser.add_argument("--variant", choices=("iterative", "learned"), help="segreg: optimise per region (iterative) or the trained network (learned)")
    parser.add_argument("--mask-loss", choices=("dice", "edt", "edt-dice"), help="segreg: the mask term of its loss (seed 001 eq. 4-5)")
    parser.add_argument("--regions", help="segreg: all, coarse, or a number of region groups")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option (JSON value), repeatable")
    parser.add_argument("--no-pictures", action="store_true", help="do not write PNG pictures")


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict, VALUE parsed as JSON where it is JSON (else kept as text)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--option '{pair}' is not KEY=VALUE.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def method_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Method options given as dedicated flags (segreg's --variant, --mask-loss, --regions)."""
    flags = {"variant": args.variant, "mask_loss": args.mask_loss, "regions": args.regions}
    return {key: value for key, value in flags.items() if value is not None}


def job_from_args(args: argparse.Namespace, inputs: dict[str, Path], out: Path) -> Job:
    """The worker job an invocation describes."""
    return Job(
        method=args.method,
        output=out,
        device=args.device,
        seed=args.seed,
        iterations=args.iterations,
        time_budget=args.time_budget,
        options={**method_flags(args), **parse_options(args.option)},
        pictures=not args.no_pictures,
        threads=args.threads,
        **inputs,
    )


def run_with_progress(job: Job) -> dict[str, Any]:
    """Run a job in this process with a progress bar."""
    from .worker.run import run_job

    bar = ProgressBar()
    try:
        return run_job(job, bar)
    finally:
        bar.close()


def print_summary(summary: dict[str, Any]) -> None:
    """The headline numbers of a finished run."""
    m = summary["metrics"]
    lines = [f"results in {summary['output']}"]
    if "dice_mean" in m:
        lines.append(f"  mean Dice ({m['dice_label_count']} labels): {m['dice_mean_initial']:.3f} before -> {m['dice_mean']:.3f} after")
    lines.append(f"  NCC {m['ncc_initial']:.3f} -> {m['ncc']:.3f}   PMM mean {m['pmm_mean_initial']:.3f} -> {m['pmm_mean']:.3f}")
    lines.append(f"  folding {m['folding_percent']:.3f} % of voxels   SDlogJ {m['sdlogj']:.3f}   time {m['time_register_s']:.1f} s")
    print("\n".join(lines))


def cmd_register(args: argparse.Namespace) -> None:
    inputs = {"fixed": args.fixed, "moving": args.moving, "fixed_seg": args.fixed_seg, "moving_seg": args.moving_seg}
    print_summary(run_with_progress(job_from_args(args, inputs, args.out)))


def cmd_demo(args: argparse.Namespace) -> None:
    from .sample_data import sample_pair

    pair = sample_pair()
    summary = run_with_progress(job_from_args(args, pair, args.out))
    print_summary(summary)
    _demo_figure(summary, pair)


def _demo_figure(summary: dict[str, Any], pair: dict[str, Path]) -> None:
    """One overview PNG of the demo (fixed, moving, warped, checkerboard, Jacobian, PMM, contours)."""
    from .imageio.io import read_image, read_labels
    from .imageio.network_grid import resample
    from .report import save_registration_figure

    files = summary["files"]
    fixed = read_image(pair["fixed"])
    moving = resample(read_image(pair["moving"]), fixed.geometry)
    path = Path(summary["output"]) / "pictures" / "overview.png"
    save_registration_figure(
        fixed, moving, read_image(files["warped"]), path,
        jacobian=read_image(files["jacobian"]) if "jacobian" in files else None,
        pmm=read_image(files["pmm"]) if "pmm" in files else None,
        fixed_seg=read_labels(pair["fixed_seg"]),
        warped_seg=read_labels(files["warped_seg"]) if "warped_seg" in files else None,
        title=f"JointRegSeg demo: {summary['metrics'].get('dice_mean', float('nan')):.3f} mean Dice",
    )
    print(f"  pictures in {path.parent}")


def cmd_train(args: argparse.Namespace) -> None:
    from .training.command import run

    run(args)


def cmd_sample_data(args: argparse.Namespace) -> None:
    from .sample_data import build_sample_pair

    for key, path in build_sample_pair(args.data).items():
        print(f"{key}: {path}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench.command import run

    run(args)


def cmd_web(args: argparse.Namespace) -> None:
    try:
        from .web.server import serve
    except ImportError as error:
        raise InputError(f"the web page needs the [web] extra ({error.name} is missing): pip install -e \".[web]\"") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host} lets every machine that reaches it use the page and read its files.", file=sys.stderr)
    serve(args.data, args.host, args.port)


def cmd_batch(args: argparse.Namespace) -> None:
    from .batch.command import run

    code = run(args)
    if code:
        raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jointregseg", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    register = sub.add_parser("register", help="register a moving image onto a fixed image")
    _register_args(register)
    register.set_defaults(func=cmd_register)
    demo = sub.add_parser("demo", help="register the bundled sample pair and write pictures")
    _register_args(demo, with_inputs=False)
    demo.add_argument("--out", type=Path, default=DEMO_OUT, help=f"output folder (default {DEMO_OUT})")
    demo.set_defaults(func=cmd_demo)
    from .training.command import add_arguments as train_arguments

    train = sub.add_parser("train", help="train the networks (weights go to Resources/weights): one, or all in sequence")
    train_arguments(train)
    train.set_defaults(func=cmd_train)
    sample = sub.add_parser("sample-data", help="rebuild Resources/SampleData from the shared data folder")
    sample.add_argument("--data", type=Path, default=Path("../shared/data"))
    sample.set_defaults(func=cmd_sample_data)
    from .bench.command import add_arguments as bench_arguments

    bench = sub.add_parser("bench", help="benchmark our methods and peer tools (ANTsPy, elastix, SimpleITK) on the same pairs")
    bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    from .batch.command import add_arguments as batch_arguments

    batch = sub.add_parser("batch", help="register a cohort (a pair list or a folder of images) on Dask, resumably, with one summary")
    batch_arguments(batch)
    batch.set_defaults(func=cmd_batch)
    web = sub.add_parser("web", help="the browser page on 3D Slicer's views (teaching, review; needs the [web] extra)")
    web.add_argument("--data", type=Path, help="folder of images the page may offer (besides the bundled sample pair and uploads)")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    web.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    web.set_defaults(func=cmd_web)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (InputError, WeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled; no output was written.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
