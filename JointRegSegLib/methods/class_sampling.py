"""A network's class probabilities brought onto a scan's grid: interpolated, then the argmax (`argmax_on`).

nnU-Net brings its segmentation back to the scan this way (the probabilities resampled, then the argmax),
not by copying the coarse labels by nearest neighbour, which leaves steps of the network grid's voxel size
(hof on the benchmark pair, 3 mm grid, Dice over its 28 structures: 0.612 / 0.596 by nearest neighbour, 0.631 /
0.611 so; jers' tissues on the pair's fixed scan 0.602 -> 0.609). Interpolating every class at every voxel of a
1 mm head costs seconds with many classes (hof's 29), so beyond `FEW_CLASSES` the same labels are found from
bounds that hold inside each cell of the network grid (the box between 8 neighbouring grid voxels, found for every
voxel of the scan by one nearest-neighbour resampling of a grid of cells), where the trilinear interpolation is a
convex combination of the 8 corners:

- if all 8 corners rank one class first, every point of the cell ranks it first (eq. a);
- else the winner ``w`` at a point ``x`` satisfies ``max_corners p_w >= p_w(x) >= max_j p_j(x) >= max_j
  min_corners p_j``, so only classes whose maximum over the corners reaches the largest minimum can win
  (eq. b: the cell's candidates, 2.7 on average in hof's mixed cells);

and only the candidates (at most ``candidates`` of them) are interpolated; cells with more, and points off the
grid (zero there), interpolate every class.
"""

from __future__ import annotations

import numpy as np
import torch

from ..imageio.geometry import Geometry, Volume
from ..imageio.network_grid import resample
from ..spatial.physical import sample_on
from ..spatial.warp import sample_at_indices
from .common import class_map

FEW_CLASSES = 8
"""Up to this many classes `argmax_on` interpolates every class everywhere (on 2 cores, hof's 29 classes: 2.8 s a
1 mm head that way, 1.0-1.5 s by cells; jers' 4 tissue classes, whose 3 mm cells are mostly mixed: 1.0 s against 4)."""
_CORNERS = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]


def _cell_geometry(grid: Geometry) -> Geometry:
    """The grid of ``grid``'s cells: a voxel per cell, centred between its 8 corners (nearest sampling on it finds the
    cell a point lies in)."""
    inner = tuple(n - 1 for n in grid.shape)
    return Geometry(shape=inner, spacing=grid.spacing, origin=tuple(grid.index_to_physical(np.full(3, 0.5))), direction=grid.direction)


def _first_classes(probabilities: torch.Tensor) -> torch.Tensor:
    """Per cell ``(I-1, J-1, K-1)``: the class all 8 corners rank first (eq. a), else -1."""
    inner = [n - 1 for n in probabilities.shape[1:]]
    labels = class_map(probabilities, 0)
    first = labels[: inner[0], : inner[1], : inner[2]]
    agree = torch.ones_like(first, dtype=torch.bool)
    for a, b, c in _CORNERS[1:]:
        agree &= labels[a : a + inner[0], b : b + inner[1], c : c + inner[2]] == first
    return torch.where(agree, first, -1)


def _candidates(probabilities: torch.Tensor, cells: torch.Tensor, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The classes that can win in each of the ``cells (M, 3)`` (eq. b), ``(M, candidates)``, the largest corner
    maximum first, -1 past the last (all -1 where more than ``candidates`` can win); and their values at the cell's
    corners, ``(M, candidates, 8)`` in the order of `_CORNERS`."""
    _, n_j, n_k = probabilities.shape[1:]
    first_corner = (cells[:, 0] * n_j + cells[:, 1]) * n_k + cells[:, 2]
    offsets = torch.tensor([(a * n_j + b) * n_k + c for a, b, c in _CORNERS], device=cells.device)
    flat = (first_corner[:, None] + offsets).flatten()  # (M * 8) voxel numbers, every cell's corners in turn
    corners = probabilities.flatten(1).index_select(1, flat).view(len(probabilities), len(cells), len(_CORNERS))
    upper, lower = corners.amax(dim=-1), corners.amin(dim=-1)  # (C, M)
    can_win = upper >= lower.amax(dim=0, keepdim=True)  # eq. b
    top = torch.where(can_win, upper, -1.0).topk(min(candidates, probabilities.shape[0]), dim=0)
    chosen = torch.where(top.values >= 0, top.indices, -1)
    chosen[:, can_win.sum(dim=0) > candidates] = -1
    values = corners.gather(0, top.indices[..., None].expand(-1, -1, len(_CORNERS)))
    return chosen.T, values.permute(1, 0, 2)


def _corner_weights(t: torch.Tensor) -> torch.Tensor:
    """Trilinear weights ``(N, 8)`` (`_CORNERS` order) of points at offsets ``t (N, 3)`` in their cells."""
    i, j, k = ((1 - t[:, axis], t[:, axis]) for axis in range(3))
    return torch.stack([i[a] * j[b] * k[c] for a, b, c in _CORNERS], dim=-1)


def argmax_on(probabilities: torch.Tensor, grid: Geometry, target: Geometry, slab: int = 32) -> torch.Tensor:
    """The class (``argmax``) at every voxel of ``target`` of ``probabilities (C, *grid.shape)`` interpolated
    trilinearly there, zero off ``grid`` (where class 0, the background, comes first of equals); int16
    ``target.shape`` on the probabilities' device. Up to `FEW_CLASSES` classes every class is interpolated at every
    voxel (``slab`` planes of ``target`` at a time), beyond by cells (module docstring): the same labels."""
    probabilities = probabilities.detach().float()
    if probabilities.shape[0] > FEW_CLASSES and min(grid.shape) > 1:
        return _argmax_by_cells(probabilities, grid, target)
    out = torch.empty(target.shape, dtype=torch.int16, device=probabilities.device)
    for start in range(0, target.shape[0], slab):
        rows = slice(start, min(start + slab, target.shape[0]))
        out[rows] = class_map(sample_on(probabilities[None], grid, target, rows=rows)[0], 0)
    return out


def _argmax_by_cells(probabilities: torch.Tensor, grid: Geometry, target: Geometry, candidates: int = 4) -> torch.Tensor:
    """`argmax_on` by the bounds of eq. a and b, interpolating at most ``candidates`` classes per point."""
    device = probabilities.device
    first = _first_classes(probabilities)
    on_target = resample(Volume(first.cpu().numpy().astype(np.int16), _cell_geometry(grid)), target, "nearest", default=-1)
    found = torch.from_numpy(on_target.array).to(device)  # int16: the class of each voxel, -1 in a mixed cell
    mixed = (first < 0).nonzero()
    row = torch.full(first.shape, -1, dtype=torch.int64, device=device)
    row[mixed[:, 0], mixed[:, 1], mixed[:, 2]] = torch.arange(len(mixed), device=device)
    chosen, corner_values = _candidates(probabilities, mixed, candidates)
    voxels = (found < 0).nonzero()
    to_grid = torch.as_tensor(grid.physical_to_index_matrix @ target.index_to_physical_matrix, dtype=torch.float32, device=device)
    points = voxels.float() @ to_grid[:3, :3].T + to_grid[:3, 3]
    last = torch.tensor(grid.shape, dtype=torch.float32, device=device) - 1
    resolved = torch.full(points.shape[:1], -1, dtype=torch.int64, device=device)
    index = ((points >= 0) & (points <= last)).all(dim=-1).nonzero()[:, 0]
    cells = torch.minimum(points[index].floor(), last - 1)
    rows = row[cells[:, 0].long(), cells[:, 1].long(), cells[:, 2].long()]
    keep = rows >= 0  # else a cell of one class that the nearest search missed by rounding
    keep[keep.clone()] = chosen[rows[keep], 0] >= 0  # else more classes can win than are interpolated
    rows, index, cells = rows[keep], index[keep], cells[keep]
    corners_of_rows = corner_values.flatten(1).index_select(0, rows).view(-1, *corner_values.shape[1:])  # faster than [rows]
    value = torch.bmm(corners_of_rows, _corner_weights(points[index] - cells)[:, :, None])[:, :, 0]
    classes = chosen[rows]
    value[classes < 0] = -1.0
    resolved[index] = classes.gather(1, value.argmax(dim=1, keepdim=True))[:, 0]
    rest = resolved < 0
    if rest.any():
        every = sample_at_indices(probabilities[None], points[rest][None, :, None, None])[0, :, :, 0, 0]
        resolved[rest] = class_map(every, 0)
    found[voxels[:, 0], voxels[:, 1], voxels[:, 2]] = resolved.to(found.dtype)
    return found
