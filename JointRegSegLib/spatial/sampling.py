"""``grid_sample`` of 3D images on every CPU thread torch has.

PyTorch's CPU kernel for 5D inputs (trilinear and nearest, forward and backward) runs one thread per batch item: its
loop over the points is parallel over the batch alone (``at::parallel_for(0, N, ...)`` in
aten/src/ATen/native/GridSampler.cpp), so a single volume (a 1 mm warp, a region's field, tto's refinement) is
sampled on one core however many threads torch has. `grid_sample_3d` cuts such a call along the sampled grid's first
axis into as many batch items of the same image as torch has threads (the image expanded, not copied): every point
is sampled as before, so the values and the gradient of the grid are the same bit for bit; the image's gradient is
the sum of the items' (the same up to float rounding). On the benchmark pair's 1 mm grid, 2 threads: a trilinear
warp 0.175 -> 0.085 s, a nearest one 0.100 -> 0.056 s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grid_sample_3d(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """``F.grid_sample(image, grid, mode, padding_mode, align_corners=True)`` for ``image (B, C, I, J, K)`` and ``grid
    (B, I', J', K', 3)``, a single CPU volume (B = 1) on every thread (module docstring)."""
    parts = min(torch.get_num_threads(), grid.shape[1]) if image.device.type == "cpu" and image.shape[0] == 1 else 1
    if parts <= 1:
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    depth = grid.shape[1]
    rows = -(-depth // parts)
    if rows * parts != depth:  # the last part padded with copies of the last plane, sampled and dropped
        grid = torch.cat([grid, grid[:, -1:].expand(1, rows * parts - depth, *grid.shape[2:])], dim=1)
    items = F.grid_sample(
        image.expand(parts, *image.shape[1:]), grid.reshape(parts, rows, *grid.shape[2:]), mode=mode,
        padding_mode=padding_mode, align_corners=True,
    )
    return items.transpose(0, 1).reshape(1, image.shape[1], rows * parts, *grid.shape[2:4])[:, :, :depth]
