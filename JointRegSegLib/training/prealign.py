"""Affine pre-alignment of training volumes to the label maps' mean shape: pairs as an affine stage leaves them.

hof registers affinely pre-aligned volumes (the paper's section 4.1; the method runs its affine stage before
the network). The bank's label maps are only centred on their labelled boxes, so two of them differ by a whole
affine (head size, pitch, roll). Trained and validated on such pairs, a network learns first what the affine
stage does anyway: on hof's held-apart pairs the shipped weights (4274) take Dice 0.329 to 0.495 alone, the NMI
affine stage alone reaches 0.578, and the network after it 0.606 (2026-11-30, `docs/results/hof.md`).

The maps (``(N, 1, I, J, K)`` integer codes on one grid) are brought to their mean shape (ours; the paper's
OASIS volumes come pre-aligned):

- ``c[k, l]``: the centroid (voxel indices) of structure ``l`` in map ``k``, for every structure present in
  all maps; ``r[l] = mean_k c[k, l]``;
- ``M_k = argmin_M sum_l |M (c[k, l], 1) - r[l]|^2``: least squares, 12 parameters from some thirty centroids;
- the aligned map ``k`` at index ``x`` is map ``k`` at ``M_k^-1 x`` (nearest neighbour, background outside).

Scans without labels are aligned by the methods' affine stage (`methods.affine_stage.fit_affine`, NMI) to a
T1-like rendering of the first aligned map.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..methods.affine_stage import fit_affine
from ..spatial import affine_to_displacement, identity_grid, warp


def shared_codes(maps: torch.Tensor) -> list[int]:
    """The non-zero codes present in every map of ``maps (N, 1, I, J, K)``."""
    present = [set(torch.unique(m).tolist()) - {0} for m in maps]
    return sorted(set.intersection(*present))


def centroids(maps: torch.Tensor, codes: list[int]) -> torch.Tensor:
    """``(N, L, 3)`` float64: the mean voxel index of each of ``codes`` in each map."""
    size = max(codes) + 1
    grid = identity_grid(maps.shape[2:], device=maps.device, dtype=torch.float64)[0].reshape(3, -1)
    out = []
    for labels in maps.reshape(maps.shape[0], -1):
        count = torch.bincount(labels, minlength=size).double()
        sums = torch.stack([torch.bincount(labels, weights=axis, minlength=size) for axis in grid], dim=1)
        out.append(sums[codes] / count[codes, None])
    return torch.stack(out)


def least_squares_affine(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The 4x4 affine ``M`` minimising ``sum_l |M (source[l], 1) - target[l]|^2`` (``(L, 3)`` points, L >= 4)."""
    if source.shape != target.shape or source.shape[0] < 4:
        raise InputError(f"an affine needs at least 4 corresponding points; got {tuple(source.shape)} and {tuple(target.shape)}")
    design = torch.cat([source, torch.ones_like(source[:, :1])], dim=1)
    solution = torch.linalg.lstsq(design, target).solution  # (4, 3): M's rows are its columns
    return torch.cat([solution.T, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=source.dtype, device=source.device)])


def align_maps(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``maps`` brought to their mean shape (module docstring), and each map's ``M_k`` ``(N, 4, 4)``."""
    codes = shared_codes(maps)
    if len(codes) < 4:
        raise InputError(f"pre-alignment needs at least 4 structures present in every label map; found {len(codes)}")
    points = centroids(maps, codes)
    reference = points.mean(dim=0)
    matrices = torch.stack([least_squares_affine(p, reference) for p in points])
    sampling = affine_to_displacement(torch.linalg.inv(matrices).float(), maps.shape[2:])  # aligned index -> map index
    aligned = warp(maps.float(), sampling, mode="nearest").round().to(maps.dtype)
    return aligned, matrices


def align_scans(scans: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each of ``scans (S, 1, I, J, K)`` (in [0, 1]) resampled after the NMI affine stage aligned it to ``reference``."""
    out = []
    for scan in scans:
        matrix = fit_affine(reference, scan[None], loss="nmi", seed=seed)
        out.append(warp(scan[None], affine_to_displacement(torch.as_tensor(matrix, dtype=torch.float32, device=scan.device), scan.shape[1:])))
    return torch.cat(out)
