"""Orthogonal slices oriented for display, and checkerboards.

Display convention (radiological, the default of 3D Slicer's slice views):

- The array is first brought to *LPS-canonical* order ``C[x, y, z]``, where index ``x`` grows
  towards the patient's Left, ``y`` towards Posterior and ``z`` towards Superior. The image axis
  nearest to each LPS axis is taken from the direction matrix (the best of the six axis
  permutations, then a flip where the axis points the other way). Oblique grids are shown along
  their nearest axes, without resampling. Without a `Geometry` the direction is taken as the
  identity (ITK's default: i -> L, j -> P, k -> S).
- Axial view (a slice of constant z): anterior at the top, the patient's right on the viewer's
  left. Array shape ``(Y, X)``.
- Coronal view (constant y): superior at the top, the patient's right on the viewer's left.
  Shape ``(Z, X)``.
- Sagittal view (constant x): superior at the top, anterior on the viewer's left. Shape ``(Z, Y)``.

Each 2D view is meant for ``imshow(view, origin="upper")``; `orthogonal_aspects` gives the pixel
aspect ratio (height / width in mm) of each view.
"""

from __future__ import annotations

from itertools import permutations

import numpy as np

from JointRegSegLib.errors import InputError
from JointRegSegLib.imageio.geometry import Geometry

Index3 = tuple[int, int, int]


def lps_axis_map(direction: np.ndarray | None = None) -> tuple[Index3, Index3]:
    """For the L, P and S axes in turn: the array axis nearest to it and its sign (+1 or -1).

    ``direction`` holds the LPS unit vectors of the i, j, k axes in its columns (`Geometry`).
    """
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    best = max(permutations(range(3)), key=lambda p: sum(abs(d[a, p[a]]) for a in range(3)))
    signs = tuple(1 if d[a, best[a]] >= 0 else -1 for a in range(3))
    return tuple(best), signs


def to_lps_canonical(array: np.ndarray, geometry: Geometry | None = None) -> np.ndarray:
    """A view of ``array`` ([i, j, k, ...]) indexed [x, y, z, ...] growing towards L, P, S."""
    axes, signs = lps_axis_map(None if geometry is None else geometry.direction)
    canonical = np.transpose(array, axes + tuple(range(3, array.ndim)))
    for axis, sign in enumerate(signs):
        if sign < 0:
            canonical = np.flip(canonical, axis=axis)
    return canonical


def canonical_index(index: Index3, shape: Index3, geometry: Geometry | None = None) -> Index3:
    """The LPS-canonical position [x, y, z] of array index [i, j, k] (see `to_lps_canonical`)."""
    axes, signs = lps_axis_map(None if geometry is None else geometry.direction)
    return tuple(
        int(index[axes[a]]) if signs[a] > 0 else int(shape[axes[a]] - 1 - index[axes[a]]) for a in range(3)
    )


def default_index(array: np.ndarray) -> Index3:
    """The rounded centre of mass of the nonzero voxels of a 3D array, or its centre if all are zero.

    From the count of nonzero voxels in each plane along each axis (no list of their indices).
    """
    values = np.asarray(array)[..., 0] if array.ndim > 3 else np.asarray(array)
    nonzero = values != 0
    if np.issubdtype(values.dtype, np.floating):
        nonzero &= ~np.isnan(values)  # NaN counts as empty
    total = int(np.count_nonzero(nonzero))
    if total == 0:
        return tuple(int(n // 2) for n in array.shape[:3])
    centre = []
    for axis in range(3):
        per_plane = np.count_nonzero(nonzero, axis=tuple(a for a in range(3) if a != axis))
        centre.append(int(round(float(np.dot(per_plane.astype(np.float64), np.arange(nonzero.shape[axis]))) / total)))
    return tuple(centre)


def orthogonal_slices(
    array: np.ndarray, index: Index3 | None = None, geometry: Geometry | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial, coronal and sagittal 2D views through array index ``index`` ([i, j, k]).

    ``index`` defaults to `default_index` (centre of mass of the nonzero content). Trailing axes
    after the first three (e.g. RGB) are kept last. Orientation: see the module docstring.
    """
    array = np.asarray(array)
    if array.ndim < 3:
        raise InputError(f"orthogonal_slices needs a 3D array [i, j, k], got shape {array.shape}.")
    if geometry is not None and tuple(array.shape[:3]) != geometry.shape:
        raise InputError(f"array shape {array.shape[:3]} does not match the geometry's shape {geometry.shape}.")
    shape = tuple(array.shape[:3])
    if index is None:
        index = default_index(array)
    if len(index) != 3 or any(not 0 <= int(p) < n for p, n in zip(index, shape)):
        raise InputError(f"slice index {tuple(index)} is outside the array of shape {shape}.")
    x, y, z = canonical_index(tuple(index), shape, geometry)
    c = to_lps_canonical(array, geometry)
    axial = np.swapaxes(c[:, :, z], 0, 1)  # rows y (anterior first), columns x (right first)
    coronal = np.swapaxes(c[:, y, :], 0, 1)[::-1]  # rows z (superior first), columns x
    sagittal = np.swapaxes(c[x, :, :], 0, 1)[::-1]  # rows z (superior first), columns y (anterior first)
    return np.ascontiguousarray(axial), np.ascontiguousarray(coronal), np.ascontiguousarray(sagittal)


def orthogonal_aspects(geometry: Geometry | None = None) -> tuple[float, float, float]:
    """Pixel aspect (height / width, mm) of the axial, coronal and sagittal views; 1 without geometry."""
    if geometry is None:
        return 1.0, 1.0, 1.0
    axes, _ = lps_axis_map(geometry.direction)
    sx, sy, sz = (geometry.spacing[axes[a]] for a in range(3))
    return sy / sx, sz / sx, sz / sy


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternating tiles of ``a`` and ``b`` (same 2D or 3D shape), ``tiles`` tiles per axis.

    Voxel ``p`` along an axis of length ``n`` is in tile ``floor(p * tiles / n)``; the tile whose
    indices sum to an even number shows ``a``, an odd one ``b`` (so the first corner shows ``a``).
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"checkerboard needs two arrays of the same shape, got {a.shape} and {b.shape}.")
    if a.ndim not in (2, 3):
        raise InputError(f"checkerboard needs 2D or 3D arrays, got shape {a.shape}.")
    return np.where(tile_parity(a.shape, tiles) == 1, b, a)


def tile_parity(shape: tuple[int, ...], tiles: int = 8) -> np.ndarray:
    """Which image each voxel of a `checkerboard` shows (0: the first, 1: the second), as uint8: the parities of
    the voxel's tile along each axis added modulo 2 (one pass over the array, in one byte a voxel)."""
    if int(tiles) < 1:
        raise InputError(f"checkerboard needs at least one tile per axis, got tiles={tiles}.")
    parity = np.zeros((1,) * len(shape), dtype=np.uint8)
    for axis, n in enumerate(shape):
        tile = ((np.arange(n) * int(tiles)) // n % 2).astype(np.uint8)
        parity = parity ^ tile.reshape([-1 if d == axis else 1 for d in range(len(shape))])
    return parity
