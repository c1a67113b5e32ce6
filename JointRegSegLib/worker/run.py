"""Running one job: read inputs, register, evaluate, write outputs whole or not at all."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..device import resolve_device
from ..errors import InputError
from ..evaluation import evaluate, quality_maps
from ..imageio.geometry import Volume
from ..imageio.io import read_image, read_labels
from ..imageio.network_grid import resample
from ..imageio.validate import check_same_grid
from ..methods import get_method
from ..methods.base import Inputs, Options, Result
from ..report import save_individual_pictures
from ..weights import sha256_of
from .events import EventWriter
from .job import INPUT_KEYS, Job
from .outputs import MANIFEST, device_description, versions, write_json, write_result
from .staging import PROVENANCE, Staging

# Overall progress given to each stage (fractions of the whole run).
STAGES = {"load": (0.0, 0.05), "register": (0.05, 0.85), "evaluate": (0.85, 0.95), "write": (0.95, 1.0)}

def stage_progress(events: EventWriter, stage: str, label: str | None = None):
    """A progress callback mapping a stage's own [0, 1] onto its share of the whole run."""
    low, high = STAGES[stage]

    def report(fraction: float, what: str = "") -> None:
        events.progress(low + (high - low) * min(1.0, max(0.0, fraction)), what or label or stage)

    return report


def read_inputs(job: Job, needs_segmentations: bool, needs_atlas: bool = False) -> Inputs:
    """Read and check the job's images and label maps.

    For a method that needs an atlas, a job without a fixed image gets the shipped atlas and its
    labels (`JointRegSegLib.atlas`) as the fixed image and label map.
    """
    if needs_atlas and job.fixed is None:
        from ..atlas import atlas_paths

        job.fixed, default_labels = atlas_paths()
        job.fixed_seg = job.fixed_seg or default_labels
    for key in ("fixed", "moving"):
        if getattr(job, key) is None:
            raise InputError(f"the job has no {key} image; give --{key} (a NIfTI, NRRD or MHA file).")
    if needs_segmentations and (job.fixed_seg is None or job.moving_seg is None):
        raise InputError(f"method '{job.method}' needs label maps of both images: give --fixed-seg and --moving-seg.")
    fixed = read_image(job.fixed, f"fixed image '{job.fixed}'")
    moving = read_image(job.moving, f"moving image '{job.moving}'")
    fixed_seg = _labels_on(job.fixed_seg, fixed, "fixed")
    moving_seg = _labels_on(job.moving_seg, moving, "moving")
    return Inputs(fixed, moving, fixed_seg, moving_seg)


def _labels_on(path: Path | None, image: Volume, which: str) -> Volume | None:
    if path is None:
        return None
    labels = read_labels(path, f"{which} label map '{path}'")
    check_same_grid(image, labels, (f"{which} image", f"{which} label map"))
    return labels


def seed_everything(seed: int) -> None:
    """Same seed, same result: seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_job(job: Job, events: EventWriter) -> dict[str, Any]:
    """Run a job to completion; returns the `result` event's fields. Raises on failure (nothing written)."""
    started = time.time()
    timings: dict[str, float] = {}
    method = get_method(job.method)
    device = resolve_device(job.device)
    staging = Staging(job.output)
    try:
        tick = time.monotonic()
        events.progress(0.0, "reading inputs")
        inputs = read_inputs(job, method.info.needs_segmentations, method.info.needs_atlas)
        timings["load_s"] = time.monotonic() - tick

        tick = time.monotonic()
        seed_everything(job.seed)
        if job.threads is not None:
            torch.set_num_threads(job.threads)
        options = Options(str(device), job.seed, job.iterations, job.time_budget, dict(job.options))
        events.log(f"{method.info.title} on {device_description(device)}")
        result = method.register(inputs, options, stage_progress(events, "register"))
        timings["register_s"] = time.monotonic() - tick
        for message in result.messages:
            events.log(message, "warning")

        tick = time.monotonic()
        events.progress(STAGES["evaluate"][0], "quality maps and metrics")
        maps = quality_maps(inputs.fixed, result.warped, result.displacement, result.affine)
        metrics = evaluate(inputs, result, maps)
        metrics.update({f"time_{k}": v for k, v in timings.items()})
        if result.messages:
            metrics["messages"] = result.messages
        timings["evaluate_s"] = time.monotonic() - tick

        tick = time.monotonic()
        events.progress(STAGES["write"][0], "writing results")
        files = write_result(staging.path, result, maps, metrics)
        if job.pictures:
            pictures = save_individual_pictures(
                staging.path / "pictures", inputs.fixed, _on_fixed_grid(inputs), result.warped, maps.jacobian, maps.pmm,
                jacobian_part=maps.jacobian_part, segmentations=segmentation_pictures(inputs, result, method.info.name),
                mask=maps.mask,
            )
            files.update({f"picture_{k}": str(Path("pictures") / Path(p).name) for k, p in pictures.items()})
        timings["write_s"] = time.monotonic() - tick
        timings["total_s"] = time.time() - started
        write_json(staging.path / PROVENANCE, provenance(job, method.info.name, result.weights, device, timings, result.details))
        files["provenance"] = PROVENANCE
        write_json(staging.path / MANIFEST, files)
        output = staging.commit()
    except BaseException:
        staging.discard()
        raise
    events.progress(1.0, "done")
    summary = {"output": str(output), "files": {k: str(output / v) for k, v in files.items()}, "metrics": metrics}
    events.emit("result", **summary)
    return summary


def segmentation_pictures(inputs: Inputs, result: Result, method: str) -> dict[str, tuple[Volume, Volume, str]]:
    """Outline pictures: the warped label map over the fixed image, and the method's own segmentations
    (and brain mask) over the image each lies on."""
    candidates = {
        "warped_seg": (inputs.fixed, result.warped_seg, "warped moving labels over fixed"),
        "fixed_seg": (inputs.fixed, result.fixed_seg, f"{method}'s segmentation of fixed"),
        "moving_seg": (inputs.moving, result.moving_seg, f"{method}'s segmentation of moving"),
        "brain_mask": (inputs.moving, result.brain_mask, f"{method}'s brain mask over moving"),
    }
    return {name: entry for name, entry in candidates.items() if entry[1] is not None}


def _on_fixed_grid(inputs: Inputs) -> Volume:
    """The moving image as it lies, resampled onto the fixed grid (for pictures)."""
    return resample(inputs.moving, inputs.fixed.geometry)


def provenance(
    job: Job, method: str, weights: dict[str, str], device: torch.device, timings: dict[str, float], details: dict[str, Any]
) -> dict[str, Any]:
    """What produced this output: method, options, input and weights checksums, seed, versions, device, timings."""
    return {
        "jointregseg": __version__,
        "method": method,
        "job": job.to_dict(),
        "inputs_sha256": {key: sha256_of(path) for key in INPUT_KEYS if (path := getattr(job, key)) is not None},
        "seed": job.seed,
        "weights_sha256": weights,
        "device": device_description(device),
        "versions": versions(),
        "timings_s": timings,
        "method_details": details,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
