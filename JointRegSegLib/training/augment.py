"""Cheap augmentations on the network grid: what turns a bank label map into a fresh training image.

All of them act on batches ``(B, 1, I, J, K)`` already on the training device, with one generator per
iteration (deterministic in the seed and the iteration):

- `deform_labels`: a random smooth diffeomorphism (SynthMorph's stationary velocity field, integrated
  on a grid twice as coarse: `synth.DeformationOptions.factor`), optionally followed by a random
  affine, applied to the label maps by nearest-neighbour sampling (zero outside);
- `render_t1`: a T1-weighted image of label maps (`synth.t1_like_means`: one brightness per image,
  each structure's mean jittered, background exactly 0, like skull-stripped scans; noise, blur, bias
  field), percentile-normalised to [0, 1] as the methods normalise their inputs; ``shared_means``
  gives consecutive images one contrast (the two images of a pair);
- `render_random`: SynthMorph's random Gaussian-mixture contrast (`synth.render_image`).
"""

from __future__ import annotations

import torch

from ..spatial import warp
from ..synth import DeformationOptions, RenderOptions, random_deformation, render_image
from ..synth.render import percentile_normalise, t1_like_means

T1_RENDER = RenderOptions(max_blur=0.7, max_bias_std=0.25, gamma_std=0.0)


def deform_labels(labels: torch.Tensor, generator: torch.Generator, options: DeformationOptions) -> torch.Tensor:
    """``labels (B, 1, I, J, K)`` (integers) warped by one random deformation each (nearest, zero outside)."""
    disp = random_deformation(labels.shape[2:], generator, labels.shape[0], options)
    return warp(labels.float(), disp, mode="nearest").round().long()


def render_t1(
    labels: torch.Tensor,
    generator: torch.Generator,
    pairs: bool = False,
    std_range: tuple[float, float] = (2.0, 10.0),
    options: RenderOptions = T1_RENDER,
) -> torch.Tensor:
    """T1-like images ``(B, 1, I, J, K)`` in [0, 1] of integer ``labels`` (module docstring). With ``pairs``
    the batch holds pairs (images ``2k`` and ``2k + 1``) that share one contrast (means and noise levels)."""
    batch, n_codes = labels.shape[0], int(labels.max()) + 1
    drawn = batch // 2 if pairs else batch
    device = generator.device
    means = t1_like_means(drawn, n_codes, generator)
    stds = std_range[0] + (std_range[1] - std_range[0]) * torch.rand((drawn, 1), generator=generator, device=device)
    stds = stds.expand(drawn, n_codes).clone()
    stds[:, 0] = 0.0  # background stays exactly 0 before blur and bias
    if pairs:
        means, stds = means.repeat_interleave(2, dim=0), stds.repeat_interleave(2, dim=0)
    return percentile_normalise(render_image(labels, generator, options, means=means, stds=stds))


def render_random(labels: torch.Tensor, generator: torch.Generator, pairs: bool = False, background_zero: bool = False) -> torch.Tensor:
    """SynthMorph random-contrast images of ``labels``; with ``pairs`` images ``2k`` and ``2k + 1`` share one
    draw of the mixture; ``background_zero`` keeps label 0 black (skull-stripped look)."""
    batch, n_codes = labels.shape[0], int(labels.max()) + 1
    drawn = batch // 2 if pairs else batch
    device = generator.device
    options = RenderOptions()
    means = options.mean_range[0] + (options.mean_range[1] - options.mean_range[0]) * torch.rand(
        (drawn, n_codes), generator=generator, device=device
    )
    stds = options.std_range[0] + (options.std_range[1] - options.std_range[0]) * torch.rand(
        (drawn, n_codes), generator=generator, device=device
    )
    if background_zero:
        means[:, 0], stds[:, 0] = 0.0, 0.0
    if pairs:
        means, stds = means.repeat_interleave(2, dim=0), stds.repeat_interleave(2, dim=0)
    image = render_image(labels, generator, RenderOptions(gamma_std=0.0) if pairs else options, means=means, stds=stds)
    return percentile_normalise(image) if background_zero else image
