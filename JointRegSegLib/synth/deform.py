"""Random smooth deformations for synthetic training pairs (SynthMorph recipe, Hoffmann et al. 2022).

A stationary velocity field (SVF) is drawn as white noise on a coarse control grid, upsampled
trilinearly to the full grid and integrated by scaling and squaring (`spatial.integrate_velocity`),
which gives a diffeomorphism. All fields are ``(B, 3, I, J, K)`` in voxels of the grid, pull
convention (see `JointRegSegLib.spatial.warp`).

Choices (SynthMorph's where it states them, otherwise ours):

- control grid: ``ceil(resolution * N)`` points per axis (at least 2), ``resolution = 1/16`` as
  SynthMorph's r_v = 1/16;
- magnitude: each sample draws ``sigma ~ U(min_std, max_std)`` voxels and the upsampled velocity
  is rescaled so that the root mean square of its components over the grid is exactly ``sigma``
  (white noise loses about half its standard deviation under trilinear upsampling, so the raw
  noise level would not say how large the field is). The integrated displacement of such a smooth
  field has about the same RMS. Default ``max_std = 2`` voxels: SynthMorph draws the control-point
  standard deviation from U(0, 3) voxels (its released "vel-3" models), i.e. a velocity RMS of up
  to about 0.55 * 3 = 1.7 voxels; on a 2-2.5 mm network grid 2 voxels is 4-5 mm RMS per image
  (on 96^3 with sigma = 2 the smallest Jacobian determinant of a few samples was about 0.3);
- optional random affine (off by default: SynthMorph's deformable model is trained on affinely
  aligned pairs): per axis rotation U(-r, r) degrees, scale 1 + U(-s, s), shear U(-h, h),
  translation U(-t, t) voxels, about the grid centre (`AffineRanges`). The complete point map is
  ``A o exp(v)``: the SVF acts first, then the affine;
- ``factor`` (default 1): the velocity is drawn and integrated on a grid ``factor`` times coarser
  per axis (same control grid, same RMS in voxels of the full grid) and the displacement is
  upsampled trilinearly (`spatial.rescale_field`). A field this smooth loses nothing visible, and
  scaling and squaring costs ``1 / factor^3`` of the full-grid integration (training data
  generation on the network grid, `training.augment`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .. import spatial
from ..errors import InputError


@dataclass(frozen=True)
class AffineRanges:
    """Half-widths of the uniform ranges of a random affine (degrees, fraction, shear, voxels)."""

    rotation_deg: float = 10.0
    scale: float = 0.05
    shear: float = 0.02
    translation: float = 3.0


@dataclass(frozen=True)
class DeformationOptions:
    """Parameters of `random_deformation` (see the module docstring for the defaults' origin)."""

    max_std: float = 2.0
    min_std: float = 0.0
    resolution: float = 1.0 / 16.0
    steps: int = 7
    affine: AffineRanges | None = None
    factor: int = 1


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise InputError(f"a 3D grid shape (I, J, K) with sizes >= 2 is needed; got {shape}")
    return shape


def coarse_shape(shape: Sequence[int], resolution: float) -> tuple[int, int, int]:
    """Control-grid size ``max(2, ceil(resolution * N))`` per axis."""
    if not 0.0 < resolution <= 1.0:
        raise InputError(f"resolution is a fraction of the grid size in (0, 1]; got {resolution}")
    return tuple(max(2, math.ceil(resolution * int(n))) for n in shape)


def smooth_noise(
    shape: Sequence[int],
    generator: torch.Generator,
    batch_size: int = 1,
    channels: int = 1,
    resolution: float = 1.0 / 16.0,
) -> torch.Tensor:
    """Standard normal noise on the control grid, upsampled trilinearly (align_corners=True) to ``shape``.

    Returns ``(batch_size, channels, I, J, K)`` float32 on the generator's device.
    """
    shape = _check_shape(shape)
    coarse = torch.randn(
        (batch_size, channels, *coarse_shape(shape, resolution)), generator=generator, device=generator.device
    )
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def random_velocity(
    shape: Sequence[int],
    generator: torch.Generator,
    batch_size: int = 1,
    max_std: float = 2.0,
    min_std: float = 0.0,
    resolution: float = 1.0 / 16.0,
) -> torch.Tensor:
    """Smooth random SVF ``(B, 3, I, J, K)`` in voxels; each sample's component RMS is ``U(min_std, max_std)``."""
    if not 0.0 <= min_std <= max_std:
        raise InputError(f"need 0 <= min_std <= max_std (voxels); got min_std={min_std}, max_std={max_std}")
    field = smooth_noise(shape, generator, batch_size, 3, resolution)
    sigma = min_std + (max_std - min_std) * torch.rand(batch_size, generator=generator, device=generator.device)
    rms = field.square().mean(dim=(1, 2, 3, 4)).sqrt().clamp_min(1e-12)
    return field * (sigma / rms).view(-1, 1, 1, 1, 1)


def random_affine_matrices(
    shape: Sequence[int], generator: torch.Generator, batch_size: int, ranges: AffineRanges
) -> torch.Tensor:
    """``(B, 4, 4)`` index affines (pull convention) about the grid centre, parameters uniform in ``ranges``."""
    shape = _check_shape(shape)
    u = 2.0 * torch.rand((batch_size, 4, 3), generator=generator, device=generator.device, dtype=torch.float64) - 1.0
    u = u.cpu().numpy()
    centre = [(n - 1) / 2.0 for n in shape]
    matrices = [
        spatial.affine_matrix(
            rotation_deg=ranges.rotation_deg * u[b, 0],
            scale=1.0 + ranges.scale * u[b, 1],
            shear=ranges.shear * u[b, 2],
            translation=ranges.translation * u[b, 3],
            center=centre,
        )
        for b in range(batch_size)
    ]
    return torch.as_tensor(np.stack(matrices), dtype=torch.float32, device=generator.device)


def random_deformation(
    shape: Sequence[int],
    generator: torch.Generator,
    batch_size: int = 1,
    options: DeformationOptions = DeformationOptions(),
    return_inverse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Random diffeomorphic displacement ``(B, 3, I, J, K)`` (voxels): ``exp(v)``, then the optional affine.

    The affine is applied analytically to ``p + u(p)``. With ``return_inverse`` also returns the
    displacement of the inverse map, ``exp(-v) o A^-1`` (exact up to interpolation).
    """
    shape = _check_shape(shape)
    factor = int(options.factor)
    if factor < 1:
        raise InputError(f"the integration grid factor must be a positive integer; got {options.factor}")
    work = tuple(max(2, math.ceil(n / factor)) for n in shape)
    resolution = min(1.0, options.resolution * max(n / w for n, w in zip(shape, work)))
    velocity = random_velocity(work, generator, batch_size, options.max_std / factor, options.min_std / factor, resolution)
    disp = spatial.integrate_velocity(velocity, options.steps)
    inverse = spatial.integrate_velocity(-velocity, options.steps) if return_inverse else None
    if work != shape:
        disp = spatial.rescale_field(disp, shape)
        inverse = spatial.rescale_field(inverse, shape) if return_inverse else None
    if options.affine is not None:
        matrices = random_affine_matrices(shape, generator, batch_size, options.affine)
        points = spatial.identity_grid(shape, device=disp.device, dtype=disp.dtype) + disp
        moved = torch.einsum("brc,bcijk->brijk", matrices[:, :3, :3], points) + matrices[:, :3, 3, None, None, None]
        disp = moved - spatial.identity_grid(shape, device=disp.device, dtype=disp.dtype)
        if return_inverse:
            inverse = spatial.compose(inverse, spatial.affine_to_displacement(torch.linalg.inv(matrices), shape))
    return (disp, inverse) if return_inverse else disp
