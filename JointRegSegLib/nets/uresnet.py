"""U-ReSNet (seed 002): one shared encoder, a registration decoder (affine + deformable) and a segmentation decoder.

Architecture (paper section 3.4 and Fig. 1; channel counts 4, 8, 16 as in the released models):

- input ``cat([moving, fixed])`` (2 channels); a residual input block: two 3x3x3 convolutions
  (LeakyReLU) plus a 1x1x1 projection of the input added to their output;
- encoder: two levels, each a 2x2x2 stride-2 convolution (halves the size) then a 3x3x3
  convolution, each followed by LeakyReLU(0.2);
- affine head: global average pooling of the bottleneck -> dense(12), weights and bias zero, so
  the 3x4 matrix ``A = [I | 0] + reshape(dense)`` starts exactly at the identity (section 4);
- registration decoder: two levels of a 2x2x2 stride-2 transposed convolution, concatenation of the
  encoder's skip, a 3x3x3 convolution; then the deformable block: three 3x3x3 convolutions, the
  last one (3 channels) zero-initialised, followed by ``2 * sigmoid``: the spatial derivative
  ``g_c > 0`` of the sampling coordinate along axis ``c`` (Christodoulidis et al. 2018). The
  sampling coordinates are its cumulative sum, ``Phi_c(p) = sum_{q_c <= p_c} g_c(q) - 1``, which is
  exactly the identity at initialisation (``g = 1``) and monotonic along each axis;
- segmentation decoder: the same structure, three 3x3x3 convolutions, softmax over the classes.

Warp (eq. 1): ``W(M, D) = W(M, Phi x A)``: the sampling point of fixed voxel ``p`` is
``A (Phi(p), 1)``: the deformable coordinates first, then the affine ("multiplying the affine matrix
with the dense deformable sampling coordinates"). All coordinates are voxel indices of the network
grid (project convention, `spatial.warp`).

Affine parametrisation (our choice; the paper does not say in which frame its 12 numbers live):
the matrix acts on centred, scaled indices ``q = (p - c) / s`` (``c`` the grid centre, ``s`` half
the largest grid size), so the 3x3 part is the index-space linear part (rotation, scale, shear on an
isotropic grid) and a translation of 1 is ``s`` voxels. `UReSNet.index_affine` returns the
equivalent matrix on plain voxel indices.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..spatial.warp import identity_grid
from .layout import Conv3d, Head

SLOPE = 0.2


def _conv(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Convolution (``kernel``^3, stride, 'same' padding for odd kernels) followed by LeakyReLU."""
    return nn.Sequential(
        Conv3d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2 if kernel % 2 else 0),
        nn.LeakyReLU(SLOPE),
    )


class ResidualInput(nn.Module):
    """Two 3x3x3 convolutions with LeakyReLU, plus a 1x1x1 projection of the input (residual)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(in_channels, out_channels), Conv3d(out_channels, out_channels, 3, padding=1))
        self.skip = Conv3d(in_channels, out_channels, 1)
        self.act = nn.LeakyReLU(SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class Down(nn.Module):
    """2x2x2 stride-2 convolution then a 3x3x3 convolution (each with LeakyReLU)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(_conv(in_channels, out_channels, kernel=2, stride=2), _conv(out_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Up(nn.Module):
    """2x2x2 stride-2 transposed convolution (LeakyReLU), concatenation with the skip, 3x3x3 convolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2), nn.LeakyReLU(SLOPE))
        self.conv = _conv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class Decoder(nn.Module):
    """Two `Up` levels and a head of three 3x3x3 convolutions (the last one linear, ``out_channels``)."""

    def __init__(self, channels: tuple[int, int, int], out_channels: int, zero_last: bool) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.up1 = Up(c2, c1)
        self.up2 = Up(c1, c0)
        self.head = nn.Sequential(_conv(c0, c0), _conv(c0, c0))
        self.last = Head(c0, out_channels, 3, padding=1)
        if zero_last:
            nn.init.zeros_(self.last.weight)
            nn.init.zeros_(self.last.bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x0, x1, x2 = features
        return self.last(self.head(self.up2(self.up1(x2, x1), x0)))


def cumulative_coordinates(gradients: torch.Tensor) -> torch.Tensor:
    """Sampling coordinates ``(B, 3, I, J, K)`` (voxels) from positive axis derivatives ``g`` (same shape).

    ``Phi_c(p) = sum_{q_c = 0..p_c} g_c(q) - 1``: channel ``c`` is summed along index axis ``c``;
    ``g = 1`` gives the identity ``Phi(p) = p`` exactly.
    """
    if gradients.ndim != 5 or gradients.shape[1] != 3:
        raise InputError(f"coordinate derivatives must be (B, 3, I, J, K); got {tuple(gradients.shape)}")
    return torch.stack([torch.cumsum(gradients[:, c], dim=1 + c) for c in range(3)], dim=1) - 1.0


class UReSNet(nn.Module):
    """The U-ReSNet network (see the module docstring). ``forward(moving, fixed)`` returns a dict.

    Output keys: ``theta`` (B, 3, 4) the affine in the centred frame (identity + head output),
    ``gradients`` (B, 3, I, J, K) the positive axis derivatives ``g``, ``coordinates`` the
    deformable sampling coordinates ``Phi``, ``seg`` (B, n_classes, I, J, K) the softmax of the
    moving image's segmentation.
    """

    def __init__(self, n_classes: int, channels: tuple[int, int, int] = (4, 8, 16)) -> None:
        super().__init__()
        if n_classes < 2:
            raise InputError(f"U-ReSNet needs at least 2 segmentation classes (background + one); got {n_classes}")
        c0, c1, c2 = channels
        self.n_classes = int(n_classes)
        self.channels = tuple(int(c) for c in channels)
        self.inp = ResidualInput(2, c0)
        self.down1 = Down(c0, c1)
        self.down2 = Down(c1, c2)
        self.affine = nn.Linear(c2, 12)
        nn.init.zeros_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)
        self.registration = Decoder(self.channels, 3, zero_last=True)
        self.segmentation = Decoder(self.channels, self.n_classes, zero_last=False)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        if moving.ndim != 5 or moving.shape != fixed.shape or moving.shape[1] != 1:
            raise InputError(
                f"U-ReSNet needs two single-channel (B, 1, I, J, K) images of one shape; got {tuple(moving.shape)} "
                f"and {tuple(fixed.shape)}"
            )
        if any(s % 4 for s in moving.shape[2:]):
            raise InputError(f"U-ReSNet's grid sizes must be multiples of 4 (two down levels); got {tuple(moving.shape[2:])}")
        x0 = self.inp(torch.cat([moving, fixed], dim=1))
        x1 = self.down1(x0)
        x2 = self.down2(x1)
        identity = torch.eye(3, 4, dtype=x2.dtype, device=x2.device)
        theta = identity + self.affine(x2.mean(dim=(2, 3, 4))).view(-1, 3, 4)
        gradients = 2.0 * torch.sigmoid(self.registration([x0, x1, x2]))
        seg = torch.softmax(self.segmentation([x0, x1, x2]), dim=1)
        return {"theta": theta, "gradients": gradients, "coordinates": cumulative_coordinates(gradients), "seg": seg}


def frame(shape: tuple[int, ...], dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """4x4 ``F`` taking a voxel index to the centred, scaled frame of the affine head: ``q = (p - c) / s``."""
    sizes = torch.as_tensor([float(n) for n in shape], dtype=dtype, device=device)
    centre = (sizes - 1.0) / 2.0
    scale = float(max(shape) - 1) / 2.0
    f = torch.eye(4, dtype=dtype, device=device)
    f[:3, :3] /= scale
    f[:3, 3] = -centre / scale
    return f


def index_affine(theta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Index affines ``(B, 4, 4)`` ``A = F^-1 [theta; 0 0 0 1] F`` of centred-frame matrices ``theta (B, 3, 4)``."""
    f = frame(shape, theta.dtype, theta.device)
    bottom = torch.zeros(theta.shape[0], 1, 4, dtype=theta.dtype, device=theta.device)
    bottom[..., 3] = 1.0
    return torch.linalg.inv(f) @ torch.cat([theta, bottom], dim=1) @ f


def total_displacement(index_matrix: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """Voxel displacement of the whole mapping ``p -> A (Phi(p), 1)`` (eq. 1), ``(B, 3, I, J, K)``."""
    moved = torch.einsum("brc,bcijk->brijk", index_matrix[:, :3, :3], coordinates) + index_matrix[:, :3, 3, None, None, None]
    return moved - identity_grid(coordinates.shape[2:], device=coordinates.device, dtype=coordinates.dtype)
