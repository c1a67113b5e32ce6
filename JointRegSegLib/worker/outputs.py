"""Writing a finished run into its (staging) output folder, and provenance."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from ..evaluation import Maps
from ..imageio.io import write_error, write_volume
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
    OutputError. ``watch`` times the images (``writing: images``), the field and the rest.
    """
    names = output_files(compress)
    watch = watch or Stopwatch()
    files: dict[str, str] = {}

    def volume(kind: str, vol: Any) -> None:
        if vol is not None:
            write_volume(vol, folder / names[kind], threads=threads)
            files[kind] = names[kind]

    with watch.step("writing: images"):
        volume("warped", result.warped)
    with watch.step("writing: displacement field"):
        write_displacement_field(result.displacement, folder / names["displacement"], threads=threads)
        files["displacement"] = names["displacement"]
    with watch.step("writing: images"):
        if maps is not None:
            volume("jacobian", maps.jacobian)
            volume("pmm", maps.pmm)
        for kind in ("fixed_seg", "moving_seg", "warped_seg", "brain_mask", "extracted"):
            volume(kind, getattr(result, kind))
    with watch.step("writing: affine and metrics"):
        if result.affine is not None:
            write_affine(result.affine, folder / names["affine"])
            files["affine"] = names["affine"]
        write_json(folder / names["metrics"], metrics)
        files["metrics"] = names["metrics"]
    return files


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


__all__ = ["FILES", "MANIFEST", "output_files", "device_description", "versions", "write_json", "write_result"]  # MANIFEST: read by batch.resume
