"""The grid networks work on (canonical RAS+, isotropic, shape a multiple of 16) and resampling to and from it."""

from __future__ import annotations

import itertools
import math

import numpy as np

from ..errors import InputError
from .geometry import Geometry, Volume

# Canonical RAS+ orientation written as an ITK (LPS) direction matrix: i -> R (-L), j -> A (-P), k -> S.
RAS_DIRECTION = np.diag([-1.0, -1.0, 1.0])
INTERPOLATIONS = ("linear", "nearest", "bspline")
# Extent a grid may exceed a whole number of voxels by through rounding and still count as that number.
_EXTENT_TOL_VOXELS = 1e-4
# Distance from a voxel centre (in voxels) below which a grid's centre counts as that voxel's (`_on_lattice`).
_LATTICE_TOL_VOXELS = 1e-6


def corner_points(geometry: Geometry) -> np.ndarray:
    """LPS positions (8, 3) of the centres of the grid's 8 corner voxels."""
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in geometry.shape])), dtype=np.float64)
    return geometry.index_to_physical(corners)


def network_geometry(
    geometry: Geometry,
    spacing: float = 1.0,
    multiple: int = 16,
    shape: tuple[int, int, int] | None = None,
) -> Geometry:
    """Axis-aligned RAS+ grid with isotropic ``spacing`` covering ``geometry``'s voxel centres, sharing their centre.

    Each dimension is the fewest voxels whose centres span the bounding box of the input's corner voxel
    centres, rounded up to a multiple of ``multiple``; ``shape`` overrides this (cropping or padding about
    the same centre).
    """
    if not spacing > 0:
        raise InputError(f"network grid spacing must be positive, got {spacing}.")
    if int(multiple) < 1:
        raise InputError(f"network grid multiple must be a positive integer, got {multiple}.")
    corners = corner_points(geometry) @ RAS_DIRECTION  # D^T x: coordinates along the network's axes
    low, high = corners.min(axis=0), corners.max(axis=0)
    if shape is None:
        voxels = [math.ceil(extent / spacing - _EXTENT_TOL_VOXELS) + 1 for extent in high - low]
        shape = tuple(int(multiple) * math.ceil(n / int(multiple)) for n in voxels)
    elif len(shape) != 3 or min(int(s) for s in shape) < 1:
        raise InputError(f"network grid shape must be three positive sizes, got {shape}.")
    half_span = spacing * (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    origin = RAS_DIRECTION @ ((low + high) / 2.0 - half_span)
    return Geometry(shape=tuple(shape), spacing=(spacing,) * 3, origin=origin, direction=RAS_DIRECTION)


def _resample_scalar(volume: Volume, geometry: Geometry, interpolation: str, default: float) -> np.ndarray:
    import SimpleITK as sitk  # here, so the network-grid geometry needs numpy alone (training on a GPU machine)

    from .sitk_bridge import from_sitk, reference_image, to_sitk

    interpolators = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}
    array = volume.array
    if interpolation != "nearest" and not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    if interpolation != "bspline":  # where every voxel centre is one of the volume's own: its values, moved
        moved = _on_lattice(array, volume.geometry, geometry, default)
        if moved is not None:  # never a view of the caller's array (the same grid, or within rounding of it)
            return moved.copy() if np.may_share_memory(moved, volume.array) else moved
    image = to_sitk(volume.with_array(array))
    resampled = sitk.Resample(
        image, reference_image(geometry), sitk.Transform(), interpolators[interpolation], float(default)
    )
    return from_sitk(resampled).array


def _on_lattice(array: np.ndarray, source: Geometry, target: Geometry, default: float) -> np.ndarray | None:
    """``array`` (on ``source``) at the voxel centres of ``target`` where each of them is a voxel centre of ``source``:
    both grids' axes the same up to order and sign, with the same spacings, and the origins a whole number of
    voxels apart (e.g. a scan stored LIA and the RAS network grid at its resolution). Linear and nearest-neighbour
    resampling give such a centre the voxel's own value, so the values are moved (axes transposed, flipped,
    cropped; ``default`` outside), not interpolated. None where the grids are not so related."""
    to_source = np.linalg.inv(source.direction @ np.diag(source.spacing))
    steps = to_source @ target.direction @ np.diag(target.spacing)  # target index step -> source index step
    axes = np.rint(steps)
    offset = to_source @ (np.asarray(target.origin) - np.asarray(source.origin))  # target index 0 in source indices
    first = np.rint(offset)
    if (
        np.abs(steps - axes).max() > _LATTICE_TOL_VOXELS
        or np.abs(offset - first).max() > _LATTICE_TOL_VOXELS
        or not (np.abs(axes).sum(axis=0) == 1).all()
        or not (np.abs(axes).sum(axis=1) == 1).all()
    ):
        return None
    order = [int(np.flatnonzero(axes[:, a])[0]) for a in range(3)]  # the source axis along each target axis
    taken, placed = [], []
    for a, p in enumerate(order):
        sign, start = int(axes[p, a]), int(first[p])
        index = start + sign * np.arange(target.shape[a])  # source index of each target index
        inside = np.flatnonzero((index >= 0) & (index < source.shape[p]))
        if inside.size == 0:
            return np.full(target.shape, default, dtype=array.dtype)
        low, high = int(inside[0]), int(inside[-1])
        placed.append(slice(low, high + 1))
        begin, end = int(index[low]), int(index[high])
        taken.append(slice(begin, end + 1) if sign > 0 else slice(begin, end - 1 if end > 0 else None, -1))
    moved = array.transpose(order)[tuple(taken)]
    if moved.shape == tuple(target.shape):
        return np.ascontiguousarray(moved)
    out = np.full(target.shape, default, dtype=array.dtype)
    out[tuple(placed)] = moved
    return out


def resample(volume: Volume, geometry: Geometry, interpolation: str = "linear", default: float = 0.0) -> Volume:
    """``volume`` sampled at the voxel centres of ``geometry`` (identity transform, ``default`` outside).

    ``interpolation`` is "linear", "nearest" (label maps; keeps the voxel type) or "bspline" (cubic).
    A vector volume ``(I, J, K, C)`` is resampled component by component.
    """
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"unknown interpolation '{interpolation}'; use one of {', '.join(INTERPOLATIONS)}.")
    if volume.array.ndim == 4:
        components = [
            _resample_scalar(volume.with_array(volume.array[..., c]), geometry, interpolation, default)
            for c in range(volume.array.shape[3])
        ]
        return Volume(np.stack(components, axis=-1), geometry)
    return Volume(_resample_scalar(volume, geometry, interpolation, default), geometry)


def to_network(volume: Volume, grid: Geometry, labels: bool = False) -> np.ndarray:
    """The volume's array on the network grid (linear for images, nearest for label maps)."""
    return resample(volume, grid, "nearest" if labels else "linear").array


def from_network(array: np.ndarray, grid: Geometry, target: Geometry, labels: bool = False) -> Volume:
    """An array on the network grid (scalar or ``(I, J, K, C)``) mapped back onto the user's grid ``target``."""
    if tuple(array.shape[:3]) != grid.shape:
        raise ValueError(f"array of shape {array.shape} is not on the network grid of shape {grid.shape}")
    return resample(Volume(array, grid), target, "nearest" if labels else "linear")
