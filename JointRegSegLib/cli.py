"""``jointregseg``: register, demo, train and make the sample data from the command line.

``register`` runs the same job code as the background worker (JointRegSegLib.worker), in this
process, with a tqdm progress bar instead of the JSON event stream.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()
"""When this process reached the command line (the printed wall time starts here)."""

import argparse  # noqa: E402 (after STARTED, so the wall time counts these imports)
import math
import signal
import sys
import traceback
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from .errors import InputError
from .timing import process_age
from .methods import method_names
from .methods.options import FLOAT, SETTINGS, describe, parse_options, specs
from .worker.beside import ForkedChild
from .worker.events import EventWriter
from .worker.failures import describe_failure
from .worker.job import COMMAND_LINE, JACOBIAN_PARTS, Job, job_from_dict
from .worker.pictures import warm_up

if TYPE_CHECKING:
    from tqdm import tqdm

DEMO_OUT = Path("jointregseg_demo")


PLAIN_EVERY_S = 10.0
"""Where stderr is no terminal, a stage's progress is written as a plain line at most this often (`ProgressBar`)."""


class ProgressBar(EventWriter):
    """Worker events shown as a tqdm bar (progress) and plain lines (logs) on stderr.

    The bar reads ``stage:  42%|####      | 00:31 elapsed, about 48 s left``: the whole stage name, the time
    spent and the estimate. It is drawn only once the first progress event arrives, so a run refused at
    once prints its error line alone; on an error it is cleared rather than left half drawn.

    Where stderr is no terminal (``interactive`` false: a log file, a pipe, a job scheduler's output) a bar
    redrawn at every event would fill the file with carriage returns (thousands in one tto run); there each
    stage gets a plain line when it begins, another every `PLAIN_EVERY_S` seconds while it lasts, and the run
    one at its end: ``affine:  12%, 00:03 elapsed, about 21 s left``.
    """

    def __init__(self, interactive: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(sys.stderr, clock)
        self.bar: tqdm | None = None
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._plain: tuple[str, float] | None = None  # the stage and the time of the last plain line

    def emit(self, event: str, **fields: Any) -> None:
        from tqdm import tqdm  # here: `jointregseg --help` starts without it

        if event == "progress":
            if self.interactive:
                self._draw(fields)
            else:
                self._write_plain(fields)
        elif event == "log":
            with tqdm.external_write_mode(file=self.stream) if self.bar is not None else nullcontext():
                self.stream.write(f"[{fields['level']}] {fields['message']}\n")
        elif event == "result":
            self.close()

    def _draw(self, fields: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=1000, desc=fields["stage"], bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed{postfix}", file=sys.stderr)
        self.bar.n = int(round(1000 * fields["fraction"]))
        self.bar.set_description(fields["stage"], refresh=False)
        self.bar.set_postfix_str(_time_left(fields), refresh=True)

    def _write_plain(self, fields: dict[str, Any]) -> None:
        from tqdm import tqdm

        now, done = self.clock(), fields["fraction"] >= 1.0
        if not done and self._plain is not None and self._plain[0] == fields["stage"] and now - self._plain[1] < PLAIN_EVERY_S:
            return
        self._plain = (fields["stage"], now)
        left = _time_left(fields)
        self.stream.write(
            f"{fields['stage']}: {100 * fields['fraction']:3.0f}%, {tqdm.format_interval(fields['elapsed'])} elapsed{left and ', ' + left}\n"
        )
        self.stream.flush()

    def close(self, failed: bool = False) -> None:
        """End the bar: kept on screen after a finished run, cleared after a failure."""
        if self.bar is not None:
            self.bar.leave = not failed
            self.bar.close()
            self.bar = None


def _time_left(fields: dict[str, Any]) -> str:
    """The estimate of a progress event in words: empty once the run is done."""
    if fields["fraction"] >= 1.0:
        return ""
    left = fields["seconds_left"]
    return "time left not known yet" if left is None else f"about {left:.0f} s left"


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
        parser.add_argument(
            "--out", type=Path, required=True,
            help="output folder: created whole at the end; an earlier JointRegSeg output there is updated; a folder "
            "holding other files is refused (see --overwrite)",
        )
    parser.add_argument("--method", default="tto", choices=method_names(), help="the method (default tto); its options are listed below")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    for name, spec in SETTINGS.items():
        kind = float if spec.type == FLOAT else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=spec.default, help=f"{spec.help}; {spec.accepted()}")
    segreg = {spec.name: spec for spec in specs("segreg")}
    parser.add_argument("--variant", choices=segreg["variant"].choices, help="segreg: " + segreg["variant"].help)
    parser.add_argument("--mask-loss", choices=segreg["mask_loss"].choices, help="segreg: " + segreg["mask_loss"].help)
    parser.add_argument("--regions", help="segreg: all, coarse, or a number of region groups")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option (JSON value), repeatable; see below")
    parser.add_argument("--no-pictures", action="store_true", help="do not write PNG pictures")
    parser.add_argument(
        "--jacobian", choices=JACOBIAN_PARTS, default=JACOBIAN_PARTS[0],
        help="what the det J map shows: the deformable part (the whole mapping's divided by its affine part's, so a global "
        "scaling does not tint it; default) or the whole mapping. Folding and SDlogJ are always of the whole mapping",
    )
    parser.add_argument(
        "--no-compress", action="store_true",
        help="write uncompressed NIfTI (.nii instead of .nii.gz): faster to write and load, several times larger",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="write into an output folder that holds other files too: only JointRegSeg's own files there are replaced",
    )


def options_epilog() -> str:
    """Every method's options with default, meaning and accepted values (from `methods.options`)."""
    blocks = [f"{method} options (--option KEY=VALUE):\n" + "\n".join(describe(method)) for method in method_names()]
    return "\n\n".join(blocks)


def method_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Method options given as dedicated flags (segreg's --variant, --mask-loss, --regions)."""
    flags = {"variant": args.variant, "mask_loss": args.mask_loss, "regions": args.regions}
    return {key: value for key, value in flags.items() if value is not None}


def job_from_args(args: argparse.Namespace, inputs: dict[str, Path | None], out: Path) -> Job:
    """The worker job an invocation describes, checked like a job file."""
    return job_from_dict(
        {
            "method": args.method,
            "output": out,
            "device": args.device,
            "seed": args.seed,
            "iterations": args.iterations,
            "time_budget": args.time_budget,
            "options": {**method_flags(args), **parse_options(args.option)},
            "pictures": not args.no_pictures,
            "jacobian": args.jacobian,
            "compress": not args.no_compress,
            "threads": args.threads,
            "overwrite": args.overwrite,
            **inputs,
        },
        source=COMMAND_LINE,
    )


def run_with_progress(job: Job, extra_outputs: Any = None) -> dict[str, Any]:
    """Run a job in this process with a progress bar. The process that draws the pictures is forked first, while
    this one is small and imports torch on one core: it imports matplotlib on the other (`worker.beside`)."""
    painter = ForkedChild(warm_up) if job.pictures else None
    try:
        from .worker.run import run_job

        bar = ProgressBar()
        try:
            summary = run_job(job, bar, extra_outputs, painter=painter)
        except BaseException:
            bar.close(failed=True)
            raise
    finally:
        if painter is not None:
            painter.close()
    bar.close()
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    """The headline numbers of a finished run, and any step that failed."""
    m = summary["metrics"]
    lines = [f"results in {summary['output']}"]
    if "dice_mean" in m:
        lines.append(f"  mean Dice ({m['dice_label_count']} labels): {_number(m['dice_mean_initial'])} before -> {_number(m['dice_mean'])} after")
    if "ncc" in m:
        lines.append(
            f"  NCC {_number(m['ncc_initial'])} -> {_number(m['ncc'])}   PMM mean {_number(m['pmm_mean_initial'])} -> {_number(m['pmm_mean'])}"
        )
        lines.append(f"  folding {m['folding_percent']:.3f} % of voxels   SDlogJ {m['sdlogj']:.3f}")
    own = [f"{side} {_number(m[f'seg_dice_{side}'])}" for side in ("fixed", "moving") if f"seg_dice_{side}" in m]
    if own:
        lines.append(f"  the method's own segmentation, mean Dice against the given label maps: {', '.join(own)}")
    lines.append(wall_time_line(summary.get("timings", {})))
    for step, reason in summary.get("failed_steps", {}).items():
        lines.append(f"  warning: the {step} step failed ({reason}); the transform and the warped image were written")
    print("\n".join(lines))


def wall_time_line(timings: dict[str, float]) -> str:
    """``wall time 41.2 s: start-up 3.1, reading 0.4, registration 9.3, evaluation 20.1, writing 8.3 s``.

    The wall time runs from this process's start (the kernel's record of it where there is one, else
    `STARTED`); start-up is what the worker's own timings do not cover (Python, imports, the command line).
    """
    wall = process_age() or time.monotonic() - STARTED
    parts = {"reading": timings.get("load_s"), "registration": timings.get("register_s"),
             "evaluation": timings.get("evaluate_s"), "writing": timings.get("write_s")}
    known = {k: v for k, v in parts.items() if v is not None}
    startup = max(0.0, wall - sum(known.values()))
    return f"  wall time {wall:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in {"start-up": startup, **known}.items()) + " s"


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "undefined"


def cmd_register(args: argparse.Namespace) -> None:
    inputs = {"fixed": args.fixed, "moving": args.moving, "fixed_seg": args.fixed_seg, "moving_seg": args.moving_seg}
    print_summary(run_with_progress(job_from_args(args, inputs, args.out)))


def cmd_demo(args: argparse.Namespace) -> None:
    from .sample_data import sample_pair

    overview = ForkedChild(warm_up)  # a child of its own draws the overview, warmed up during the start-up as well
    try:
        summary = run_with_progress(job_from_args(args, sample_pair(), args.out), partial(_demo_figure, overview))
    finally:
        overview.close()
    print_summary(summary)
    if "picture_overview" in summary["files"]:
        print(f"  pictures in {Path(summary['files']['picture_overview']).parent}")


def _demo_figure(
    overview: ForkedChild, folder: Path, inputs: Any, result: Any, maps: Any, metrics: dict[str, Any]
) -> dict[str, str]:
    """One overview PNG of the demo (fixed, moving, warped, checkerboard, Jacobian, PMM, contours), in the run's
    output, drawn by ``overview`` (so this process never imports matplotlib)."""
    from .imageio.network_grid import resample
    from .report import registration_picture
    from .report.figures import draw_picture

    picture = registration_picture(
        inputs.fixed, resample(inputs.moving, inputs.fixed.geometry), result.warped,
        jacobian=maps.jacobian if maps is not None else None,
        pmm=maps.pmm if maps is not None else None,
        fixed_seg=inputs.fixed_seg,
        warped_seg=result.warped_seg,
        title=f"JointRegSeg demo: {metrics.get('dice_mean', float('nan')):.3f} mean Dice",
    )
    overview.submit(draw_picture, picture, folder / "pictures" / "overview.png")
    overview.result()
    return {"picture_overview": "pictures/overview.png"}


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


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jointregseg", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the full Python traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    register = sub.add_parser("register", help="register a moving image onto a fixed image", epilog=options_epilog(), formatter_class=raw)
    _register_args(register)
    register.set_defaults(func=cmd_register)
    demo = sub.add_parser("demo", help="register the bundled sample pair and write pictures", epilog=options_epilog(), formatter_class=raw)
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


class Terminated(BaseException):
    """SIGTERM arrived (``kill``, a job scheduler's stop): it unwinds the run like Ctrl-C does."""


def _terminate(_signal: int, _frame: Any) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure ends in one ``error:`` line (a traceback only with --debug).

    Ctrl-C and SIGTERM end it with one line saying what was left (exit 130 and 143, as the worker's)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a malformed command line (one error line already printed)
        return int(done.code or 0)
    if argv is None and args.func in (cmd_register, cmd_demo):  # this process runs one job
        from .allocator import keep_freed_memory
        from .openmp import sleeping_threads

        keep_freed_memory()
        sleeping_threads()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args.func(args)
    except (KeyboardInterrupt, Terminated) as stop:
        from .worker.staging import cancel_outcome

        name, code = ("SIGTERM", 143) if isinstance(stop, Terminated) else ("Ctrl-C", 130)
        print(f"cancelled ({name}); {cancel_outcome()}.", file=sys.stderr)
        return code
    except Exception as error:
        failure = describe_failure(error)
        if args.debug:
            traceback.print_exc()
        hint = " Run again as 'jointregseg --debug ...' to see where it happened." if failure.kind == "internal" and not args.debug else ""
        print(f"error: {failure.message}{hint}", file=sys.stderr)
        return failure.exit_code
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def run() -> None:
    """The ``jointregseg`` command: `main`, then the process ends at once (`quick_exit`)."""
    from .quick_exit import exit_now

    exit_now(main())


if __name__ == "__main__":
    run()
