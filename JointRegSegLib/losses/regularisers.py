"""Smoothness regularisers of displacement fields (B, 3, I, J, K) in voxels.

Exact normalisations (all differences in voxel units, no spacing):

- ``gradient_l2`` (VoxelMorph ``Grad('l2')``, the ||grad u||^2 of seeds 001 and 004): forward
  differences ``d_a u = u[x + e_a] - u[x]`` along each axis a; for each axis the mean of
  ``(d_a u)^2`` over batch, the 3 components and the (size - 1) positions along a; then the mean
  of the three axis values. So for ``u = (s * i, 0, 0)`` it equals ``s^2 / 9``.
- ``divergence_l2`` (seed 004, section 2.3, ||div u||^2): ``div u = d_i u_i + d_j u_j + d_k u_k``
  with central differences ``(u[x + e] - u[x - e]) / 2``, evaluated on the interior voxels (one
  voxel trimmed on every side, so the three derivatives share their positions); the mean of
  ``(div u)^2`` over batch and interior voxels. For ``u = s * x`` it equals ``9 s^2``.
- ``bending_energy``: the convention of MONAI ``BendingEnergyLoss(normalize=False)``, which is
  the standard one: per component ``sum_a (d_aa u)^2 + 2 sum_{a<b} (d_ab u)^2`` with the compact
  ``[1, -2, 1]`` stencil and the 4-point mixed stencil ``(u[+,+] - u[+,-] - u[-,+] + u[-,-]) / 4``,
  on interior voxels, averaged over batch, the 3 components and voxels. Zero for affine fields;
  ``4 q^2 / 3`` for ``u = (q * i^2, 0, 0)``. Written out here rather than calling MONAI because
  MONAI 1.6.1 indexes tensors with a list of slices, which torch deprecates (a warning on every
  call site); the tests check it equals MONAI's value.
"""

from __future__ import annotations

import torch

from JointRegSegLib.errors import InputError


def _check_field(disp: torch.Tensor, name: str, min_size: int) -> None:
    """Raise InputError unless ``disp`` is (B, 3, I, J, K) with every spatial size >= ``min_size``."""
    if disp.ndim != 5 or disp.shape[1] != 3:
        raise InputError(f"{name}: expected a displacement field shaped (B, 3, I, J, K), got {tuple(disp.shape)}.")
    if min(disp.shape[2:]) < min_size:
        raise InputError(f"{name}: every spatial size must be at least {min_size}, got {tuple(disp.shape[2:])}.")


def gradient_l2(disp: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference, averaged over the three axes (VoxelMorph 'l2' Grad)."""
    _check_field(disp, "gradient_l2", 2)
    d_i = disp[:, :, 1:] - disp[:, :, :-1]
    d_j = disp[:, :, :, 1:] - disp[:, :, :, :-1]
    d_k = disp[:, :, :, :, 1:] - disp[:, :, :, :, :-1]
    return (d_i.pow(2).mean() + d_j.pow(2).mean() + d_k.pow(2).mean()) / 3.0


def divergence_l2(disp: torch.Tensor) -> torch.Tensor:
    """Mean of (div u)^2 over interior voxels, central differences."""
    _check_field(disp, "divergence_l2", 3)
    inner = slice(1, -1)
    d_i = (disp[:, 0, 2:, inner, inner] - disp[:, 0, :-2, inner, inner]) / 2.0
    d_j = (disp[:, 1, inner, 2:, inner] - disp[:, 1, inner, :-2, inner]) / 2.0
    d_k = (disp[:, 2, inner, inner, 2:] - disp[:, 2, inner, inner, :-2]) / 2.0
    return (d_i + d_j + d_k).pow(2).mean()


def _shifted(disp: torch.Tensor, shifts: dict[int, int]) -> torch.Tensor:
    """Interior view of ``disp`` moved by ``shifts[axis]`` (-1, 0 or +1) voxels along spatial axes 0..2."""
    index = [slice(None), slice(None)]
    for axis in range(3):
        start = 1 + shifts.get(axis, 0)
        index.append(slice(start, disp.shape[axis + 2] - 2 + start))
    return disp[tuple(index)]


def bending_energy(disp: torch.Tensor) -> torch.Tensor:
    """Bending energy (MONAI BendingEnergyLoss convention, voxel units, mean over batch, components, voxels)."""
    _check_field(disp, "bending_energy", 3)
    centre = _shifted(disp, {})
    energy = torch.zeros_like(centre)
    for a in range(3):
        d_aa = _shifted(disp, {a: 1}) - 2.0 * centre + _shifted(disp, {a: -1})
        energy = energy + d_aa.pow(2)
        for b in range(a + 1, 3):
            d_ab = (
                _shifted(disp, {a: 1, b: 1})
                - _shifted(disp, {a: 1, b: -1})
                - _shifted(disp, {a: -1, b: 1})
                + _shifted(disp, {a: -1, b: -1})
            ) / 4.0
            energy = energy + 2.0 * d_ab.pow(2)
    return energy.mean()
