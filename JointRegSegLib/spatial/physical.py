"""Conversion between voxel displacements on a network grid and physical (LPS, mm) fields.

A physical displacement field is a `Volume` with array ``(I, J, K, 3)`` float32 on the fixed
image's grid: the fixed point ``x`` maps to ``x + u(x)`` in the moving image (ITK's
``DisplacementFieldTransform`` convention).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputError
from ..imageio.geometry import Geometry, Volume
from .warp import sample_at_indices


def _index_map(source: Geometry, target: Geometry) -> np.ndarray:
    """4x4 taking a voxel index of ``source`` to the continuous index of the same point in ``target``."""
    return target.physical_to_index_matrix @ source.index_to_physical_matrix


def _mapped_indices(shape: Sequence[int], matrix: np.ndarray) -> torch.Tensor:
    """``matrix @ (p, 1)`` for every voxel ``p`` of a grid of ``shape``, as float32 ``(I, J, K, 3)``."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    i, j, k = (torch.arange(int(n), dtype=torch.float64) for n in shape)
    points = (
        m[:3, 3]
        + i[:, None, None, None] * m[:3, 0]
        + j[None, :, None, None] * m[:3, 1]
        + k[None, None, :, None] * m[:3, 2]
    )
    return points.float()


def _linear_part(grid: Geometry) -> np.ndarray:
    """``direction @ diag(spacing)``: voxel steps to LPS mm."""
    return grid.direction @ np.diag(grid.spacing)


def _check_physical_field(field: Volume) -> None:
    if field.array.ndim != 4 or field.array.shape[3] != 3:
        raise InputError(
            f"a physical displacement field needs an (I, J, K, 3) array; got shape {field.array.shape}"
        )


def voxel_to_physical_field(disp: torch.Tensor | np.ndarray, grid: Geometry, fixed: Geometry) -> Volume:
    """The LPS mm displacement field on the ``fixed`` grid of a voxel field ``disp (3, I, J, K)`` on ``grid``.

    ``disp`` is in voxels of the network grid ``grid`` onto which both fixed and moving images were
    resampled. For each fixed voxel ``x``: ``c`` = its index on ``grid``, ``u_idx`` = ``disp``
    interpolated trilinearly at ``c`` (edge values outside ``grid``), ``u = direction @ diag(spacing) @ u_idx``
    of ``grid`` (the network point ``c`` maps to ``c + u_idx``, i.e. ``x`` maps to ``x + u``).
    """
    disp = torch.as_tensor(disp).detach().cpu().float()
    if disp.ndim == 5 and disp.shape[0] == 1:
        disp = disp[0]
    if disp.ndim != 4 or disp.shape[0] != 3 or tuple(disp.shape[1:]) != grid.shape:
        raise InputError(
            f"the voxel displacement field must have shape (3, {', '.join(map(str, grid.shape))}) "
            f"to match the network grid; got {tuple(disp.shape)}"
        )
    if fixed.same_as(grid):
        u_idx = disp
    else:
        indices = grid_indices_of(fixed, grid)
        u_idx = sample_at_indices(disp[None], indices[None], mode="bilinear", padding_mode="border")[0]
    return grid_steps_to_physical(u_idx.permute(1, 2, 3, 0), grid, fixed)


def grid_indices_of(fixed: Geometry, grid: Geometry) -> torch.Tensor:
    """The continuous index on ``grid`` of every voxel of ``fixed``, float32 ``(I, J, K, 3)``."""
    return _mapped_indices(fixed.shape, _index_map(fixed, grid))


def grid_steps_to_physical(u_idx: torch.Tensor, grid: Geometry, fixed: Geometry) -> Volume:
    """The LPS mm field on ``fixed`` of displacements ``u_idx (I, J, K, 3)`` given in voxels of ``grid``, at fixed's voxels."""
    linear = torch.as_tensor(_linear_part(grid), dtype=torch.float32)
    u_phys = u_idx.detach().cpu().float() @ linear.T
    return Volume(np.ascontiguousarray(u_phys.numpy(), dtype=np.float32), fixed)


def physical_to_voxel_field(field: Volume, grid: Geometry) -> torch.Tensor:
    """The voxel field ``(3, I, J, K)`` on the network ``grid`` of a physical field (inverse of `voxel_to_physical_field`).

    The field is resampled trilinearly at each network voxel's physical point (edge values outside
    the field's grid) and expressed in voxels: ``u_idx = (direction @ diag(spacing))^-1 @ u``.
    """
    _check_physical_field(field)
    values = torch.as_tensor(np.asarray(field.array, dtype=np.float32)).permute(3, 0, 1, 2)
    if field.geometry.same_as(grid):
        u_phys = values
    else:
        indices = _mapped_indices(grid.shape, _index_map(grid, field.geometry))
        u_phys = sample_at_indices(values[None], indices[None], mode="bilinear", padding_mode="border")[0]
    inverse = torch.as_tensor(np.linalg.inv(_linear_part(grid)), dtype=torch.float32)
    return torch.einsum("rc,cijk->rijk", inverse, u_phys).contiguous()


def warp_volume(moving: Volume, field: Volume, interpolation: str = "linear", default: float = 0.0) -> Volume:
    """Warp a moving `Volume` (on its own grid) by a physical field: ``out(x) = moving(x + u(x))``.

    The output lies on the field's (fixed) grid. The moving image is sampled at the continuous index
    ``moving.geometry.physical_to_index(x + u(x))`` by ``grid_sample``; ``interpolation`` is
    ``"linear"`` (float32 output) or ``"nearest"`` (label maps; integer and boolean dtypes are kept). Outside the
    moving image the value blends to ``default`` as a linear sample with zero padding would blend to 0.
    Arrays with components last (``(I, J, K, C)``) are warped component by component.
    """
    _check_physical_field(field)
    modes = {"linear": "bilinear", "nearest": "nearest"}
    if interpolation not in modes:
        raise InputError(f"interpolation must be 'linear' or 'nearest'; got {interpolation!r}")
    array = np.asarray(moving.array)
    if array.ndim not in (3, 4):
        raise InputError(f"the moving image must be a 3D array (or 3D with components last); got shape {array.shape}")
    to_moving = _index_map(field.geometry, moving.geometry)
    indices = _mapped_indices(field.geometry.shape, to_moving)
    u = torch.as_tensor(np.asarray(field.array, dtype=np.float32))
    mm_to_moving_index = torch.as_tensor(np.linalg.inv(_linear_part(moving.geometry)), dtype=torch.float32)
    indices = indices + u @ mm_to_moving_index.T
    image = torch.as_tensor(array.astype(np.float32) - np.float32(default))
    image = image[None, None] if array.ndim == 3 else image.permute(3, 0, 1, 2)[None]
    out = sample_at_indices(image, indices[None], mode=modes[interpolation], padding_mode="zeros")[0] + float(default)
    out = out[0] if array.ndim == 3 else out.permute(1, 2, 3, 0)
    result = out.numpy()
    if interpolation == "nearest" and (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        result = result.astype(array.dtype)
    return Volume(np.ascontiguousarray(result), field.geometry)
