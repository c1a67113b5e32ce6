"""Trilinear sampling between axis-aligned grids as three 1-D passes.

Where each index axis of the source grid follows one index axis of the target grid (a scaled, possibly
flipped permutation, as between the network grid and a fixed image stored in an axis-aligned
orientation), the trilinear weight of a source voxel is the product of three 1-D linear weights, one
per axis. Sampling then factorises into three 1-D interpolations, each a gather of two neighbouring
planes and a blend, at the cost of a few passes over the output instead of ``grid_sample``'s eight
corner reads per point. The values are ``grid_sample``'s (bilinear, ``align_corners=True``, zero or
border padding) up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

PADDINGS = ("zeros", "border")
# An off-axis coefficient counts as zero where it moves a point by less than this over the whole grid (voxels).
_OFF_AXIS_TOL_VOXELS = 1e-4


def axis_pairing(matrix: np.ndarray, target_shape: Sequence[int]) -> tuple[int, int, int] | None:
    """For a 4x4 map of target voxel indices to source voxel indices: the target axis each source axis
    follows, or None where a source axis depends on two target axes (an oblique or sheared map)."""
    linear = np.asarray(matrix, dtype=np.float64)[:3, :3]
    extent = np.maximum(np.asarray(target_shape, dtype=np.float64) - 1.0, 1.0)
    on_axis = np.abs(linear) * extent[None, :] >= _OFF_AXIS_TOL_VOXELS
    if not (on_axis.sum(axis=0) == 1).all() or not (on_axis.sum(axis=1) == 1).all():
        return None
    return tuple(int(np.flatnonzero(row)[0]) for row in on_axis)


def linear_weights(x: torch.Tensor, n: int, padding: str, dtype: torch.dtype) -> torch.Tensor:
    """The ``(n, len(x))`` matrix of 1-D linear interpolation at the continuous indices ``x`` of an axis of ``n``
    voxels: column ``t`` holds ``1 - w`` at ``floor x_t`` and ``w = x_t - floor x_t`` at ``floor x_t + 1``; a
    neighbour outside the axis weighs 0 (``padding="zeros"``), or ``x`` is clamped to the axis (``"border"``)."""
    if padding == "border":
        x = x.clamp(0, n - 1)
    low = x.floor()
    w_high = x - low
    low = low.long()
    columns = torch.arange(x.shape[0], device=x.device)
    weights = torch.zeros((n, x.shape[0]), dtype=torch.float64, device=x.device)
    for index, weight in ((low, 1 - w_high), (low + 1, w_high)):
        inside = (index >= 0) & (index < n)
        weights.index_put_((index.clamp(0, n - 1)[inside], columns[inside]), weight[inside], accumulate=True)
    return weights.to(dtype)


def sample_separable(
    values: torch.Tensor, matrix: np.ndarray, target_shape: Sequence[int], padding: str = "zeros"
) -> torch.Tensor | None:
    """``values (B, C, *source)`` sampled trilinearly at the target voxels ``p`` of a grid of ``target_shape``,
    at the source indices ``matrix @ (p, 1)``: ``(B, C, *target_shape)``; None where the map is not
    axis-aligned (`axis_pairing`), for ``grid_sample`` to do. Differentiable in ``values``; stays on their device."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}; got {padding!r}")
    pairing = axis_pairing(matrix, target_shape)
    if pairing is None:
        return None
    m = np.asarray(matrix, dtype=np.float64)
    source_of = {target: source for source, target in enumerate(pairing)}
    out = values.permute(0, 1, *(2 + source_of[target] for target in range(3)))  # source axes in target order
    scale = [np.float64(target_shape[target]) / values.shape[2 + source_of[target]] for target in range(3)]
    for target in sorted(range(3), key=lambda axis: scale[axis]):  # the shrinking axes first: smaller passes
        source = source_of[target]
        steps = torch.arange(int(target_shape[target]), dtype=torch.float64, device=values.device)
        x = steps * m[source, target] + m[source, 3]
        weights = linear_weights(x, out.shape[2 + target], padding, values.dtype)
        out = torch.movedim(torch.movedim(out, 2 + target, -1) @ weights, -1, 2 + target)
    return out.contiguous()
