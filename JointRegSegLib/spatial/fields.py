"""Operations on voxel displacement and velocity fields ``(B, 3, I, J, K)`` (see `warp` for the convention)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError
from .warp import check_field, warp


def _check_disp(disp: torch.Tensor, name: str = "displacement field") -> None:
    if disp.ndim != 5 or disp.shape[1] != 3:
        raise InputError(f"the {name} must be a (B, 3, I, J, K) tensor; got shape {tuple(disp.shape)}")


def compose(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """Displacement of the point map ``(id + u_a) ∘ (id + u_b)``: ``c(p) = u_b(p) + u_a(p + u_b(p))``.

    Warping by ``u_a`` and then warping the result by ``u_b`` equals warping once by the composite::

        warp(warp(I, u_a), u_b)(p) = warp(I, u_a)(p + u_b(p)) = I(p + u_b(p) + u_a(p + u_b(p)))
                                   = warp(I, compose(u_a, u_b))(p)

    (up to interpolation). ``u_a`` is sampled with border padding, so a field that does not vanish
    at the edge of the grid is extended by its edge values rather than by zero.
    """
    _check_disp(u_a)
    check_field(u_a, u_b)
    return u_b + warp(u_a, u_b, mode="bilinear", padding_mode="border")


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Displacement of the exponential of a stationary velocity field, by scaling and squaring.

    ``u_0 = v / 2**steps``, then ``steps`` times ``u <- compose(u, u) = u + u(p + u(p))``
    (Arsigny et al. 2006; the same recursion as MONAI's ``DVF2DDF``). MONAI's layer follows our
    convention (channel c = axis c, align_corners=True, reversed grid order) but is not used:
    it defaults to zero padding, which shrinks any displacement that reaches the edge of the grid
    (a constant velocity would not integrate to itself), switches to MONAI's compiled ``grid_pull``
    backend (other boundary handling) when MONAI is built with extensions, and warns on every
    construction. This function uses `compose` (border padding) so every warp goes through `warp`.
    """
    _check_disp(velocity, "velocity field")
    if int(steps) < 0:
        raise InputError(f"the number of scaling-and-squaring steps must be >= 0; got {steps}")
    disp = velocity / (2 ** int(steps))
    for _ in range(int(steps)):
        disp = compose(disp, disp)
    return disp


def rescale_field(disp: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resize a voxel displacement field to a grid of size ``shape`` (same field of view).

    Trilinear resampling with ``align_corners=True`` (corner voxel centres coincide), and channel
    ``c`` multiplied by ``(N_new - 1) / (N_old - 1)`` along axis ``c`` so the values are voxels of
    the new grid.
    """
    _check_disp(disp)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"rescale_field needs a 3D target shape of positive sizes; got {shape}")
    old = disp.shape[2:]
    resized = F.interpolate(disp, size=shape, mode="trilinear", align_corners=True)
    ratio = torch.tensor(
        [(new - 1) / (o - 1) if o > 1 else 1.0 for new, o in zip(shape, old)], dtype=disp.dtype, device=disp.device
    )
    return resized * ratio.view(1, 3, 1, 1, 1)
