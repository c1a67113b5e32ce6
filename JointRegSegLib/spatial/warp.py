"""The one warping convention of JointRegSeg.

A displacement field on a network grid is a tensor ``(B, 3, I, J, K)`` in voxels of that grid;
channel ``c`` is the displacement along index axis ``c`` (i, j, k). Pull convention::

    warped(p) = image(p + u(p))

Sampling uses ``torch.nn.functional.grid_sample`` with ``align_corners=True``: index ``p`` along an
axis of ``N`` voxels becomes the normalised coordinate ``2 p / (N - 1) - 1`` and the grid's last
dimension is ordered ``(k, j, i)`` (grid_sample's x is the last array axis).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InputError
from .sampling import grid_sample_3d

_MODES = ("bilinear", "nearest")
_PADDING = ("zeros", "border")


def identity_grid(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel indices of a grid, ``(1, 3, I, J, K)``: channel ``c`` holds the index along axis ``c``."""
    if len(shape) != 3:
        raise InputError(f"identity_grid needs a 3D shape (I, J, K); got {tuple(shape)}")
    axes = [torch.arange(int(n), device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]


def _check_sampling(image: torch.Tensor, mode: str, padding_mode: str) -> None:
    """Raise `InputError` unless ``mode`` and ``padding_mode`` are known and ``image`` holds floating-point values."""
    if mode not in _MODES:
        raise InputError(f"interpolation mode must be one of {_MODES}; got {mode!r}")
    if padding_mode not in _PADDING:
        raise InputError(f"padding mode must be one of {_PADDING}; got {padding_mode!r}")
    if not image.is_floating_point():
        raise InputError(f"the image to sample must be a floating-point tensor; got {image.dtype} (convert with .float())")


def _normalise_(grid: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel indices ``grid (..., 3)`` in grid_sample's (k, j, i) order, of a grid of ``shape`` (i, j, k), turned in
    place into grid_sample's coordinates (``align_corners=True``): ``2 p / (n - 1) - 1``, computed as ``p / ((n - 1) /
    2) - 1``, the same numbers bit for bit (halving and doubling are exact). One rounding more or less matters: hof's
    affine stage ends elsewhere (its Dice on the benchmark pair 0.629 -> 0.571), and where a field is about 0 the
    points lie on voxel centres, where it decides from which neighbour a gradient is taken."""
    halves = torch.tensor([max(int(n) - 1, 1) / 2.0 for n in shape][::-1], dtype=grid.dtype, device=grid.device)
    return grid.div_(halves).sub_(1.0)


def sample_at_indices(
    image: torch.Tensor, indices: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Sample ``image (B, C, I, J, K)`` at continuous voxel indices ``(B, I', J', K', 3)`` ordered (i, j, k).

    Returns ``(B, C, I', J', K')``. Values outside the image follow ``padding_mode``.
    """
    if image.ndim != 5 or indices.ndim != 5 or indices.shape[-1] != 3 or indices.shape[0] != image.shape[0]:
        raise InputError(
            f"sample_at_indices needs an image (B, C, I, J, K) and indices (B, I', J', K', 3) with the same B; "
            f"got image {tuple(image.shape)} and indices {tuple(indices.shape)}"
        )
    _check_sampling(image, mode, padding_mode)
    normalised = _normalise_(indices.to(image.dtype).flip(-1), image.shape[2:])  # flip: a copy, in (k, j, i) order
    return grid_sample_3d(image, normalised, mode, padding_mode)


def check_field(image: torch.Tensor, disp: torch.Tensor) -> None:
    """Raise `InputError` unless ``disp`` is a ``(B, 3, I, J, K)`` field matching ``image (B, C, I, J, K)``."""
    if image.ndim != 5:
        raise InputError(f"the image must be a 5D tensor (B, C, I, J, K); got shape {tuple(image.shape)}")
    if disp.ndim != 5 or disp.shape[1] != 3:
        raise InputError(
            f"the displacement field must be a (B, 3, I, J, K) tensor (3 channels: i, j, k); got shape {tuple(disp.shape)}"
        )
    if disp.shape[0] != image.shape[0] or disp.shape[2:] != image.shape[2:]:
        raise InputError(
            f"image shape {tuple(image.shape)} and displacement field shape {tuple(disp.shape)} do not match: "
            "they need the same batch size and the same spatial size (I, J, K)"
        )


def warp(
    image: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Warp ``image (B, C, I, J, K)`` by a voxel displacement ``disp (B, 3, I, J, K)``: ``out(p) = image(p + disp(p))``.

    ``mode`` is ``"bilinear"`` (trilinear in 3D) or ``"nearest"`` (for label maps); ``padding_mode`` is
    ``"zeros"`` or ``"border"``. Differentiable with respect to both ``image`` and ``disp``.
    """
    check_field(image, disp)
    _check_sampling(image, mode, padding_mode)
    return grid_sample_3d(image, _sampling_grid(disp.to(image.dtype)), mode, padding_mode)


def _sampling_grid(disp: torch.Tensor) -> torch.Tensor:
    """``grid_sample``'s grid of the points ``p + u(p)``, ``(B, I, J, K, 3)``: the identity's index added to one
    reordered copy of the field axis by axis, then normalised in place (`_normalise_`): the copy and three passes
    against seven for the identity grid, its sum with the field and `sample_at_indices`' normalisation and
    reordering (36 -> 12 ms on the benchmark pair's 1 mm grid, 2 threads), the same numbers bit for bit."""
    grid = disp.permute(0, 2, 3, 4, 1).flip(-1)  # a new tensor, in grid_sample's (k, j, i) order
    for axis, n in enumerate(disp.shape[2:]):
        grid[..., 2 - axis] += torch.arange(int(n), dtype=disp.dtype, device=disp.device).view((-1,) + (1,) * (2 - axis))
    return _normalise_(grid, disp.shape[2:])
