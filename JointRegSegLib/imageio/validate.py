"""Checks that an image or label map is something JointRegSeg can register; failures raise `InputError`.

``name`` in every check is how the message refers to the input, e.g. ``"fixed image 'x.nii.gz'"``.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .geometry import Geometry, Volume

# Two grids count as the same when they differ by no more than float32 header precision allows:
# spacing relatively, origin in mm relative to the voxel size, direction cosines absolutely.
_SPACING_RTOL = 1e-4
_ORIGIN_TOL_VOXELS = 1e-3
_DIRECTION_ATOL = 1e-4
_ORTHONORMAL_ATOL = 1e-4


def _array_of(volume: Volume | np.ndarray) -> np.ndarray:
    return volume.array if isinstance(volume, Volume) else np.asarray(volume)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def check_3d(volume: Volume | np.ndarray, name: str) -> None:
    """A single 3D scalar volume, at least two voxels along every axis."""
    array = _array_of(volume)
    shape = _shape_text(array.shape)
    if array.ndim != 3:
        raise InputError(
            f"{name} has {array.ndim} dimensions ({shape}); JointRegSeg needs a single 3D volume. "
            + (
                "Give a 3D scan rather than a single slice."
                if array.ndim < 3
                else "Extract one 3D volume (one time point or channel) first, e.g. with Slicer or fslroi."
            )
        )
    if min(array.shape) < 2:
        raise InputError(
            f"{name} is a single slice ({shape}); JointRegSeg needs a 3D volume with at least 2 voxels along "
            "every axis. Give the full 3D scan."
        )


def check_image(volume: Volume | np.ndarray, name: str) -> None:
    """A 3D intensity image: finite values that are not all zero and not all equal."""
    check_3d(volume, name)
    array = _array_of(volume)
    if not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{name} has voxel type {array.dtype}; JointRegSeg needs numeric intensities.")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{name} has complex voxel values; give a magnitude image instead.")
    check_finite(array, name)
    low, high = array.min(), array.max()
    if low == high:
        if low == 0:
            raise InputError(f"{name} is empty: all voxels are zero. Check that the right file was given.")
        raise InputError(
            f"{name} is constant (every voxel is {low}); there is nothing to register. "
            "Check that the right file was given."
        )


def check_finite(array: np.ndarray, name: str) -> None:
    """Every voxel is a finite number (no NaN, no inf)."""
    if not np.issubdtype(array.dtype, np.inexact):
        return
    finite = np.isfinite(array)
    if not finite.all():
        bad = array.size - int(finite.sum())
        kinds = " and ".join(
            kind for kind, present in (("NaN", np.isnan(array).any()), ("inf", np.isinf(array).any())) if present
        )
        raise InputError(
            f"{name} has {bad} non-finite voxels ({kinds}); JointRegSeg needs finite values. "
            "Replace them (e.g. by 0) before registering."
        )


def check_geometry(geometry: Geometry, name: str) -> None:
    """Positive finite voxel sizes, a finite origin and an orthonormal direction matrix (a rotation or reflection).

    ITK keeps a sheared direction matrix (NRRD, MetaImage) without complaint, but resampling through it
    puts the voxels elsewhere than a viewer shows them, so such an image is refused.
    """
    spacing = np.asarray(geometry.spacing)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{name} has voxel size(s) {_fmt(geometry.spacing)} mm; every voxel size must be a positive number.")
    if not np.all(np.isfinite(geometry.origin)):
        raise InputError(f"{name} has an origin of {_fmt(geometry.origin)} in its header; fix the header or export it again.")
    direction = geometry.direction
    if not np.all(np.isfinite(direction)) or not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_ATOL):
        raise InputError(
            f"{name} has a sheared (non-orthogonal) orientation matrix, which JointRegSeg and 3D Slicer cannot keep: its "
            "outputs would lie on another grid. Resample it onto an orthogonal grid first (e.g. Slicer's Resample Scalar Volume)."
        )


def check_labels(volume: Volume | np.ndarray, name: str) -> None:
    """A 3D label map: finite, integer-valued, non-negative, with at least one non-zero label."""
    check_3d(volume, name)
    array = _array_of(volume)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{name} has voxel type {array.dtype}; a label map needs integer labels.")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"{name} has NaN or inf values; a label map needs integer labels.")
        fractional = array != np.round(array)
        if fractional.any():
            example = float(array[fractional].flat[0])
            raise InputError(
                f"{name} has non-integer values (e.g. {example:g} in {int(fractional.sum())} voxels); a label map "
                "needs integer labels. Was an intensity image given as a label map?"
            )
    low, high = array.min(), array.max()
    if low < 0:
        raise InputError(f"{name} has negative labels (min {low}); label codes must be 0 (background) or positive.")
    if high > np.iinfo(np.int32).max:
        raise InputError(f"{name} has label {high}, larger than the largest supported code {np.iinfo(np.int32).max}.")
    if high == 0:
        raise InputError(f"{name} is empty: every voxel is background (0). Check that the right file was given.")


def _geometry_of(item: Volume | Geometry) -> Geometry:
    return item.geometry if isinstance(item, Volume) else item


def check_same_grid(a: Volume | Geometry, b: Volume | Geometry, names: tuple[str, str]) -> None:
    """``a`` and ``b`` lie on the same voxel grid (shape, spacing, origin, direction)."""
    ga, gb = _geometry_of(a), _geometry_of(b)
    differences = []
    if ga.shape != gb.shape:
        differences.append(f"shape {_shape_text(ga.shape)} vs {_shape_text(gb.shape)}")
    if not np.allclose(ga.spacing, gb.spacing, rtol=_SPACING_RTOL, atol=0.0):
        differences.append(f"spacing {_fmt(ga.spacing)} vs {_fmt(gb.spacing)} mm")
    origin_tol = _ORIGIN_TOL_VOXELS * min(min(ga.spacing), min(gb.spacing))
    if not np.allclose(ga.origin, gb.origin, rtol=0.0, atol=origin_tol):
        differences.append(f"origin {_fmt(ga.origin)} vs {_fmt(gb.origin)} mm")
    if not np.allclose(ga.direction, gb.direction, rtol=0.0, atol=_DIRECTION_ATOL):
        differences.append("direction (orientation) differs")
    if differences:
        raise InputError(
            f"{names[0]} and {names[1]} are not on the same voxel grid ({'; '.join(differences)}). "
            f"Resample {names[0]} onto the grid of {names[1]} (nearest neighbour for label maps) first."
        )


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def content_box(volume: Volume, threshold: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """LPS bounding box (low, high corners, mm) of the voxels brighter than ``threshold`` of the image's
    0.5-99.5 percentile range, voxel extents included (the whole grid when nothing is brighter)."""
    array = volume.array
    step = max(1, array.size // 500_000)
    low, high = np.percentile(array.ravel()[::step], [0.5, 99.5])
    bright = array > low + threshold * (high - low) if high > low else array > low
    if not bright.any():
        bright = np.ones(array.shape, dtype=bool)
    first = [int(np.argmax(bright.any(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3)]
    last = [array.shape[axis] - 1 - int(np.argmax(bright.any(axis=tuple(a for a in range(3) if a != axis))[::-1])) for axis in range(3)]
    corners = np.array([[(f - 0.5, l + 0.5)[bit] for f, l, bit in zip(first, last, bits)] for bits in np.ndindex(2, 2, 2)])
    points = volume.geometry.index_to_physical(corners)
    return points.min(axis=0), points.max(axis=0)


def check_overlap(fixed: Volume, moving: Volume, minimum: float = 0.1) -> None:
    """The two images' contents share space: their bounding boxes (`content_box`) overlap by at least
    ``minimum`` of the smaller box's volume, else the moving image, resampled onto the fixed grid, is empty."""
    (fl, fh), (ml, mh) = content_box(fixed), content_box(moving)
    shared = float(np.prod(np.clip(np.minimum(fh, mh) - np.maximum(fl, ml), 0.0, None)))
    smaller = min(float(np.prod(fh - fl)), float(np.prod(mh - ml)))
    if shared < minimum * smaller:
        raise InputError(
            f"the fixed and moving images hardly overlap in space ({100 * shared / smaller:.0f}% of the smaller image's "
            f"content lies inside the other's; content centres {_fmt((fl + fh) / 2)} and {_fmt((ml + mh) / 2)} mm). Check "
            "their origins and orientations (a header with a far-away origin or a flipped axis), or centre them first "
            "(e.g. in 3D Slicer)."
        )
