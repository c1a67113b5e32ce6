"""Render a label map into a random-contrast image (SynthMorph / SynthSeg generative model).

Steps, per sample (Hoffmann et al. 2022, section III; ranges are SynthMorph's unless noted):

1. Gaussian mixture: label ``l`` gets a mean ``mu_l ~ U(25, 225)`` and a standard deviation
   ``sd_l ~ U(5, 25)``; voxel ``p`` is ``N(mu_{L(p)}, sd_{L(p)}^2)``. Lookup tables indexed by the
   label code (no loop over voxels), so codes may be sparse (FreeSurfer codes up to 530).
2. Gaussian blur with ``sigma ~ U(0, max_blur)`` voxels (separable, replicate padding).
3. Multiplicative bias field ``exp(b)``, ``b`` = smooth noise (control grid at ``bias_resolution``
   of the grid size, trilinear upsampling) with standard deviation ``U(0, max_bias_std)``.
4. Min-max normalisation to [0, 1].
5. Gamma ``x ** exp(g)``, ``g ~ N(0, gamma_std^2)`` (keeps [0, 1]; min 0 and max 1 stay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..device import same_device
from ..errors import InputError
from ..labels import EXTRACEREBRAL_FIRST_CODE
from .deform import smooth_noise


@dataclass(frozen=True)
class RenderOptions:
    """Ranges of the random contrast model (see the module docstring)."""

    mean_range: tuple[float, float] = (25.0, 225.0)
    std_range: tuple[float, float] = (5.0, 25.0)
    max_blur: float = 1.0
    max_bias_std: float = 0.3
    bias_resolution: float = 1.0 / 16.0
    gamma_std: float = 0.25


def _uniform(low: float, high: float, size: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator, device=generator.device)


def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur ``image (B, 1, I, J, K)`` with an isotropic Gaussian of ``sigma[b]`` voxels per sample.

    Separable: three 1D convolutions with kernels of ``2 * radius + 1`` taps (grouped over the
    batch), replicate padding. ``sigma = 0`` leaves the image unchanged.
    """
    batch = image.shape[0]
    taps = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (taps[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    out = image.reshape(1, batch, *image.shape[2:])
    for axis in range(3):
        shape = [batch, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.reshape(shape), groups=batch)
    return out.reshape(image.shape)


def smoothed(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``image (B, 1, I, J, K)`` blurred by one isotropic Gaussian of ``sigma`` voxels (`gaussian_blur`; 0: unchanged).

    hof's and uresnet's training losses compare images smoothed this way: trilinear sampling blurs most at
    half-voxel offsets, so a similarity of two sharp images that no field aligns exactly rewards a field half
    a voxel off (`training.hof`, `methods.uresnet`).
    """
    if sigma <= 0:
        return image
    return gaussian_blur(image, torch.full((image.shape[0],), float(sigma), device=image.device), radius=math.ceil(3 * sigma))


def render_image(
    labels: torch.Tensor,
    generator: torch.Generator,
    options: RenderOptions = RenderOptions(),
    means: torch.Tensor | None = None,
    stds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random-contrast image ``(B, 1, I, J, K)`` in [0, 1] from integer ``labels (B, 1, I, J, K)``.

    ``means`` / ``stds`` ``(B, L)`` (``L`` > the largest code) replace the random mixture
    parameters when given. Random numbers come from ``generator`` (on the labels' device).
    """
    if labels.ndim != 5 or labels.shape[1] != 1 or labels.is_floating_point():
        raise InputError(f"labels must be an integer tensor (B, 1, I, J, K); got {labels.dtype} {tuple(labels.shape)}")
    if labels.min() < 0:
        raise InputError("labels must be non-negative codes")
    if not same_device(generator.device, labels.device):
        raise InputError(
            f"the generator is on {generator.device} but the labels are on {labels.device}: use one device"
        )
    batch = labels.shape[0]
    n_codes = int(labels.max()) + 1
    if means is None:
        means = _uniform(*options.mean_range, (batch, n_codes), generator)
    if stds is None:
        stds = _uniform(*options.std_range, (batch, n_codes), generator)
    if means.shape[0] != batch or stds.shape[0] != batch or min(means.shape[1], stds.shape[1]) < n_codes:
        raise InputError(
            f"means {tuple(means.shape)} and stds {tuple(stds.shape)} need shape (B={batch}, L >= {n_codes})"
        )
    flat = labels.reshape(batch, -1).long()
    noise = torch.randn(flat.shape, generator=generator, device=labels.device)
    image = torch.gather(means.float(), 1, flat) + torch.gather(stds.float(), 1, flat) * noise
    image = image.reshape(labels.shape)

    if options.max_blur > 0:
        sigma = _uniform(0.0, options.max_blur, (batch,), generator)
        image = gaussian_blur(image, sigma, radius=max(1, math.ceil(3.0 * options.max_blur)))
    if options.max_bias_std > 0:
        bias_std = _uniform(0.0, options.max_bias_std, (batch,), generator)
        bias = smooth_noise(labels.shape[2:], generator, batch, 1, options.bias_resolution)
        image = image * torch.exp(bias * bias_std.view(-1, 1, 1, 1, 1))

    low = image.amin(dim=(1, 2, 3, 4), keepdim=True)
    high = image.amax(dim=(1, 2, 3, 4), keepdim=True)
    image = (image - low) / (high - low).clamp_min(1e-6)
    if options.gamma_std > 0:
        gamma = torch.exp(options.gamma_std * torch.randn(batch, generator=generator, device=labels.device))
        image = image.clamp(0.0, 1.0) ** gamma.view(-1, 1, 1, 1, 1)
    return image.clamp(0.0, 1.0)


# T1-weighted mean intensity per FreeSurfer code (0-255; WM bright, deep grey between, cortex darker,
# CSF dark); brain codes not listed get `T1_OTHER_BRAIN`, background 0, extra-cerebral classes (>= 500,
# skull, scalp, eyes) a random level per image.
T1_MEANS: dict[int, float] = {
    2: 205.0, 41: 205.0, 7: 195.0, 46: 195.0, 16: 185.0, 28: 175.0, 60: 175.0, 77: 170.0, 85: 190.0,
    13: 180.0, 52: 180.0, 10: 168.0, 49: 168.0, 12: 150.0, 51: 150.0, 11: 138.0, 50: 138.0, 26: 138.0, 58: 138.0,
    3: 122.0, 42: 122.0, 8: 130.0, 47: 130.0, 17: 122.0, 53: 122.0, 18: 125.0, 54: 125.0, 25: 120.0, 57: 120.0,
    4: 38.0, 43: 38.0, 5: 42.0, 44: 42.0, 14: 38.0, 15: 38.0, 24: 35.0, 72: 38.0, 31: 70.0, 63: 70.0,
    30: 110.0, 62: 110.0, 80: 110.0,
}
T1_OTHER_BRAIN = 120.0


def t1_like_means(batch: int, n_codes: int, generator: torch.Generator, jitter: float = 0.1) -> torch.Tensor:
    """Per-code means ``(batch, n_codes)`` of a T1-weighted contrast: `T1_MEANS` scaled by one random
    brightness per image (0.85-1.15) and jittered by ``+-jitter`` per structure; background 0;
    codes >= 500 (SynthSeg's extra-cerebral classes) U(0, 255) per image."""
    base = torch.full((n_codes,), T1_OTHER_BRAIN)
    base[0] = 0.0
    for code, value in T1_MEANS.items():
        if code < n_codes:
            base[code] = value
    device = generator.device
    base = base.to(device)
    brightness = 0.85 + 0.3 * torch.rand((batch, 1), generator=generator, device=device)
    means = base[None] * brightness * (1.0 - jitter + 2.0 * jitter * torch.rand((batch, n_codes), generator=generator, device=device))
    if n_codes > EXTRACEREBRAL_FIRST_CODE:
        means[:, EXTRACEREBRAL_FIRST_CODE:] = 255.0 * torch.rand(
            (batch, n_codes - EXTRACEREBRAL_FIRST_CODE), generator=generator, device=device
        )
    return means


def percentile_normalise(image: torch.Tensor, low: float = 0.005, high: float = 0.995) -> torch.Tensor:
    """Per-image percentile normalisation of ``(B, 1, I, J, K)`` to [0, 1]: the torch counterpart of
    `imageio.intensity.normalise_intensity`, which prepares every image the methods see."""
    flat = image.flatten(1)
    if flat.shape[1] > 2**24:  # torch.quantile's limit
        flat = flat[:, :: math.ceil(flat.shape[1] / 2**24)]
    lo = torch.quantile(flat, low, dim=1).view(-1, 1, 1, 1, 1)
    hi = torch.quantile(flat, high, dim=1).view(-1, 1, 1, 1, 1)
    return ((image - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)
