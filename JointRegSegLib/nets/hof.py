"""Networks of HOF (seed 000): a shared encoder, a registration decoder (leader) and a segmentation decoder (follower).

Section 3.1 fixes the structure (one domain-shared encoder, two task-specific decoders); the paper
gives no layer sizes, so these are ours, small enough for CPU training on a 3 mm grid:

- `SharedEncoder`: applied to ONE image at a time (so ``F_l`` and ``F_u`` of eq. 2 are separate
  feature pyramids). Levels ``channels = (8, 16, 32, 32)``: a 3x3x3 ConvBlock at full resolution,
  then (max-pool 2, ConvBlock) per level, so the input size must be a multiple of 8.
- `RegistrationDecoder` ``f_r(w; F_m, F_f)``: at every level the two images' features are
  concatenated (moving first), a ConvBlock at the bottleneck, then UpBlocks (nearest upsampling)
  with the concatenated skips, a ConvBlock and a near-zero `FlowHead`. The output is a stationary
  velocity integrated by scaling and squaring (``integration_steps``; 0 = the output is the
  displacement itself), in voxels of the grid, pull convention: ``warped = warp(moving, psi)``.
  Swapping the arguments gives the reverse field of eq. 2 from the same weights. ``symmetric``
  registration (ours, at inference) integrates ``(v(m, f) - v(f, m)) / 2``: the two directions'
  velocities should be opposite (``exp(-v)`` inverts ``exp(v)``), so their antisymmetric part keeps what
  they agree on and cancels what does not depend on the order, e.g. a shift the network adds to any pair.
- `SegmentationDecoder` ``f_s(theta; F)``: the mirrored decoder on one image's features, ending in
  a 1x1x1 convolution to class logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from ..spatial import integrate_velocity
from .blocks import ConvBlock, FlowHead, UpBlock
from .layout import Head

ENCODER_CHANNELS = (8, 16, 32, 32)
DECODER_CHANNELS = (32, 16, 16, 8)


class SharedEncoder(nn.Module):
    """Feature pyramid ``[full, 1/2, 1/4, 1/8]`` of one image ``(B, 1, I, J, K)``."""

    def __init__(self, channels: tuple[int, ...] = ENCODER_CHANNELS) -> None:
        super().__init__()
        self.channels = tuple(channels)
        self.blocks = nn.ModuleList(
            [ConvBlock(1 if level == 0 else channels[level - 1], c) for level, c in enumerate(channels)]
        )

    @property
    def multiple(self) -> int:
        """Every input size must be a multiple of this."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if any(s % self.multiple for s in x.shape[2:]):
            raise InputError(f"HOF input sizes {tuple(x.shape[2:])} must be multiples of {self.multiple}")
        features = []
        for level, block in enumerate(self.blocks):
            x = block(x if level == 0 else F.max_pool3d(x, 2))
            features.append(x)
        return features


class _Decoder(nn.Module):
    """Bottleneck ConvBlock then UpBlocks over the skip levels (shared by both decoders)."""

    def __init__(self, skip_channels: tuple[int, ...], channels: tuple[int, ...]) -> None:
        super().__init__()
        levels = len(skip_channels)
        if len(channels) != levels:
            raise InputError(f"decoder channels {channels} need one entry per encoder level ({levels})")
        self.bottleneck = ConvBlock(skip_channels[-1], channels[0])
        self.ups = nn.ModuleList(
            [UpBlock(channels[i], skip_channels[levels - 2 - i], channels[i + 1]) for i in range(levels - 1)]
        )

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.bottleneck(skips[-1])
        for i, up in enumerate(self.ups):
            x = up(x, skips[len(skips) - 2 - i])
        return x


class RegistrationDecoder(nn.Module):
    """``f_r(w; F_moving, F_fixed)`` -> displacement ``(B, 3, I, J, K)`` in voxels (eq. 2)."""

    def __init__(
        self,
        encoder_channels: tuple[int, ...] = ENCODER_CHANNELS,
        channels: tuple[int, ...] = DECODER_CHANNELS,
        integration_steps: int = 5,
    ) -> None:
        super().__init__()
        self.decoder = _Decoder(tuple(2 * c for c in encoder_channels), channels)
        self.head = FlowHead(channels[-1], 3)
        self.integration_steps = int(integration_steps)

    def velocity(self, moving: list[torch.Tensor], fixed: list[torch.Tensor]) -> torch.Tensor:
        """The decoder's output before integration (with ``integration_steps = 0``: the displacement)."""
        return self.head(self.decoder([torch.cat([m, f], dim=1) for m, f in zip(moving, fixed)]))

    def integrate(self, flow: torch.Tensor) -> torch.Tensor:
        """The displacement of ``flow`` (scaling and squaring; itself with ``integration_steps = 0``)."""
        return integrate_velocity(flow, steps=self.integration_steps) if self.integration_steps > 0 else flow

    def forward(self, moving: list[torch.Tensor], fixed: list[torch.Tensor]) -> torch.Tensor:
        return self.integrate(self.velocity(moving, fixed))


class SegmentationDecoder(nn.Module):
    """``f_s(theta; F)`` -> class logits ``(B, n_classes, I, J, K)`` (eq. 6)."""

    def __init__(
        self,
        n_classes: int,
        encoder_channels: tuple[int, ...] = ENCODER_CHANNELS,
        channels: tuple[int, ...] = DECODER_CHANNELS,
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise InputError(f"the segmentation decoder needs at least 2 classes; got {n_classes}")
        self.decoder = _Decoder(tuple(encoder_channels), channels)
        self.head = Head(channels[-1], n_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.decoder(features))


class HOFNet(nn.Module):
    """The three parts together; ``register`` and ``segment`` run the encoder on raw images."""

    def __init__(
        self,
        n_classes: int,
        encoder_channels: tuple[int, ...] = ENCODER_CHANNELS,
        decoder_channels: tuple[int, ...] = DECODER_CHANNELS,
        integration_steps: int = 5,
    ) -> None:
        super().__init__()
        self.encoder = SharedEncoder(encoder_channels)
        self.registration = RegistrationDecoder(encoder_channels, decoder_channels, integration_steps)
        self.segmentation = SegmentationDecoder(n_classes, encoder_channels, decoder_channels)

    def register(self, moving: torch.Tensor, fixed: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
        """Displacement psi with ``warp(moving, psi) ~ fixed``; ``symmetric``: of ``(v(m, f) - v(f, m)) / 2``
        (module docstring), so registering the pair the other way gives the inverse mapping."""
        n = len(moving)
        features = self.encoder(torch.cat([moving, fixed]))  # both images in one batch: faster than two on the CPU
        f_moving, f_fixed = [f[:n] for f in features], [f[n:] for f in features]
        if not symmetric:
            return self.registration(f_moving, f_fixed)
        decoder = self.registration
        swapped = [torch.cat([f[n:], f[:n]]) for f in features]  # each pair's images the other way round
        both = decoder.velocity(features, swapped)  # v(m, f) for the first n, v(f, m) for the rest
        return decoder.integrate(0.5 * (both[:n] - both[n:]))

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """Class logits of ``image``."""
        return self.segmentation(self.encoder(image))
