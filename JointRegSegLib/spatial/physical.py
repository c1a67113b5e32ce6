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
from .affine import normaliser, to_sitk_affine
from .sampling import grid_sample_3d
from .separable import sample_separable


def _index_map(source: Geometry, target: Geometry) -> np.ndarray:
    """4x4 taking a voxel index of ``source`` to the continuous index of the same point in ``target``."""
    return target.physical_to_index_matrix @ source.index_to_physical_matrix


def _sampling_grid(
    shape: Sequence[int], matrix: np.ndarray, source_shape: Sequence[int], device: torch.device | str | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """``grid_sample`` coordinates ``(1, I, J, K, 3)`` of the source index ``matrix @ (p, 1)`` for every voxel ``p`` of a grid of ``shape``.

    The coordinates are normalised for a source of ``source_shape`` (``align_corners=True``) and
    ordered ``(x, y, z) = (k, j, i)``, as `spatial.warp` does, computed once in float32 (no
    intermediate index arrays). Also returns the 3x3 taking a source index step to a coordinate step.
    """
    n = normaliser(source_shape)[0]
    return _mapped_indices(shape, n @ matrix, device)[None], n[:3, :3]


def _mapped_indices(shape: Sequence[int], matrix: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """``matrix @ (p, 1)`` (its first three rows) for every voxel ``p`` of a grid of ``shape``, float32 ``(I, J, K, 3)``."""
    m = torch.as_tensor(matrix, dtype=torch.float32, device=device)
    i, j, k = (torch.arange(int(size), dtype=torch.float32, device=device) for size in shape)
    return m[:3, 3] + i[:, None, None, None] * m[:3, 0] + j[None, :, None, None] * m[:3, 1] + k[None, None, :, None] * m[:3, 2]


def _sample(image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """``image (B, C, I, J, K)`` at the normalised coordinates ``grid (B, I', J', K', 3)`` of `_sampling_grid`."""
    return grid_sample_3d(image, grid, mode, padding_mode)


def _resampled(values: torch.Tensor, matrix: np.ndarray, shape: Sequence[int], mode: str, padding_mode: str) -> torch.Tensor:
    """``values (B, C, *source)`` at every voxel ``p`` of a grid of ``shape``, at the source index ``matrix @ (p, 1)``:
    linear sampling between axis-aligned grids in three 1-D passes (`separable`), anything else by ``grid_sample``."""
    if mode == "bilinear":
        sampled = sample_separable(values, matrix, shape, padding_mode)
        if sampled is not None:
            return sampled
    coordinates = _sampling_grid(shape, matrix, values.shape[2:], values.device)[0]
    return _sample(values, coordinates.expand(values.shape[0], -1, -1, -1, -1).to(values.dtype), mode, padding_mode)


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
    Sampled on ``disp``'s device (a GPU's where the network ran); the field comes back to the CPU.
    """
    disp = torch.as_tensor(disp).detach().float()
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
        u_idx = _resampled(disp[None], _index_map(fixed, grid), fixed.shape, "bilinear", "border")[0]
    return grid_steps_to_physical(u_idx.permute(1, 2, 3, 0), grid, fixed)


def sample_on(
    values: torch.Tensor, source: Geometry, target: Geometry, mode: str = "bilinear", padding_mode: str = "zeros",
    rows: slice | None = None,
) -> torch.Tensor:
    """``values (1, C, *source.shape)`` sampled at the voxel centres of ``target`` in one ``grid_sample``
    pass: ``(1, C, *target.shape)``, or only the planes ``rows`` of ``target`` along i (``mode``
    "bilinear" or "nearest", ``padding_mode`` "zeros" or "border", as `spatial.warp`). Stays on ``values``'s device."""
    start, stop, _ = (rows or slice(0, target.shape[0])).indices(target.shape[0])
    offset = np.eye(4)
    offset[0, 3] = start
    shape = (stop - start, *target.shape[1:])
    return _resampled(values, _index_map(target, source) @ offset, shape, mode, padding_mode)


def grid_indices_of(fixed: Geometry, grid: Geometry) -> torch.Tensor:
    """The continuous index on ``grid`` of every voxel of ``fixed``, float32 ``(I, J, K, 3)``."""
    return _mapped_indices(fixed.shape, _index_map(fixed, grid))


def grid_steps_to_physical(u_idx: torch.Tensor, grid: Geometry, fixed: Geometry) -> Volume:
    """The LPS mm field on ``fixed`` of displacements ``u_idx (I, J, K, 3)`` given in voxels of ``grid``, at fixed's voxels."""
    linear = torch.as_tensor(_linear_part(grid), dtype=torch.float32, device=u_idx.device)
    u_phys = (u_idx.detach().float() @ linear.T).cpu()
    return Volume(np.ascontiguousarray(u_phys.numpy(), dtype=np.float32), fixed)


def regrid_voxel_field(disp: torch.Tensor, source: Geometry, target: Geometry) -> torch.Tensor:
    """A voxel displacement ``disp (B, 3, I, J, K)`` on grid ``source`` as a voxel displacement on grid ``target``.

    The physical displacement ``direction @ diag(spacing) @ u`` of ``source`` is interpolated
    trilinearly at each ``target`` voxel's point (edge values outside ``source``) and expressed in
    voxels of ``target``. Differentiable; stays on ``disp``'s device.
    """
    if disp.ndim != 5 or disp.shape[1] != 3 or tuple(disp.shape[2:]) != source.shape:
        raise InputError(
            f"the voxel displacement field must have shape (B, 3, {', '.join(map(str, source.shape))}) to match its grid; "
            f"got {tuple(disp.shape)}"
        )
    if source.same_as(target):
        return disp
    sampled = _resampled(disp, _index_map(target, source), target.shape, "bilinear", "border")
    to_target = np.linalg.inv(_linear_part(target)) @ _linear_part(source)
    return torch.einsum("rc,bcijk->brijk", torch.as_tensor(to_target, dtype=disp.dtype, device=disp.device), sampled)


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
        u_phys = _resampled(values[None], _index_map(grid, field.geometry), grid.shape, "bilinear", "border")[0]
    inverse = torch.as_tensor(np.linalg.inv(_linear_part(grid)), dtype=torch.float32)
    return torch.einsum("rc,cijk->rijk", inverse, u_phys).contiguous()


def mapped_coordinates(field: Volume, moving: Geometry, device: torch.device | str | None = None) -> torch.Tensor:
    """``grid_sample`` coordinates ``(1, I, J, K, 3)``, normalised for ``moving``, of the mapped point
    ``x + u(x)`` of every voxel ``x`` of a physical field's (fixed) grid: what `warp_volume` samples at,
    computed once (on ``device``) for an image and its label map alike."""
    _check_physical_field(field)
    coordinates, index_to_coordinate = _sampling_grid(field.geometry.shape, _index_map(field.geometry, moving), moving.shape, device)
    u = torch.as_tensor(np.asarray(field.array, dtype=np.float32)).to(coordinates.device)
    mm_to_coordinate = torch.as_tensor(
        index_to_coordinate @ np.linalg.inv(_linear_part(moving)), dtype=torch.float32, device=coordinates.device
    )
    return coordinates.add_(u @ mm_to_coordinate.T)


def warp_volume(
    moving: Volume, field: Volume, interpolation: str = "linear", default: float = 0.0, coordinates: torch.Tensor | None = None
) -> Volume:
    """Warp a moving `Volume` (on its own grid) by a physical field: ``out(x) = moving(x + u(x))``.

    The output lies on the field's (fixed) grid. The moving image is sampled at the continuous index
    ``moving.geometry.physical_to_index(x + u(x))`` by ``grid_sample``; ``interpolation`` is
    ``"linear"`` (float32 output) or ``"nearest"`` (label maps; integer and boolean dtypes are kept,
    sampled directly, without a one-hot map). Outside the moving image the value blends to
    ``default`` as a linear sample with zero padding would blend to 0. Arrays with components last
    (``(I, J, K, C)``) are warped component by component. ``coordinates``: `mapped_coordinates` of
    ``field`` for ``moving``'s grid, where already at hand (the sampling runs on their device).
    """
    _check_physical_field(field)
    modes = {"linear": "bilinear", "nearest": "nearest"}
    if interpolation not in modes:
        raise InputError(f"interpolation must be 'linear' or 'nearest'; got {interpolation!r}")
    array = np.asarray(moving.array)
    if array.ndim not in (3, 4):
        raise InputError(f"the moving image must be a 3D array (or 3D with components last); got shape {array.shape}")
    if coordinates is None:
        coordinates = mapped_coordinates(field, moving.geometry)
    image = torch.as_tensor(array.astype(np.float32) - np.float32(default)).to(coordinates.device)
    image = image[None, None] if array.ndim == 3 else image.permute(3, 0, 1, 2)[None]
    out = _sample(image, coordinates, modes[interpolation], "zeros")[0] + float(default)
    out = out[0] if array.ndim == 3 else out.permute(1, 2, 3, 0)
    result = out.cpu().numpy()
    if interpolation == "nearest" and (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        result = result.astype(array.dtype)
    return Volume(np.ascontiguousarray(result), field.geometry)


def warp_volume_affine(
    moving: Volume, matrix: np.ndarray, target: Geometry, interpolation: str = "linear", default: float = 0.0
) -> Volume:
    """``out(x) = moving(M x)`` at the voxel centres of ``target`` for an LPS affine ``M`` (fixed point -> moving point):
    `warp_volume` by ``M``'s displacement field, done by SimpleITK's resampling (threaded, without a field or a
    sampling grid in memory: a fraction of ``grid_sample``'s time on a 1 mm grid). The same values but within half
    a voxel outside the moving image's edge voxels, which ITK gives the edge value (`warp_volume` blends towards
    ``default``), and at exact nearest-neighbour ties (ITK rounds halves up). Linear output is float32;
    nearest keeps the voxel type."""
    import SimpleITK as sitk  # here, so the rest of this module needs torch alone

    from ..imageio.sitk_bridge import from_sitk, reference_image, to_sitk

    modes = {"linear": (sitk.sitkLinear, sitk.sitkFloat32), "nearest": (sitk.sitkNearestNeighbor, sitk.sitkUnknown)}
    if interpolation not in modes:
        raise InputError(f"interpolation must be 'linear' or 'nearest'; got {interpolation!r}")
    interpolator, pixel_type = modes[interpolation]
    array = np.asarray(moving.array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = to_sitk(moving.with_array(array))
    resampled = sitk.Resample(image, reference_image(target), to_sitk_affine(matrix), interpolator, float(default), pixel_type)
    out = from_sitk(resampled).array
    return Volume(out.astype(moving.array.dtype) if moving.array.dtype == bool else out, target)
