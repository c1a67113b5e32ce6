"""Configurable 3D registration U-Net (seed 004, section 2.1.1 and appendix H).

Topology, for ``encoder=(c1, c2, c3, c4)``, bottleneck ``b``, decoder ``(d1, d2, d3, d4)`` and
``final=(f1, f2, f3)``:

- encoder level ``l``: ConvBlock(-> c_l) at 1/2^(l-1) resolution, its output kept as a skip,
  then 2x2x2 max-pooling; after the fourth pooling (1/16 resolution) a ConvBlock(-> b);
- decoder level ``l``: upsample by 2, concatenate the skip of the matching encoder level,
  ConvBlock(-> d_l); after the last decoder level the network is back at full resolution;
- ``final``: full-resolution ConvBlocks (seed 004: three 16-channel convs);
- head: 3x3x3 conv to ``out_channels`` (3), weights N(0, 1e-5^2), zero bias.

Every ConvBlock is a 3x3x3 conv (stride 1, padding 1) + LeakyReLU(0.2). Defaults (choices where
the paper is silent, recorded here):

- the bottleneck has ``encoder[-1]`` channels and the decoder mirrors the encoder
  (``decoder = reversed(encoder)``): this is what the paper states for the student
  ("32-channel bottleneck; decoder 32, 24, 24, 16"), and with it the teacher lands on the
  paper's parameter count: teacher 610,819 parameters (paper: 0.6 M), student 237,443 (paper:
  0.23 M), counted by ``count_parameters``;
- upsampling is nearest-neighbour (as VoxelMorph); ``"trilinear"`` is available.

Input: the channel-wise concatenation ``torch.cat([moving, fixed], dim=1)`` (moving first, as
VoxelMorph and SynthMorph). Output: a vector field in voxels of the input grid, channel ``c``
along index axis ``c`` (i, j, k): a displacement (pull convention, ``warped(p) = moving(p +
u(p))``) or a stationary velocity to integrate, depending on how the caller uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from .blocks import ConvBlock, FlowHead, UpBlock

TEACHER_ENCODER = (16, 32, 32, 64)
STUDENT_ENCODER = (16, 24, 24, 32)
STUDENT_BOTTLENECK = 32
FINAL_CONVS = (16, 16, 16)


class RegistrationUNet(nn.Module):
    """3D U-Net predicting a 3-channel field (voxels) from ``cat([moving, fixed], dim=1)``.

    Args:
        in_channels: input channels (2 for one moving and one fixed image).
        encoder: channels of the encoder levels; each level ends with a 2x max-pool, so the input
            size must be divisible by ``2 ** len(encoder)`` (16 for four levels).
        bottleneck: channels of the conv at the coarsest resolution (default ``encoder[-1]``).
        decoder: channels of the decoder levels, coarse to fine (default ``reversed(encoder)``);
            must have ``len(encoder)`` entries.
        final: channels of the full-resolution convs after the decoder.
        out_channels: channels of the head (3 for a 3D field).
        upsample: ``"nearest"`` or ``"trilinear"``.
        negative_slope: LeakyReLU slope.
        head_std: standard deviation of the head's initial weights (zero bias).
        norm: instance normalisation in every ConvBlock (`blocks.ConvBlock`); off for the registration networks.
    """

    def __init__(
        self,
        in_channels: int = 2,
        encoder: Sequence[int] = TEACHER_ENCODER,
        bottleneck: int | None = None,
        decoder: Sequence[int] | None = None,
        final: Sequence[int] = FINAL_CONVS,
        out_channels: int = 3,
        upsample: str = "nearest",
        negative_slope: float = 0.2,
        head_std: float = 1e-5,
        norm: bool = False,
    ) -> None:
        super().__init__()
        encoder = tuple(int(c) for c in encoder)
        if not encoder:
            raise InputError("encoder needs at least one level, e.g. (16, 32, 32, 64)")
        bottleneck = encoder[-1] if bottleneck is None else int(bottleneck)
        decoder = tuple(reversed(encoder)) if decoder is None else tuple(int(c) for c in decoder)
        if len(decoder) != len(encoder):
            raise InputError(
                f"decoder {decoder} needs one entry per encoder level {encoder} (got {len(decoder)})"
            )
        self.in_channels = int(in_channels)
        self.divisor = 2 ** len(encoder)

        self.encoder = nn.ModuleList()
        previous = self.in_channels
        for channels in encoder:
            self.encoder.append(ConvBlock(previous, channels, negative_slope, norm))
            previous = channels
        self.bottleneck = ConvBlock(previous, bottleneck, negative_slope, norm)
        previous = bottleneck

        self.decoder = nn.ModuleList()
        for channels, skip in zip(decoder, reversed(encoder)):
            self.decoder.append(UpBlock(previous, skip, channels, upsample, negative_slope, norm))
            previous = channels

        self.final = nn.Sequential()
        for channels in final:
            self.final.append(ConvBlock(previous, channels, negative_slope, norm))
            previous = channels
        self.head = FlowHead(previous, out_channels, head_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, in_channels, I, J, K)`` with I, J, K divisible by ``self.divisor``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise InputError(
                f"expected a (B, {self.in_channels}, I, J, K) tensor (moving and fixed concatenated "
                f"on dim 1), got shape {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        if any(s % self.divisor for s in spatial):
            raise InputError(
                f"input spatial shape {spatial} must be divisible by {self.divisor}: resample or pad "
                f"the images to a multiple of {self.divisor} first"
            )
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = F.max_pool3d(x, kernel_size=2)
        x = self.bottleneck(x)
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(x, skip)
        return self.head(self.final(x))


def teacher_unet(**kwargs) -> RegistrationUNet:
    """Seed 004 teacher: encoder 16, 32, 32, 64, mirrored decoder, three 16-channel convs (610,819 params)."""
    return RegistrationUNet(encoder=TEACHER_ENCODER, final=FINAL_CONVS, **kwargs)


def student_unet(**kwargs) -> RegistrationUNet:
    """Seed 004 student: encoder 16, 24, 24, 32, 32-channel bottleneck, decoder 32, 24, 24, 16 (237,443 params)."""
    return RegistrationUNet(
        encoder=STUDENT_ENCODER,
        bottleneck=STUDENT_BOTTLENECK,
        decoder=tuple(reversed(STUDENT_ENCODER)),
        final=FINAL_CONVS,
        **kwargs,
    )
