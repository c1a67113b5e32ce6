"""Running the benchmark: every tool on every pair, each run in its own child process, one evaluation.

- Our methods run through the worker itself, ``python -m JointRegSegLib.worker JOB.json`` (the job
  code behind ``jointregseg register`` and the Slicer module), which evaluates its result with
  `JointRegSegLib.evaluation` and writes ``metrics.json``.
- Peers run in `peers` child processes. Their fields are warped here with our `warp_volume`,
  evaluated by the same `evaluation.Evaluation` (one per pair, shared by the tools), and written with the
  worker's `write_result`, so every tool's output folder has the same files and numbers.
- A "before registration" row per pair evaluates the identity (the moving image as it lies) with
  the same code, so HD95 and the maps have a "before" value too.
- Inputs: each pair's images and label maps are read and checked once, then staged as float32 /
  int32 NIfTI files that every tool reads.
- Time: ``time_s`` is the registration alone, the median over ``repeats`` runs. Ours: the worker's
  ``time_register_s`` (``method.register``: from the images in memory to the field and the warped
  images on the fixed grid). Peers: from the tool's call to its dense field on the fixed grid.
  ``process_s`` is the whole child process's wall time (interpreter start, imports, reading; the
  worker also evaluates and writes its outputs).
- Memory: ``peak_rss_mb``, the child process's peak resident set size (``ru_maxrss`` from
  ``os.wait4`` in a small launcher, see `processes.spawn`; the largest over the repeats). The worker's
  figure includes its evaluation.
- Threads: every child gets the same count through OMP_NUM_THREADS, MKL_NUM_THREADS,
  OPENBLAS_NUM_THREADS and ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS (torch, ITK, SimpleITK, ANTs and
  elastix read these); the worker job also names it (``torch.set_num_threads``) and the peer
  processes set ITK's global default explicitly.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InputError
from ..evaluation import Evaluation, foreground_mask
from ..imageio.geometry import Volume
from ..imageio.io import read_image, read_labels, write_volume
from ..imageio.network_grid import resample
from ..imageio.validate import check_same_grid
from ..methods import method_names
from ..methods.base import Inputs, Result
from ..methods.options import parse_options, validate_options, validate_setting
from ..spatial.field_io import read_displacement_field
from ..spatial.physical import warp_volume
from ..worker.job import Job
from ..worker.outputs import versions, write_json, write_result
from . import peers as peers_module
from .pairs import PairSpec, write_pair_list
from .peers import FIELD_FILE, PEERS, PRESETS, REPORT_FILE, TOOL_MODULES
from .processes import THREAD_VARIABLES, child_environment, last_error, spawn

BEFORE = "before registration"
METRICS = (
    "dice_mean",
    "dice_mean_initial",
    "dice_label_count",
    "seg_dice_fixed",
    "seg_dice_moving",
    "hd95_mean",
    "ncc",
    "ncc_initial",
    "mi",
    "mi_initial",
    "nmi",
    "pmm_mean",
    "pmm_mean_initial",
    "folding_percent",
    "sdlogj",
    "jacobian_min",
)
# Run a file as __main__ without putting its folder on sys.path (another Python must not pick up
# modules from our package folder or from our environment).
_RUN_FILE = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def peer_command(python: str, job_file: Path) -> list[str]:
    """The command that runs a peer's job file in its own process of ``python`` (`peers.main`)."""
    return [python, "-c", _RUN_FILE, peers_module.__file__, str(job_file)]


def method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name[key=value;key=value]`` (values parsed as JSON where they are JSON) to the
    method's name and its own options, e.g. ``segreg[variant=learned;mask_loss=edt]``; the keys
    ``iterations`` and ``time_budget`` set the run's iteration cap and time budget (`run_method`)."""
    name, bracket, rest = spec.partition("[")
    if bracket and not rest.endswith("]"):
        raise InputError(f"method '{spec}' has an unclosed '['; write e.g. segreg[variant=learned;mask_loss=edt].")
    pairs = [item.strip() for item in rest[:-1].split(";") if item.strip()] if bracket else []
    return name.strip(), parse_options(pairs)


def folder_name(tool: str) -> str:
    """A tool label (``segreg[variant=learned]``) as a folder name (``segreg-variant=learned``)."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", tool).strip("-")


@dataclass
class BenchSettings:
    """What to run and how (see the module docstring)."""

    methods: list[str] = field(default_factory=lambda: ["tto"])
    peers: list[str] = field(default_factory=lambda: list(PEERS))
    device: str = "cpu"
    threads: int = os.cpu_count() or 1
    repeats: int = 1
    preset: str = "default"
    peer_python: str = sys.executable
    seed: int = 0
    iterations: int | None = None
    time_budget: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    own_warped: bool = False
    timeout_s: float | None = None

    def check(self) -> None:
        """Raise `InputError` for an unknown tool or a bad number."""
        unknown = [m for m in self.methods if method_spec(m)[0] not in method_names()]
        if unknown:
            raise InputError(f"unknown method(s) {unknown}; choose from: {', '.join(method_names())}.")
        for spec in self.methods:  # every bad option value is refused before any run starts
            name, own = method_spec(spec)
            for key in ("iterations", "time_budget"):  # the run's own settings (`run_method`)
                if key in own:
                    validate_setting(key, own.pop(key), f"{spec}: {key}")
            validate_options(name, {**self.options, **own})
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise InputError(f"unknown peer(s) {unknown}; choose from: {', '.join(PEERS)}.")
        if not self.methods and not self.peers:
            raise InputError("nothing to run: give at least one method or peer.")
        if self.preset not in PRESETS:
            raise InputError(f"unknown peer preset '{self.preset}'; choose one of: {', '.join(PRESETS)}.")
        if self.threads < 1 or self.repeats < 1:
            raise InputError(f"threads and repeats must be >= 1; got threads={self.threads}, repeats={self.repeats}.")


@dataclass
class ToolRun:
    """One tool on one pair: status, metrics (flat numbers), per-label numbers, times and memory."""

    pair: str
    tool: str
    kind: str
    status: str
    note: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    times_s: list[float] = field(default_factory=list)
    process_s: list[float] = field(default_factory=list)
    peak_rss_mb: float = float("nan")
    version: str = ""
    folder: Path | None = None

    @property
    def time_s(self) -> float:
        """Median registration time over the repeats (NaN when the tool did not run)."""
        return float(np.median(self.times_s)) if self.times_s else float("nan")


@lru_cache(maxsize=None)
def peer_module_available(python: str, module: str) -> bool:
    """Whether the Python ``python`` finds the tool module of ``module`` (``ants``, ``itk``, ``SimpleITK``)."""
    check = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({TOOL_MODULES[module]!r}) is None)"
    try:
        done = subprocess.run([python, "-c", check], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def skipped_note(peer: str, python: str) -> str:
    """Why a peer is skipped and the command that installs it."""
    info = PEERS[peer]
    return f"skipped: {info.module} is not installed for {python}; install with: {info.install}"


# ---------------------------------------------------------------- inputs


def stage_pair(pair: PairSpec, folder: Path) -> tuple[Inputs, dict[str, Path]]:
    """Read and check a pair, and write the copies every tool reads (float32 images, int32 labels)."""
    fixed = read_image(pair.fixed, f"pair '{pair.name}' fixed image")
    moving = read_image(pair.moving, f"pair '{pair.name}' moving image")
    fixed_seg = read_labels(pair.fixed_seg, f"pair '{pair.name}' fixed label map") if pair.fixed_seg else None
    moving_seg = read_labels(pair.moving_seg, f"pair '{pair.name}' moving label map") if pair.moving_seg else None
    if fixed_seg is not None:
        check_same_grid(fixed, fixed_seg, ("fixed image", "fixed label map"))
    if moving_seg is not None:
        check_same_grid(moving, moving_seg, ("moving image", "moving label map"))
    volumes = {"fixed": fixed, "moving": moving, "fixed_seg": fixed_seg, "moving_seg": moving_seg}
    staged = {}
    for key, volume in volumes.items():
        if volume is not None:
            staged[key] = folder / f"{key}.nii.gz"
            write_volume(volume, staged[key])
    return Inputs(fixed, moving, fixed_seg, moving_seg), staged


def epe_region(pair: PairSpec, inputs: Inputs) -> np.ndarray:
    """Where the end-point error is averaged: the fixed mask, else the fixed labels' foreground, else the image's."""
    if pair.fixed_mask is not None:
        mask = read_labels(pair.fixed_mask, f"pair '{pair.name}' fixed mask")
        check_same_grid(inputs.fixed, mask, ("fixed image", "fixed mask"))
        return mask.array > 0
    if inputs.fixed_seg is not None:
        return inputs.fixed_seg.array > 0
    return foreground_mask(inputs.fixed)


def end_point_error(estimate: Volume, truth: Volume, region: np.ndarray) -> float:
    """Mean Euclidean distance (mm) between two physical displacement fields over ``region`` of the fixed grid.

    Both fields map a fixed point ``x`` to ``x + u(x)``, so the distance between the two mapped
    points is ``|u_estimate(x) - u_true(x)|``. A field on another grid is resampled onto the
    estimate's grid first.
    """
    if not truth.geometry.same_as(estimate.geometry):
        truth = resample(truth, estimate.geometry)
    distance = np.linalg.norm(np.asarray(estimate.array, np.float64) - np.asarray(truth.array, np.float64), axis=-1)
    return float(distance[region].mean()) if region.any() else float("nan")


# ---------------------------------------------------------------- one tool on one pair


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(metrics[key]) if metrics.get(key) is not None else float("nan") for key in METRICS if key in metrics}


def _with_epe(run: ToolRun, field_volume: Volume, truth: Volume | None, region: np.ndarray) -> None:
    if truth is not None:
        run.metrics["epe_mm"] = end_point_error(field_volume, truth, region)
        run.metrics["epe_initial_mm"] = end_point_error(field_volume.with_array(np.zeros_like(truth.array)), truth, region)


def before_run(
    pair: PairSpec, inputs: Inputs, truth: Volume | None, region: np.ndarray, folder: Path, evaluation: Evaluation | None = None
) -> ToolRun:
    """The pair before registration: the identity field evaluated like every tool's field (by
    ``evaluation``, the pair's, where given)."""
    evaluation = evaluation or Evaluation(inputs)
    grid = inputs.fixed.geometry
    identity = Volume(np.zeros((*grid.shape, 3), np.float32), grid)
    # The evaluation's own "initial" resampling, so the two agree.
    warped_seg = evaluation.initial_seg
    result = Result(
        displacement=identity, warped=evaluation.initial, warped_seg=None if warped_seg is None else Volume(warped_seg, grid)
    )
    maps = evaluation.maps(result)
    metrics = evaluation.metrics(result, maps)
    write_result(folder, result, maps, metrics)
    run = ToolRun(pair.name, BEFORE, "before", "ok", metrics=_flat_metrics(metrics), labels=metrics.get("labels", {}), folder=folder)
    _with_epe(run, identity, truth, region)
    return run


def _result_from_field(inputs: Inputs, field_volume: Volume) -> Result:
    warped = warp_volume(inputs.moving, field_volume)
    warped_seg = warp_volume(inputs.moving_seg, field_volume, "nearest") if inputs.moving_seg is not None else None
    return Result(displacement=field_volume, warped=warped, warped_seg=warped_seg)


def run_method(
    name: str, pair: PairSpec, staged: dict[str, Path], truth: Volume | None, region: np.ndarray, settings: BenchSettings, folder: Path
) -> ToolRun:
    """One of our methods on one pair, through the worker (``repeats`` times; the first run's outputs are kept)."""
    run = ToolRun(pair.name, name, "ours", "ok", folder=folder / "result")
    env = child_environment(settings.threads)
    method, own_options = method_spec(name)
    # iterations and time_budget in brackets are the run's own (e.g. tto[iterations=20;refine=false])
    iterations = own_options.pop("iterations", settings.iterations)
    time_budget = own_options.pop("time_budget", settings.time_budget)
    for repeat in range(settings.repeats):
        output = folder / ("result" if repeat == 0 else f"repeat{repeat}")
        job = Job(
            method=method,
            output=output,
            device=settings.device,
            seed=settings.seed,
            iterations=iterations,
            time_budget=time_budget,
            options={**settings.options, **own_options},
            pictures=False,
            threads=settings.threads,
            **{key: staged.get(key) for key in ("fixed", "moving", "fixed_seg", "moving_seg")},
        )
        job_file = folder / f"job{repeat}.json"
        job.write(job_file)
        log = folder / f"worker{repeat}.log"
        done = spawn([sys.executable, "-m", "JointRegSegLib.worker", str(job_file)], env, log, settings.timeout_s)
        if done.returncode != 0:
            return ToolRun(pair.name, name, "ours", "failed", note=f"worker exit {done.returncode}: {last_error(log)}", folder=folder)
        metrics = json.loads((output / "metrics.json").read_text())
        run.times_s.append(float(metrics["time_register_s"]))
        run.process_s.append(done.wall_s)
        run.peak_rss_mb = float(np.nanmax([run.peak_rss_mb, done.peak_rss_mb]))
        if repeat == 0:
            run.metrics = _flat_metrics(metrics)
            run.labels = metrics.get("labels", {})
            provenance = json.loads((output / "provenance.json").read_text())
            run.version = f"jointregseg {provenance.get('jointregseg', '')} ({provenance.get('device', '')})"
            _with_epe(run, read_displacement_field(output / "displacement.nii.gz"), truth, region)
        else:
            shutil.rmtree(output, ignore_errors=True)
    return run


def run_peer(
    name: str, pair: PairSpec, inputs: Inputs, staged: dict[str, Path], truth: Volume | None, region: np.ndarray,
    settings: BenchSettings, folder: Path, evaluation: Evaluation | None = None,
) -> ToolRun:
    """A peer on one pair, in a child process of ``settings.peer_python``; skipped when not installed.
    Its field is evaluated by ``evaluation`` (the pair's, where given)."""
    info = PEERS[name]
    if not peer_module_available(settings.peer_python, info.module):
        return ToolRun(pair.name, name, "peer", "skipped", note=skipped_note(name, settings.peer_python))
    run = ToolRun(pair.name, name, "peer", "ok", folder=folder / "result")
    env = child_environment(settings.threads)
    for repeat in range(settings.repeats):
        output = folder / ("result" if repeat == 0 else f"repeat{repeat}")
        job = {
            "peer": name,
            "fixed": str(staged["fixed"]),
            "moving": str(staged["moving"]),
            "out": str(output),
            "preset": settings.preset,
            "threads": settings.threads,
            "seed": settings.seed,
            "own_warped": settings.own_warped and repeat == 0,
        }
        job_file = folder / f"job{repeat}.json"
        job_file.write_text(json.dumps(job, indent=2))
        log = folder / f"peer{repeat}.log"
        command = peer_command(settings.peer_python, job_file)
        done = spawn(command, env, log, settings.timeout_s)
        if done.returncode != 0:
            return ToolRun(pair.name, name, "peer", "failed", note=f"exit {done.returncode}: {last_error(log)}", folder=folder)
        report = json.loads((output / REPORT_FILE).read_text())
        run.times_s.append(float(report["register_s"]))
        run.process_s.append(done.wall_s)
        run.peak_rss_mb = float(np.nanmax([run.peak_rss_mb, done.peak_rss_mb]))
        if repeat == 0:
            run.version = report.get("version", "")
            field_volume = read_displacement_field(output / FIELD_FILE)
            result = _result_from_field(inputs, field_volume)
            evaluation = evaluation or Evaluation(inputs)
            maps = evaluation.maps(result)
            metrics = evaluation.metrics(result, maps)
            write_result(output, result, maps, metrics)
            run.metrics = _flat_metrics(metrics)
            run.labels = metrics.get("labels", {})
            _with_epe(run, field_volume, truth, region)
        else:
            shutil.rmtree(output, ignore_errors=True)
    return run


# ---------------------------------------------------------------- the whole benchmark


def _describe(run: ToolRun) -> str:
    if run.status != "ok":
        return f"{run.status} ({run.note})"
    dice = run.metrics.get("dice_mean", float("nan"))
    return f"Dice {dice:.3f}, {run.time_s:.1f} s, {run.peak_rss_mb:.0f} MB"


def run_benchmark(
    pairs: list[PairSpec], settings: BenchSettings, out: Path, log: Callable[[str], None] = lambda text: print(text, file=sys.stderr)
) -> list[ToolRun]:
    """Run every method and peer on every pair; write tables and figures under ``out``; return the runs.

    Layout of ``out``: ``results.csv``, ``labels.csv``, ``ratios.csv``, ``results.md``,
    ``figures/*.png``, ``bench.json`` (settings, versions, machine), ``pairs.csv`` (the pair list
    as run), and ``runs/<pair>/<tool>/`` (each run's logs and outputs; ``result/`` holds the same
    files as a worker output folder).
    """
    from .figures import make_figures
    from .table import write_tables

    settings.check()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_pair_list(pairs, out / "pairs.csv")
    write_json(out / "bench.json", _description(settings, pairs))
    runs: list[ToolRun] = []
    for pair in pairs:
        base = out / "runs" / pair.name
        staging = base / "inputs"
        staging.mkdir(parents=True, exist_ok=True)
        inputs, staged = stage_pair(pair, staging)
        truth = read_displacement_field(pair.true_field) if pair.true_field else None
        region = epe_region(pair, inputs)
        evaluation = Evaluation(inputs)
        runs.append(before_run(pair, inputs, truth, region, base / "before", evaluation))
        log(f"[{pair.name}] {BEFORE}: {_describe(runs[-1])}")
        for method in settings.methods:
            folder = base / folder_name(method)
            folder.mkdir(parents=True, exist_ok=True)
            log(f"[{pair.name}] {method} ...")
            runs.append(run_method(method, pair, staged, truth, region, settings, folder))
            log(f"[{pair.name}] {method}: {_describe(runs[-1])}")
        for peer in settings.peers:
            folder = base / peer
            folder.mkdir(parents=True, exist_ok=True)
            log(f"[{pair.name}] {peer} ...")
            runs.append(run_peer(peer, pair, inputs, staged, truth, region, settings, folder, evaluation))
            log(f"[{pair.name}] {peer}: {_describe(runs[-1])}")
    write_tables(runs, out, settings)
    make_figures(runs, out)
    write_json(out / "runs.json", [{**asdict(run), "time_s": run.time_s} for run in runs])
    return runs


def _description(settings: BenchSettings, pairs: list[PairSpec]) -> dict[str, Any]:
    return {
        "settings": asdict(settings),
        "thread_variables": {name: settings.threads for name in THREAD_VARIABLES},
        "versions": versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count()},
        "pairs": [{"name": pair.name, **{k: str(v) for k, v in pair.files().items()}} for pair in pairs],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
