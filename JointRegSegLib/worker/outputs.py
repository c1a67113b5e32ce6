"""Writing a finished run into its (staging) output folder, and provenance."""

from __future__ import annotations

import json
import platform
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from ..evaluation import Maps
from ..imageio.io import compact_labels, write_error, write_volume
from ..methods.base import Result
from ..spatial.affine import to_sitk_affine
from ..spatial.field_io import write_displacement_field
from ..timing import Stopwatch
from .events import to_json
from .staging import MANIFEST

PACKAGES = ("jointregseg", "torch", "monai", "SimpleITK", "numpy", "scipy", "nibabel")


FILES = {
    "warped": "warped.nii.gz",
    "displacement": "displacement.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "pmm": "pmm.nii.gz",
    "fixed_seg": "fixed_seg.nii.gz",
    "moving_seg": "moving_seg.nii.gz",
    "warped_seg": "warped_seg.nii.gz",
    "brain_mask": "brain_mask.nii.gz",
    "extracted": "extracted.nii.gz",
    "affine": "affine.tfm",
    "metrics": "metrics.json",
}
"""The file each kind of output is written to (README "Outputs"), compressed."""


def output_files(compress: bool = True) -> dict[str, str]:
    """`FILES`, or with ``compress`` false the same names as uncompressed NIfTI (``.nii``)."""
    return dict(FILES) if compress else {kind: name.removesuffix(".gz") for kind, name in FILES.items()}


def write_result(
    folder: Path,
    result: Result,
    maps: Maps | None,
    metrics: dict[str, Any],
    compress: bool = True,
    watch: Stopwatch | None = None,
    threads: int | None = None,
) -> dict[str, str]:
    """Write images, field, maps (when there are any) and metrics; return {kind: file name}.

    NIfTI files are ``.nii.gz`` (fast compression, `imageio.gzip_parallel`, on ``threads`` threads),
    or ``.nii`` when ``compress`` is false. Every file is checked after writing; a failure raises
    OutputError. ``watch`` times each part (`write_registration`, `write_maps`, `write_metrics`).
    """
    files = write_registration(folder, result, compress, watch, threads)
    files.update(write_maps(folder, maps, compress, watch, threads))
    files.update(write_metrics(folder, metrics, compress, watch))
    return files


def write_registration(
    folder: Path, result: Result, compress: bool = True, watch: Stopwatch | None = None, threads: int | None = None
) -> dict[str, str]:
    """The registration's own files: warped image, field, affine, segmentations and brain mask
    (``writing: images`` and ``writing: displacement field`` on ``watch``)."""
    names, watch = output_files(compress), watch or Stopwatch()
    files: dict[str, str] = {}
    with watch.step("writing: images"):
        files.update(_volumes(folder, names, {"warped": result.warped}, threads))
    with watch.step("writing: displacement field"):
        write_displacement_field(result.displacement, folder / names["displacement"], threads=threads)
        files["displacement"] = names["displacement"]
        if result.affine is not None:
            write_affine(result.affine, folder / names["affine"])
            files["affine"] = names["affine"]
    with watch.step("writing: images"):
        labels = {kind: getattr(result, kind) for kind in ("fixed_seg", "moving_seg", "warped_seg", "brain_mask")}
        files.update(_volumes(folder, names, {kind: compact_labels(v) for kind, v in labels.items() if v is not None}, threads))
        files.update(_volumes(folder, names, {"extracted": result.extracted}, threads))
    return files


def write_maps(
    folder: Path, maps: Maps | None, compress: bool = True, watch: Stopwatch | None = None, threads: int | None = None
) -> dict[str, str]:
    """The Jacobian and PMM maps, where there are any (``writing: maps`` on ``watch``)."""
    if maps is None:
        return {}
    with (watch or Stopwatch()).step("writing: maps"):
        return _volumes(folder, output_files(compress), {"jacobian": maps.jacobian, "pmm": maps.pmm}, threads)


def write_metrics(folder: Path, metrics: dict[str, Any], compress: bool = True, watch: Stopwatch | None = None) -> dict[str, str]:
    """metrics.json (``writing: metrics`` on ``watch``)."""
    name = output_files(compress)["metrics"]
    with (watch or Stopwatch()).step("writing: metrics"):
        write_json(folder / name, metrics)
    return {"metrics": name}


def _volumes(folder: Path, names: dict[str, str], volumes: dict[str, Any], threads: int | None) -> dict[str, str]:
    written = {}
    for kind, volume in volumes.items():
        if volume is not None:
            write_volume(volume, folder / names[kind], threads=threads)
            written[kind] = names[kind]
    return written


class BackgroundWriter:
    """Files written on one background thread while the run goes on (evaluation, pictures).

    Compression releases the GIL, so the files are compressed on a core the pictures (drawn by
    matplotlib, which holds it) leave idle. `finish` waits for every file and raises the first
    failure (an OutputError for a full disk); `close` waits for whatever is still running, so the
    staging folder is never removed under a writing thread.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jointregseg-writer")
        self._jobs: list[Future] = []

    def submit(self, write: Callable[[], dict[str, str]]) -> None:
        self._jobs.append(self._pool.submit(write))

    def finish(self) -> dict[str, str]:
        """{kind: file name} of everything written, once all is written."""
        files: dict[str, str] = {}
        for job in self._jobs:
            files.update(job.result())
        return files

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def write_affine(matrix: Any, path: Path) -> None:
    """The affine as an ITK transform file, read back to check it was written whole."""
    transform = to_sitk_affine(matrix)
    try:
        sitk.WriteTransform(transform, str(path))
        back = sitk.ReadTransform(str(path))
    except (RuntimeError, OSError) as error:
        raise write_error(path, error) from error
    if not np.allclose(back.GetParameters(), transform.GetParameters()):
        raise write_error(path)


def write_json(path: Path, data: Any) -> None:
    """JSON with NaN written as null, numpy values as plain numbers (OutputError when it cannot be written)."""
    try:
        path.write_text(json.dumps(to_json(data), indent=2, allow_nan=False) + "\n")
    except OSError as error:
        raise write_error(path, error) from error


def versions() -> dict[str, str]:
    """Versions of Python and the packages a run depends on."""
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def device_description(device: torch.device) -> str:
    """The device in words (GPU name where there is one)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


__all__ = [
    "FILES", "MANIFEST", "BackgroundWriter", "output_files", "write_maps", "write_metrics", "write_registration", "device_description", "versions", "write_json", "write_result"]  # MANIFEST: read by batch.resume
