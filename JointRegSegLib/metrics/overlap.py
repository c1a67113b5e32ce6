"""Label overlap and surface distance: Dice per label, mean Dice, HD95 per label.

Label maps are integer arrays (or `Volume`s) on the same grid, 0 = background. By default the
labels scored are the union of the nonzero labels of both maps.

HD95 follows MONAI's ``HausdorffDistanceMetric(percentile=95)`` (symmetric, euclidean):
surface voxels are the label voxels removed by one binary erosion with the 6-connected cross
(outside the image counts as background); for each direction the distances (mm, using the voxel
spacing) from every surface voxel of one map to the nearest surface voxel of the other are
collected; HD95 is the larger of the two directed 95th percentiles (linear interpolation). A label
present in only one map gives ``inf`` (as MONAI). Each label is cropped to the bounding box of
its union before erosion, which changes nothing (the outside of the box holds no label voxel);
nearest distances come from a KD-tree over the surface voxels, as MONAI does on the CPU. The
30-structure brain evaluation at 160x192x224 takes 3-4 s on 2 shared CPU cores, mostly the
large white-matter and cortex surfaces.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.ndimage import binary_erosion
from scipy.spatial import cKDTree

from ..errors import InputError
from ..imageio.geometry import Volume
from .similarity import as_array


def _label_pair(a: np.ndarray | Volume, b: np.ndarray | Volume) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_array(a, "first label map"), as_array(b, "second label map")
    if a.shape != b.shape:
        raise InputError(f"label maps have different shapes {a.shape} and {b.shape}: resample them onto one grid first")
    for x in (a, b):
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.bool_)):
            raise InputError(f"label maps must hold integers, got {x.dtype}: round or cast the segmentation first")
    return a, b


def _labels(a: np.ndarray, b: np.ndarray, labels: Iterable[int] | None) -> list[int]:
    if labels is not None:
        return [int(label) for label in labels]
    return [int(label) for label in np.union1d(np.unique(a), np.unique(b)) if label != 0]


def dice_per_label(
    a: np.ndarray | Volume, b: np.ndarray | Volume, labels: Iterable[int] | None = None
) -> dict[int, float]:
    """Dice 2|A n B| / (|A| + |B|) per label; labels absent from both are omitted, in one only give 0."""
    a, b = _label_pair(a, b)
    scores: dict[int, float] = {}
    for label in _labels(a, b, labels):
        in_a, in_b = a == label, b == label
        total = int(np.count_nonzero(in_a)) + int(np.count_nonzero(in_b))
        if total:
            scores[label] = 2.0 * np.count_nonzero(in_a & in_b) / total
    return scores


def mean_dice(a: np.ndarray | Volume, b: np.ndarray | Volume, labels: Iterable[int] | None = None) -> float:
    """Mean Dice over the labels present in BOTH maps (NaN when there is none)."""
    a, b = _label_pair(a, b)
    chosen = _labels(a, b, labels)
    shared = [label for label in chosen if np.any(a == label) and np.any(b == label)]
    if not shared:
        return float("nan")
    return float(np.mean(list(dice_per_label(a, b, shared).values())))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(x for x in range(mask.ndim) if x != axis)))
        box.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(box)


def _surface_points(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Physical (index * spacing) coordinates of the voxels of ``mask`` that one erosion removes."""
    edges = mask & ~binary_erosion(mask)
    return np.argwhere(edges) * spacing


def _directed_p95(from_points: np.ndarray, to_points: np.ndarray) -> float:
    distances = cKDTree(to_points).query(from_points, k=1)[0]
    return float(np.percentile(distances, 95))


def hd95_per_label(
    a: np.ndarray | Volume,
    b: np.ndarray | Volume,
    spacing: Sequence[float],
    labels: Iterable[int] | None = None,
) -> dict[int, float]:
    """Symmetric 95th-percentile Hausdorff distance (mm) per label (module docstring).

    ``spacing`` is the voxel size along the array axes i, j, k. Labels absent from both maps are
    omitted; a label present in one map only gives ``inf``.
    """
    a, b = _label_pair(a, b)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (a.ndim,) or np.any(spacing_arr <= 0):
        raise InputError(f"spacing must be {a.ndim} positive numbers, got {tuple(spacing)}")
    distances: dict[int, float] = {}
    for label in _labels(a, b, labels):
        in_a, in_b = a == label, b == label
        union = in_a | in_b
        if not union.any():
            continue
        if not (in_a.any() and in_b.any()):
            distances[label] = float("inf")
            continue
        box = _bounding_box(union)
        pa, pb = _surface_points(in_a[box], spacing_arr), _surface_points(in_b[box], spacing_arr)
        distances[label] = max(_directed_p95(pa, pb), _directed_p95(pb, pa))
    return distances
