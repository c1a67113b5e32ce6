"""Reusable 3D building blocks for the registration and segmentation networks.

All blocks work on tensors shaped ``(B, C, I, J, K)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from .layout import Conv3d, Head

UPSAMPLE_MODES = ("nearest", "trilinear")


class ConvBlock(nn.Module):
    """3x3x3 convolution (stride 1, zero padding 1), optionally instance normalisation (learned scale and shift, as
    the 3D U-Net's batch normalisation for batches of one or two), then LeakyReLU(``negative_slope``)."""

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float = 0.2, norm: bool = False) -> None:
        super().__init__()
        self.conv = Conv3d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm = nn.InstanceNorm3d(out_channels, affine=True) if norm else nn.Identity()
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class UpBlock(nn.Module):
    """Upsample by 2, concatenate the skip connection (upsampled first, skip second), ConvBlock.

    ``mode`` is ``"nearest"`` (VoxelMorph's choice) or ``"trilinear"`` (``align_corners=False``,
    which is what a factor-2 resize of cell-centred feature maps means). The output size is taken
    from the skip tensor, so odd sizes inside deeper networks still line up.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        mode: str = "nearest",
        negative_slope: float = 0.2,
        norm: bool = False,
    ) -> None:
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise InputError(f"upsampling mode {mode!r} is not one of {UPSAMPLE_MODES}")
        self.mode = mode
        self.conv = ConvBlock(in_channels + skip_channels, out_channels, negative_slope, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            up = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        else:
            up = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.conv(torch.cat([up, skip], dim=1))


class FlowHead(Head):
    """3x3x3 convolution to a ``out_channels``-vector field, weights ~ N(0, ``std``^2), zero bias.

    The tiny initialisation makes an untrained network predict (almost) the identity transform,
    as in VoxelMorph and SynthMorph.
    """

    def __init__(self, in_channels: int, out_channels: int = 3, std: float = 1e-5) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        nn.init.normal_(self.weight, mean=0.0, std=std)
        nn.init.zeros_(self.bias)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
