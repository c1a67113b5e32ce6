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
- ``M_k = argmin_M sum_l |M (c[k, l], 1) - r[l]|^2``: least squares (`spatial.fit_to_points`, as segreg's label
  affine), 12 parameters from some thirty centroids;
- the aligned map ``k`` at index ``x`` is map ``k`` at ``M_k^-1 x`` (nearest neighbour, background outside).

Scans without labels are aligned by the methods' affine stage (`methods.affine_stage.fit_affine`, NMI) to a
T1-like rendering of the first aligned map.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ..errors import InputError
from ..methods.affine_stage import fit_affine
from ..spatial import affine_to_displacement, fit_to_points, warp


def shared_codes(maps: torch.Tensor) -> list[int]:
    """The non-zero codes present in every map of ``maps (N, 1, I, J, K)``."""
    present = [set(torch.unique(m).tolist()) - {0} for m in maps]
    return sorted(set.intersection(*present))


def centroids(maps: torch.Tensor, codes: list[int]) -> np.ndarray:
    """``(N, L, 3)``: the mean voxel index of each of ``codes`` in each map (scipy's ``center_of_mass``)."""
    return np.stack([np.array(ndimage.center_of_mass(np.ones(m.shape[1:]), m[0], codes)) for m in maps.cpu().numpy()])


def align_maps(maps: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """``maps`` brought to their mean shape (module docstring), and each map's ``M_k`` ``(N, 4, 4)``."""
    codes = shared_codes(maps)
    if len(codes) < 4:
        raise InputError(f"pre-alignment needs at least 4 structures present in every label map; found {len(codes)}")
    points = centroids(maps, codes)
    reference = points.mean(axis=0)
    fits = [fit_to_points(p, reference) for p in points]  # M_k, equal weights
    if any(m is None for m in fits):
        raise InputError("pre-alignment needs structures whose centroids span 3D in every label map; some lie near a plane")
    matrices = np.stack(fits)
    inverse = torch.as_tensor(np.linalg.inv(matrices), dtype=torch.float32, device=maps.device)
    sampling = affine_to_displacement(inverse, maps.shape[2:])  # aligned index -> map index
    aligned = warp(maps.float(), sampling, mode="nearest").round().to(maps.dtype)
    return aligned, matrices


def align_scans(scans: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each of ``scans (S, 1, I, J, K)`` (in [0, 1]) resampled after the NMI affine stage aligned it to ``reference``."""
    out = []
    for scan in scans:
        matrix = fit_affine(reference, scan[None], loss="nmi", seed=seed)
        out.append(warp(scan[None], affine_to_displacement(torch.as_tensor(matrix, dtype=torch.float32, device=scan.device), scan.shape[1:])))
    return torch.cat(out)
