"""Steps every network method shares: inputs onto the network grid, and a network field back to a `Result`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..imageio.geometry import Geometry, Volume
from ..imageio.intensity import normalise_intensity
from ..imageio.network_grid import network_geometry, to_network
from ..imageio.validate import check_overlap
from ..spatial.affine import index_affine_to_physical
from ..spatial.physical import mapped_coordinates, voxel_to_physical_field, warp_volume
from ..timing import Stopwatch
from .base import Inputs, Result


@dataclass
class NetworkPair:
    """Fixed and moving images (and label maps) resampled onto one network grid, as tensors (1, 1, I, J, K)."""

    grid: Geometry
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_seg: torch.Tensor | None = None
    moving_seg: torch.Tensor | None = None


def class_map(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """``scores.argmax(dim)``, the same indices (the first of equal maxima): with the classes moved
    last and contiguous, which torch's CPU argmax reduces several times faster than along an outer axis."""
    return scores.movedim(dim, -1).contiguous().argmax(dim=-1)


def prepare_pair(
    inputs: Inputs, device: torch.device, spacing: float = 1.0, shape: tuple[int, int, int] | None = None
) -> NetworkPair:
    """Resample both images onto the fixed image's network grid and normalise them to [0, 1].

    The moving image is resampled through physical space (identity transform), so the network sees
    both images in the same world coordinates; a network field is then directly a field on this grid.
    Images that hardly overlap in space are refused (`check_overlap`): the moving one would be empty.
    """
    check_overlap(inputs.fixed, inputs.moving)
    grid = network_geometry(inputs.fixed.geometry, spacing=spacing, shape=shape)

    def image(volume: Volume) -> torch.Tensor:
        array = normalise_intensity(to_network(volume, grid))
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)

    def labels(volume: Volume | None) -> torch.Tensor | None:
        if volume is None:
            return None
        return torch.from_numpy(to_network(volume, grid, labels=True).astype(np.int64))[None, None].to(device)

    return NetworkPair(grid, image(inputs.fixed), image(inputs.moving), labels(inputs.fixed_seg), labels(inputs.moving_seg))


def result_from_network_field(
    inputs: Inputs,
    grid: Geometry,
    disp: torch.Tensor,
    affine_index: np.ndarray | None = None,
    watch: Stopwatch | None = None,
) -> Result:
    """Turn a voxel displacement on the network grid (the whole mapping) into a `Result` on the fixed grid.

    The moving image (and its label map) are warped at their own resolution by the physical field,
    so the output is as sharp as the input allows. ``affine_index`` is the affine part alone, as a
    4x4 matrix on network-grid voxel indices (fixed index -> moving index), where there is one.
    ``watch`` times the ``field to fixed grid`` and ``warping`` steps (`timing`).
    """
    watch = watch or Stopwatch()
    with watch.step("field to fixed grid"):
        field = voxel_to_physical_field(disp.detach()[0].float(), grid, inputs.fixed.geometry)
    return result_from_physical_field(inputs, field, grid, affine_index, watch, disp.device)


def result_from_physical_field(
    inputs: Inputs, field: Volume, grid: Geometry, affine_index: np.ndarray | None = None, watch: Stopwatch | None = None,
    device: torch.device | str | None = None,
) -> Result:
    """A `Result` of the whole mapping given as a physical field on the fixed grid (see `result_from_network_field`)."""
    affine = index_affine_to_physical(affine_index, grid, grid) if affine_index is not None else None
    return result_from_field(inputs, field, affine, watch, device)


def result_from_field(
    inputs: Inputs, field: Volume, affine: np.ndarray | None = None, watch: Stopwatch | None = None,
    device: torch.device | str | None = None,
) -> Result:
    """A `Result` of a physical field on the fixed grid (the whole mapping): the moving image and its label map
    warped by it at their own resolution, both sampled at one set of mapped points (`mapped_coordinates`,
    on ``device``); timed as ``warping`` on ``watch``."""
    with (watch or Stopwatch()).step("warping"):
        return _warped_result(inputs, field, affine, device)


def _warped_result(inputs: Inputs, field: Volume, affine: np.ndarray | None, device: torch.device | str | None) -> Result:
    coordinates = mapped_coordinates(field, inputs.moving.geometry, device)
    warped = warp_volume(inputs.moving, field, coordinates=coordinates)
    warped_seg = None
    if inputs.moving_seg is not None:
        same_grid = inputs.moving_seg.geometry.same_as(inputs.moving.geometry)
        warped_seg = warp_volume(inputs.moving_seg, field, "nearest", coordinates=coordinates if same_grid else None)
    return Result(displacement=field, warped=warped, affine=affine, warped_seg=warped_seg)
