"""The small sample pair bundled in Resources/SampleData, and how it is made from ../shared/data.

The demo and the tests use only this pair. It is ../shared/data/pair (two subjects' T1 scans with
FreeSurfer aseg labels, centre-of-mass aligned; see that folder's README for sources and licences)
cropped to the union of the two brains' bounding boxes plus a margin and downsampled to 2 mm
(linear for images, nearest for labels), with images stored as 8-bit. Rebuild it with
``jointregseg sample-data --data ../shared/data``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .imageio.geometry import Geometry, Volume
from .imageio.io import read_image, read_labels, write_volume
from .imageio.network_grid import resample
from .weights import resources_dir

FILES = {"fixed": "fixed_img.nii.gz", "fixed_seg": "fixed_seg.nii.gz", "moving": "moving_img.nii.gz", "moving_seg": "moving_seg.nii.gz"}
SPACING_MM = 2.0
MARGIN_MM = 6.0


def sample_dir() -> Path:
    """Resources/SampleData."""
    return resources_dir() / "SampleData"


def sample_pair() -> dict[str, Path]:
    """Paths of the bundled sample pair's images and label maps."""
    paths = {key: sample_dir() / name for key, name in FILES.items()}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise InputError(f"the bundled sample data is missing ({', '.join(missing)}); restore Resources/SampleData from the repository.")
    return paths


def build_sample_pair(data: Path, out: Path | None = None) -> dict[str, Path]:
    """Make the sample pair from ``data/pair`` (see the module docstring) and write it to ``out``."""
    out = out or sample_dir()
    source = data / "pair"
    if not source.is_dir():
        raise InputError(f"{source} does not exist: point --data at the shared data folder (../shared/data).")
    fixed, moving = read_image(source / FILES["fixed"]), read_image(source / FILES["moving"])
    fixed_seg, moving_seg = read_labels(source / FILES["fixed_seg"]), read_labels(source / FILES["moving_seg"])
    grid = _cropped_grid(fixed.geometry, (fixed_seg.array > 0) | (moving_seg.array > 0))
    out.mkdir(parents=True, exist_ok=True)
    volumes = {
        "fixed": _as_uint8(resample(fixed, grid)),
        "moving": _as_uint8(resample(moving, grid)),
        "fixed_seg": _as_uint8(resample(fixed_seg, grid, "nearest")),
        "moving_seg": _as_uint8(resample(moving_seg, grid, "nearest")),
    }
    paths = {}
    for key, volume in volumes.items():
        paths[key] = out / FILES[key]
        write_volume(volume, paths[key])
    return paths


def _cropped_grid(geometry: Geometry, foreground: np.ndarray) -> Geometry:
    """A SPACING_MM grid over the foreground's bounding box (plus MARGIN_MM), in the input's orientation."""
    index = np.argwhere(foreground)
    margin = MARGIN_MM / np.asarray(geometry.spacing)
    low = np.maximum(index.min(axis=0) - margin, 0)
    high = np.minimum(index.max(axis=0) + margin, np.asarray(geometry.shape) - 1)
    spacing = np.full(3, SPACING_MM)
    shape = np.floor((high - low) * np.asarray(geometry.spacing) / spacing).astype(int) + 1
    origin = geometry.index_to_physical(low)
    return Geometry(tuple(shape), tuple(spacing), tuple(origin), geometry.direction)


def _as_uint8(volume: Volume) -> Volume:
    """Images in [0, 1] to 0-255, label maps (codes <= 255) as they are, both stored as uint8."""
    array = volume.array
    if np.issubdtype(array.dtype, np.floating):
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0)
    if array.max() > 255:
        raise InputError("label codes above 255 cannot be stored in the 8-bit sample data.")
    return volume.with_array(array.astype(np.uint8))
