"""Running one job: check everything, read inputs, register, evaluate, write outputs whole or not at all.

Order: options, device and output folder are checked before anything is read (`Staging` applies
the output-folder rule), inputs before the method starts, the result (finite, overlapping the
fixed image) before anything is written. A failing evaluation or picture step does not throw a
finished registration away: the transform and the warped image are written, the step's failure is
logged, recorded in metrics.json (``failed_steps``) and in the ``result`` event. A full disk,
by contrast, fails the run with nothing written.
"""

from __future__ import annotations

import errno
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from ..device import resolve_device
from ..errors import InputError, OutputError
from ..evaluation import Evaluation, Maps, undefined_metrics
from ..imageio.io import read_image, read_labels
from ..imageio.validate import check_same_grid
from ..labels import tissue_codes
from ..methods import get_method
from ..methods.base import Inputs, Options, Result
from ..methods.catalogue import MethodInfo
from ..methods.options import validate_options
from ..timing import Stopwatch, process_age
from ..weights import sha256_of
from .beside import ForkedChild
from .events import EventWriter
from .failures import describe_failure
from .job import INPUT_KEYS, Job
from .outputs import (
    BackgroundWriter,
    device_description,
    output_files,
    versions,
    write_json,
    write_maps,
    write_metrics,
    write_registration,
)
from .pictures import draw, picture_plan, warm_up
from .staging import MANIFEST, PROVENANCE, Staging

# Overall progress given to each stage (fractions of the whole run; on the sample pair a tto run spends
# under 1 % reading, 4 % evaluating and 6 % writing, on the benchmark pair a learned method up to a third
# evaluating: the shares favour the registration, whose pace the time-left estimate extrapolates).
STAGES = {"load": (0.0, 0.02), "register": (0.02, 0.88), "evaluate": (0.88, 0.95), "write": (0.95, 1.0)}
MIN_VOXELS = 16
"""Fewest voxels along any axis of an image (the quality map's patches are 16 voxels wide)."""
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)

ExtraOutputs = Callable[[Path, Inputs, Result, "Maps | None", dict[str, Any]], dict[str, str]]
"""Writes more files into the staging folder; returns {kind: path relative to it} (e.g. the demo's overview)."""


def stage_progress(events: EventWriter, stage: str, label: str | None = None):
    """A progress callback mapping a stage's own [0, 1] onto its share of the whole run."""
    low, high = STAGES[stage]

    def report(fraction: float, what: str = "") -> None:
        events.progress(low + (high - low) * min(1.0, max(0.0, fraction)), what or label or stage)

    return report


def resolve_inputs(job: Job, info: MethodInfo) -> None:
    """Fill in the atlas for a method that needs one, and check that the method has the inputs it needs.

    For a method that needs an atlas, a job without a fixed image gets the shipped atlas and its
    labels (`JointRegSegLib.atlas`) as the fixed image and label map.
    """
    if info.needs_atlas and job.fixed is None:
        from ..atlas import atlas_paths

        job.fixed, default_labels = atlas_paths()
        job.fixed_seg = job.fixed_seg or default_labels
    for key in ("fixed", "moving"):
        if getattr(job, key) is None:
            raise InputError(f"the job has no {key} image; give --{key} (a NIfTI, NRRD or MHA file).")
    if info.needs_segmentations and (job.fixed_seg is None or job.moving_seg is None):
        raise InputError(f"method '{job.method}' needs label maps of both images: give --fixed-seg and --moving-seg.")
    if job.fixed_seg is not None and job.moving_seg is None and not info.gives_segmentation:
        raise InputError(
            f"method '{job.method}' uses a fixed label map only with a moving one (to measure Dice after registration): "
            "give --moving-seg too, or leave out --fixed-seg."
        )


def read_inputs(job: Job, events: EventWriter | None = None) -> Inputs:
    """Read and check the job's images and label maps (`resolve_inputs` first).

    The files are read two at a time (SimpleITK's reading and zlib release the GIL: the benchmark pair's four
    .nii.gz files 0.39-0.46 s one after another, 0.22-0.29 s so); a failure is raised for the first file that
    failed in the order fixed, moving, fixed label map, moving label map, as when they were read one by one.
    """
    files = {
        "fixed": (read_image, job.fixed, "fixed image"),
        "moving": (read_image, job.moving, "moving image"),
        "fixed_seg": (read_labels, job.fixed_seg, "fixed label map"),
        "moving_seg": (read_labels, job.moving_seg, "moving label map"),
    }
    with ThreadPoolExecutor(2, thread_name_prefix="jointregseg-reader") as pool:
        reading = {key: pool.submit(reader, path, name) for key, (reader, path, name) in files.items() if path is not None}
    read = {key: future.result() for key, future in reading.items()}
    fixed, moving = read["fixed"], read["moving"]
    for name, path, image in (("fixed image", job.fixed, fixed), ("moving image", job.moving, moving)):
        if min(image.geometry.shape) < MIN_VOXELS:
            raise InputError(
                f"{name} '{path}' has only {'x'.join(map(str, image.geometry.shape))} voxels; JointRegSeg needs at least "
                f"{MIN_VOXELS} along every axis. Give the full scan, or resample it to thinner slices first."
            )
        if events is not None and _looks_binary(image.array):
            events.log(
                f"the {name} has only two intensity values: is it a mask or a label map? Intensity metrics "
                "(NCC, MI, PMM) may be undefined for it.",
                "warning",
            )
    for which, image in (("fixed", fixed), ("moving", moving)):
        if (labels := read.get(f"{which}_seg")) is not None:
            check_same_grid(labels, image, (f"{which} label map", f"{which} image"))
    return Inputs(fixed, moving, read.get("fixed_seg"), read.get("moving_seg"))


def scored_inputs(job: Job, inputs: Inputs) -> Inputs:
    """The inputs the evaluation scores against: the shipped atlas's label map (`resolve_inputs`) by the tissue codes
    701-703, not its own 1-3 (FSL FAST's classes, which are FreeSurfer's left white matter and cortex), so the
    moving label map is scored by its tissue classes (`evaluation.label_metrics`)."""
    from ..atlas import atlas_paths

    if inputs.fixed_seg is None or job.fixed_seg is None or Path(job.fixed_seg).resolve() != Path(atlas_paths()[1]).resolve():
        return inputs
    return replace(inputs, fixed_seg=inputs.fixed_seg.with_array(tissue_codes(inputs.fixed_seg.array)))


def _looks_binary(array: np.ndarray, samples: int = 200_000) -> bool:
    step = max(1, array.size // samples)
    return np.unique(array.ravel()[::step]).size <= 2


def seed_everything(seed: int) -> None:
    """Same seed, same result: seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_job(
    job: Job, events: EventWriter, extra_outputs: ExtraOutputs | None = None, startup: float | None = None,
    painter: ForkedChild | None = None,
) -> dict[str, Any]:
    """Run a job to completion; returns the `result` event's fields. Raises on failure (nothing written).

    The registration's files are written on a background thread (`outputs.BackgroundWriter`) while
    the result is evaluated, the maps while the metrics are computed; the pictures are drawn meanwhile
    by a child process on Linux (``painter``, a `beside.ForkedChild` warmed up with `pictures.warm_up`, forked by
    the caller as early as it can, else here; elsewhere they are drawn after the metrics); then the run waits
    for them. The caller closes its ``painter`` when the run returns or fails.

    ``timings`` (in the result and provenance.json): ``startup_s`` (the interpreter and imports before
    the job started: ``startup``, or where None the process's age now), ``load_s``, ``register_s``, ``evaluate_s``, ``write_s``, ``total_s`` (from the job's
    start), ``steps`` and ``cpu_steps``, the wall-clock and CPU seconds of every named step (`timing`),
    the method's own under ``registration: ...`` (the background writing's overlap the evaluation's
    and the pictures'; ``writing: waiting for the files`` is what the run waited for them at the end).
    """
    started = time.time()
    watch = Stopwatch()
    startup = process_age() if startup is None else startup
    if startup is not None:
        watch.add("start-up", startup, time.process_time())
    timings: dict[str, Any] = {}
    method = get_method(job.method)
    validate_options(job.method, job.options)
    device = resolve_device(job.device)
    resolve_inputs(job, method.info)
    staging = Staging(job.output, job.inputs(), job.overwrite, (*output_files(job.compress).values(), MANIFEST, PROVENANCE))
    writer = BackgroundWriter()
    drawing: ForkedChild | None = None
    try:
        if job.pictures:
            drawing = painter or ForkedChild(warm_up)
        tick = time.monotonic()
        events.progress(0.0, "reading inputs")
        with watch.step("reading"):
            inputs = read_inputs(job, events)
        timings["load_s"] = time.monotonic() - tick

        tick, cpu = time.monotonic(), time.process_time()
        seed_everything(job.seed)
        if job.threads is not None:
            torch.set_num_threads(job.threads)
        options = Options(str(device), job.seed, job.iterations, job.time_budget, dict(job.options))
        events.log(f"{method.info.title} on {device_description(device)}")
        threads = torch.get_num_threads()
        evaluation = Evaluation(scored_inputs(job, inputs), str(device), threads, watch)
        evaluation.numbers_before_beside()  # beside the registration, on the core its steps leave idle
        result = method.register(inputs, options, stage_progress(events, "register"))
        timings["register_s"] = time.monotonic() - tick
        _add_method_steps(watch, result.details, timings["register_s"], time.process_time() - cpu)
        tick = time.monotonic()
        evaluation.check(result)
        writer.submit(partial(write_registration, staging.path, result, job.compress, watch, threads))
        for message in result.messages:
            events.log(message, "warning")

        failed: dict[str, str] = {}
        events.progress(STAGES["evaluate"][0], "quality maps and metrics")
        maps = _kept_on_failure("evaluation", failed, events, lambda: evaluation.maps(result, job.jacobian == "whole"))
        writer.submit(partial(write_maps, staging.path, maps, job.compress, watch, threads))
        if drawing is not None:  # drawn by the child while the metrics are computed (`beside`)
            evaluation.wait_for_numbers_before()  # the moving image as it lies, computed there
            with watch.step("evaluation: pictures' slices"):
                pictures = _kept_on_failure("pictures", failed, events, lambda: picture_plan(evaluation, result, maps, method.info.name))
            if pictures is None:
                drawing.close()
                drawing = None
            else:
                drawing.submit(draw, staging.path, pictures)
        metrics = (_kept_on_failure("evaluation", failed, events, lambda: evaluation.metrics(result, maps)) if maps is not None else None) or {}
        metrics.update({f"time_{k}": v for k, v in timings.items()})
        if result.messages:
            metrics["messages"] = result.messages
        for key, why in undefined_metrics(metrics).items():
            events.log(f"{key} is undefined: {why}", "warning")
        timings["evaluate_s"] = time.monotonic() - tick

        tick = time.monotonic()
        events.progress(STAGES["write"][0], "writing results")
        files: dict[str, str] = {}
        if extra_outputs is not None:  # first: the pictures' child draws on meanwhile
            extra = partial(extra_outputs, staging.path, inputs, result, maps, metrics)
            with watch.step("writing: overview"):
                files.update(_kept_on_failure("overview", failed, events, extra) or {})
        if drawing is not None:
            with watch.step("writing: pictures"):
                files.update(_kept_on_failure("pictures", failed, events, drawing.result) or {})
        with watch.step("writing: waiting for the files"):
            files.update(writer.finish())
        files.update(write_metrics(staging.path, {**metrics, **({"failed_steps": failed} if failed else {})}, job.compress, watch))
        timings["write_s"] = time.monotonic() - tick
        timings["total_s"] = time.time() - started
        if startup is not None:  # provenance only: metrics.json keeps the job's own times
            timings["startup_s"] = startup
        timings["steps"], timings["cpu_steps"] = watch.seconds, watch.cpu_seconds
        record = provenance(job, method.info.name, result, device, timings, failed)
        if maps is not None:
            record["jacobian_part"] = maps.jacobian_part
        write_json(staging.path / PROVENANCE, record)
        files["provenance"] = PROVENANCE
        write_json(staging.path / MANIFEST, files)
        output = staging.commit()
    except BaseException:
        if drawing is not None:
            drawing.close()
        writer.close()
        staging.discard()
        raise
    writer.close()
    events.progress(1.0, "done")
    summary = {"output": str(output), "files": {k: str(output / v) for k, v in files.items()}, "metrics": metrics, "timings": timings}
    if failed:
        summary["failed_steps"] = failed
    events.emit("result", **summary)
    return summary


def _add_method_steps(watch: Stopwatch, details: dict[str, Any], seconds: float, cpu_seconds: float) -> None:
    """The method's own steps (``details["timings"]``, ``details["cpu_timings"]``) as ``registration: ...``,
    and what the registration spent outside them as ``registration: other``."""
    own, own_cpu = details.get("timings", {}), details.get("cpu_timings", {})
    for name, step_seconds in own.items():
        watch.add(f"registration: {name}", step_seconds, own_cpu.get(name))
    watch.add("registration: other", seconds - sum(own.values()), cpu_seconds - sum(own_cpu.values()))


def _kept_on_failure(step: str, failed: dict[str, str], events: EventWriter, work: Callable[[], Any]) -> Any:
    """Run a step whose failure must not cost the registration: log and record it, return None.

    A full disk (or another write failure) is not such a failure: it fails the run.
    """
    try:
        return work()
    except OutputError:
        raise
    except OSError as error:
        if error.errno in _DISK_ERRORS:
            raise OutputError(f"could not write the {step}: {error.strerror}. Free some space or choose another output folder; nothing was kept.") from error
        reason = describe_failure(error, step).message
    except Exception as error:  # anything else in this step: report it, keep the registration
        reason = describe_failure(error, step).message
    failed[step] = reason
    events.log(f"the {step} step failed ({reason}); the transform and the warped image are written.", "warning")
    return None


def provenance(
    job: Job, method: str, result: Result, device: torch.device, timings: dict[str, float], failed: dict[str, str]
) -> dict[str, Any]:
    """What produced this output: method, options, input and weights checksums, seed, versions, device, timings."""
    return {
        "jointregseg": __version__,
        "method": method,
        "job": job.to_dict(),
        "inputs_sha256": {key: sha256_of(path) for key in INPUT_KEYS if (path := getattr(job, key)) is not None},
        "seed": job.seed,
        "weights_sha256": result.weights,
        "device": device_description(device),
        "versions": versions(),
        "timings_s": timings,
        "method_details": result.details,
        "failed_steps": failed,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
