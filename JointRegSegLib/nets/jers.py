"""JERS networks (seed 003): shared extraction U-Net, shared affine CNN, segmentation U-Net, and the joint model.

Section 3 of the paper, with the choices recorded here:

- extraction (section 3.1, eq. 4): one U-Net ``f_e`` (1 -> 1 channel, a `RegistrationUNet` run at
  half the network grid's resolution, logits upsampled trilinearly: a CPU budget choice) shared
  over ``M`` stages; ``M^j = sigmoid(k * f_e(E^{j-1}))`` with slope ``k`` (default 10) during
  training, the Heaviside step ``f_e(E^{j-1}) > 0`` (i.e. ``M^j > 0.5``) at inference; overlay layer
  ``E^j = E^{j-1} * M^j``, ``E^0 = S``; the brain mask is the product of the stage masks. The head
  bias starts at ``+0.5`` so every stage mask starts near 1 (``sigmoid(5) = 0.993``): training starts
  from "no extraction" (the paper's w/o-Ext variant) instead of halving the image at each stage;
- registration (section 3.2, eq. 5-6): one affine CNN ``f_r`` shared over ``N`` stages: stride-2
  3x3x3 convs + LeakyReLU(0.2), global average pooling, a fully connected layer to 12 numbers with
  zero weights and the identity as bias (paper: "FC to 12, zero weights + identity bias"). The 12
  numbers are the top 3x4 rows of an affine in grid_sample's normalised coordinates of the network
  grid (so a translation is a fraction of the field of view);
- composition (section 3.2.2), ours in the pull convention of this project: stage ``k`` sees
  ``W^{k-1} = E^M o A_c^{k-1}`` and predicts ``A_i^k`` aligning ``W^{k-1}`` to the atlas, so
  ``W^{k-1}(A_i^k x) = E^M(A_c^{k-1} A_i^k x)`` and ``A_c^k = A_c^{k-1} @ A_i^k`` (the newest stage
  acts on the point first; `spatial.compose_affines` order). The paper writes ``A_i^k . A_c^{k-1}``,
  which is the same composition written for points pushed forward. ``W^k`` is always resampled
  from ``E^M`` with ``A_c^k`` (never from ``W^{k-1}``), as the paper requires;
- inverse warping (section 3.3.1, eq. 7): the one-hot atlas labels are warped trilinearly into the
  raw image's network grid by ``(A_c^N)^{-1}``, giving soft per-class targets ``V``;
- segmentation (section 3.3.2, eq. 8): a U-Net ``f_s`` (1 -> C logits) on the raw image ``S``, every
  convolution followed by instance normalisation (the 3D U-Net of Cicek et al. normalises each
  convolution; batches of one or two call for instance rather than batch statistics). Without it the
  network, on images in [0, 1] whose tissues differ by a tenth of the range, needs weights that Adam
  (steps of about ``lr``) reaches only after thousands of iterations: overfitting one head's tissue
  classes reached Dice 0.49 in 200 steps, 0.90 with the normalisation. Encoder 16, 32, 32, 64 (the
  paper's has 128-512 filters; our earlier 8, 16, 16, 32 reached Dice 0.76 in 150 steps of that
  overfit, this one 0.92).

Both network grids (the raw image's and the atlas's) have the same shape, so a normalised affine is
also a map between their index spaces: ``A_index = N^-1 theta N`` (`spatial.normalised_affine_to_index`)
takes an atlas-grid index to a raw-grid index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from ..spatial.sampling import grid_sample_3d
from .layout import Conv3d
from .unet import RegistrationUNet

EXTRACTION_ENCODER = (8, 16, 16, 32)
SEGMENTATION_ENCODER = (16, 32, 32, 64)
AFFINE_CHANNELS = (8, 16, 32, 64, 64)
DEFAULT_SLOPE = 10.0


class ExtractionNet(nn.Module):
    """``f_e``: a 1 -> 1 channel U-Net giving the extraction logit; the mask is ``sigmoid(k * logit)``.

    The U-Net runs on the image average-pooled by ``2`` and its logit is upsampled trilinearly to the
    input grid (a brain mask is a smooth object; this costs an eighth of a full-resolution U-Net per
    stage on the CPU). The input size must be divisible by ``2 * 2 ** len(encoder)``.
    """

    def __init__(self, encoder: Sequence[int] = EXTRACTION_ENCODER, initial_logit: float = 0.5) -> None:
        super().__init__()
        self.unet = RegistrationUNet(in_channels=1, encoder=encoder, final=(encoder[0],), out_channels=1, head_std=1e-3)
        with torch.no_grad():
            self.unet.head.bias.fill_(initial_logit)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        coarse = self.unet(F.avg_pool3d(image, 2))
        return F.interpolate(coarse, size=image.shape[2:], mode="trilinear", align_corners=False)


class SegmentationNet(nn.Module):
    """``f_s``: a 1 -> ``classes`` U-Net giving segmentation logits of the raw image, instance-normalised (module
    docstring)."""

    def __init__(self, classes: int, encoder: Sequence[int] = SEGMENTATION_ENCODER) -> None:
        super().__init__()
        self.unet = RegistrationUNet(
            in_channels=1, encoder=encoder, final=(encoder[0],), out_channels=classes, head_std=1e-2, norm=True
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.unet(image)


class AffineNet(nn.Module):
    """``f_r``: stride-2 conv encoder on ``cat([W, T])``, global pooling, FC to 12 (identity at start)."""

    def __init__(self, channels: Sequence[int] = AFFINE_CHANNELS, negative_slope: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 2
        for c in channels:
            layers += [Conv3d(previous, int(c), 3, stride=2, padding=1), nn.LeakyReLU(negative_slope)]
            previous = int(c)
        self.encoder = nn.Sequential(*layers)
        self.fc = nn.Linear(previous, 12)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.copy_(torch.eye(3, 4).flatten())

    def forward(self, warped: torch.Tensor, atlas: torch.Tensor) -> torch.Tensor:
        """``(B, 4, 4)`` normalised affine (pull: atlas-grid point -> extracted-image point)."""
        features = self.encoder(torch.cat([warped, atlas], dim=1)).mean(dim=(2, 3, 4))
        theta = self.fc(features).view(-1, 3, 4)
        last = torch.zeros(theta.shape[0], 1, 4, dtype=theta.dtype, device=theta.device)
        last[:, 0, 3] = 1.0
        return torch.cat([theta, last], dim=1)


def affine_warp(image: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``image`` resampled at ``theta @ x`` for every output point ``x`` (normalised 4x4, zero padding)."""
    grid = F.affine_grid(theta[:, :3, :], list(image.shape), align_corners=True)
    return grid_sample_3d(image, grid, mode)


@dataclass
class JERSOutput:
    """Everything one forward pass gives (tensors on the network grids); ``mask_logits``: the slope times ``f_e``'s
    output at each stage (``M^j = sigmoid(mask_logits[j])`` in training), empty without extraction."""

    masks: list[torch.Tensor]
    mask_logits: list[torch.Tensor]
    extracted: torch.Tensor
    stage_affines: list[torch.Tensor]
    affine: torch.Tensor
    warped: torch.Tensor
    segmentation_logits: torch.Tensor | None
    inverse_labels: torch.Tensor | None


class JERS(nn.Module):
    """The joint model: ``M`` extraction stages, ``N`` registration stages, segmentation (module docstring)."""

    def __init__(
        self,
        classes: int = 4,
        extraction_encoder: Sequence[int] = EXTRACTION_ENCODER,
        affine_channels: Sequence[int] = AFFINE_CHANNELS,
        segmentation_encoder: Sequence[int] = SEGMENTATION_ENCODER,
    ) -> None:
        super().__init__()
        if classes < 2:
            raise InputError(f"JERS needs at least 2 segmentation classes (background + one); got {classes}")
        self.classes = int(classes)
        self.extraction = ExtractionNet(extraction_encoder)
        self.registration = AffineNet(affine_channels)
        self.segmentation = SegmentationNet(self.classes, segmentation_encoder)

    def extract(
        self, raw: torch.Tensor, stages: int, slope: float = DEFAULT_SLOPE, hard: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Stage masks ``M^j``, their logits ``k f_e(E^{j-1})`` and the extracted image ``E^M`` (eq. 4 and the overlay layer)."""
        masks, logits, extracted = [], [], raw
        for _ in range(stages):
            logit = slope * self.extraction(extracted)
            mask = (logit > 0).to(raw.dtype) if hard else torch.sigmoid(logit)
            masks.append(mask)
            logits.append(logit)
            extracted = extracted * mask
        return masks, logits, extracted

    def register(self, extracted: torch.Tensor, atlas: torch.Tensor, stages: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Stage affines ``A_i^k``, the composition ``A_c^N`` and ``W^N = E^M o A_c^N`` (eq. 5-6)."""
        composed = torch.eye(4, dtype=extracted.dtype, device=extracted.device).expand(extracted.shape[0], 4, 4)
        warped, stage_affines = extracted, []
        for _ in range(stages):
            step = self.registration(warped, atlas)
            stage_affines.append(step)
            composed = composed @ step  # A_c^k = A_c^{k-1} A_i^k (pull convention, module docstring)
            warped = affine_warp(extracted, composed)  # always resample E^M
        return stage_affines, composed, warped

    def forward(
        self,
        raw: torch.Tensor,
        atlas: torch.Tensor,
        atlas_onehot: torch.Tensor | None = None,
        extraction_stages: int = 5,
        registration_stages: int = 5,
        slope: float = DEFAULT_SLOPE,
        hard: bool = False,
        extraction: bool = True,
        segmentation: bool = True,
        inverse_gradient: bool = True,
    ) -> JERSOutput:
        """One joint pass; ``extraction=False`` keeps ``E^M = S`` (w/o Ext), ``segmentation=False`` skips ``f_s``;
        ``inverse_gradient=False`` stops gradients from the inverse-warped labels into the registration."""
        if extraction:
            masks, mask_logits, extracted = self.extract(raw, extraction_stages, slope, hard)
        else:
            masks, mask_logits, extracted = [torch.ones_like(raw)], [], raw
        stage_affines, composed, warped = self.register(extracted, atlas, registration_stages)
        logits = self.segmentation(raw) if segmentation else None
        inverse = None
        if atlas_onehot is not None:
            inverse_affine = torch.linalg.inv(composed if inverse_gradient else composed.detach())
            inverse = affine_warp(atlas_onehot, inverse_affine)  # eq. 7
        return JERSOutput(masks, mask_logits, extracted, stage_affines, composed, warped, logits, inverse)


__all__ = ["JERS", "AffineNet", "ExtractionNet", "JERSOutput", "SegmentationNet", "affine_warp"]
