"""Segmentation losses: soft Dice, cross-entropy, and the EDT losses of seed 001 (SegReg).

Tensors are (B, L, I, J, K). Every loss returns a scalar to MINIMISE.

Choices recorded here:

- ``soft_dice_loss``: the MONAI ``DiceLoss`` convention (no softmax inside, ``batch=False``): per
  batch item and label ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)``, averaged over the
  batch and the labels kept. A label absent from both prediction and target scores 0. With a
  single channel, ``include_background=False`` is ignored (as MONAI does): that channel is the
  foreground.
- ``cross_entropy_loss``: ``torch.nn.functional.cross_entropy`` averaged over all voxels.
- ``edt_mask``: seed 001, section "Loss Function": inside the region each voxel holds its
  Euclidean distance to the nearest voxel outside the region (``scipy.ndimage.
  distance_transform_edt``: region voxels on the boundary get 1 voxel, outside voxels 0), divided
  by the maximum over that region (per batch item and channel), so the values are in (0, 1] inside
  and 0 outside. The image border is not a region boundary (distances are to region-external
  voxels only). Computed on the CPU from the inputs, without gradient, and returned on the input's
  device; an empty mask gives zeros.
- ``edt_loss``: eq. 4 of seed 001 reads ``sqrt((EDT_f - Phi o EDT_m)^2)`` but the text calls it
  the MSE between the two EDT masks; we use the MSE (mean over all voxels).
- ``edt_dice_loss``: ``(L_Dice + 100 L_EDT) / 2`` (seed 001, "EDT&Dice"); the Dice term is the soft
  Dice of the (warped) region masks with every channel counted as foreground.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from JointRegSegLib.errors import InputError


def _check_same(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    """Raise InputError unless ``a`` and ``b`` are (B, C, I, J, K) tensors of the same shape."""
    if a.ndim != 5 or a.shape != b.shape:
        raise InputError(
            f"{names}: expected two (B, C, I, J, K) tensors of the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}; one-hot encode label maps and resample onto one grid."
        )


def soft_dice_loss(
    pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-5, include_background: bool = False
) -> torch.Tensor:
    """Soft Dice loss of probabilities ``pred`` against one-hot ``target`` (MONAI DiceLoss convention)."""
    _check_same(pred, target, "soft_dice_loss")
    if not include_background and pred.shape[1] > 1:
        pred, target = pred[:, 1:], target[:, 1:]
    target = target.to(pred)
    dims = tuple(range(2, pred.ndim))
    intersection = (pred * target).sum(dim=dims)
    denominator = pred.sum(dim=dims) + target.sum(dim=dims)
    dice = (2.0 * intersection + eps) / (denominator + eps)
    return (1.0 - dice).mean()


def cross_entropy_loss(logits: torch.Tensor, target_labels: torch.Tensor) -> torch.Tensor:
    """Mean voxel-wise cross-entropy of ``logits`` (B, L, I, J, K) against integer labels (B[, 1], I, J, K)."""
    if logits.ndim != 5:
        raise InputError(f"cross_entropy_loss: logits must be (B, L, I, J, K), got {tuple(logits.shape)}.")
    if target_labels.ndim == 5 and target_labels.shape[1] == 1:
        target_labels = target_labels[:, 0]
    if target_labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise InputError(
            f"cross_entropy_loss: labels {tuple(target_labels.shape)} do not match logits {tuple(logits.shape)}; "
            "pass a (B, I, J, K) or (B, 1, I, J, K) label map on the logits' grid."
        )
    if target_labels.is_floating_point():
        if not bool(torch.equal(target_labels, target_labels.round())):
            raise InputError("cross_entropy_loss: labels must be whole numbers (a label map, not probabilities).")
    target_labels = target_labels.long()
    n_labels = logits.shape[1]
    if bool((target_labels < 0).any()) or bool((target_labels >= n_labels).any()):
        raise InputError(
            f"cross_entropy_loss: labels must lie in 0..{n_labels - 1} for {n_labels} logit channels; "
            "map the label values to consecutive indices first."
        )
    return F.cross_entropy(logits, target_labels)


def edt_mask(mask: torch.Tensor, spacing: tuple[float, float, float] | None = None) -> torch.Tensor:
    """Normalised inside-distance map of a binary mask (B, C, I, J, K): 1 deepest inside, 0 outside."""
    if mask.ndim != 5:
        raise InputError(f"edt_mask: mask must be (B, 1, I, J, K), got {tuple(mask.shape)}.")
    binary = (mask.detach() > 0.5).cpu().numpy()
    out = np.zeros(binary.shape, dtype=np.float32)
    for b in range(binary.shape[0]):
        for c in range(binary.shape[1]):
            region = binary[b, c]
            if not region.any():
                continue
            dist = distance_transform_edt(region, sampling=spacing)
            out[b, c] = dist / dist.max()
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
    return torch.from_numpy(out).to(device=mask.device, dtype=dtype)


def edt_loss(warped_moving_edt: torch.Tensor, fixed_edt: torch.Tensor) -> torch.Tensor:
    """EDT loss (seed 001, eq. 4 as the MSE the text describes) between warped moving and fixed EDT maps."""
    _check_same(warped_moving_edt, fixed_edt, "edt_loss")
    return torch.mean((fixed_edt.to(warped_moving_edt) - warped_moving_edt) ** 2)


def edt_dice_loss(
    warped_moving_mask: torch.Tensor,
    fixed_mask: torch.Tensor,
    warped_moving_edt: torch.Tensor,
    fixed_edt: torch.Tensor,
    edt_weight: float = 100.0,
) -> torch.Tensor:
    """SegReg "EDT&Dice" loss (seed 001): ``(L_Dice + edt_weight * L_EDT) / 2``."""
    dice = soft_dice_loss(warped_moving_mask, fixed_mask, include_background=True)
    return 0.5 * (dice + edt_weight * edt_loss(warped_moving_edt, fixed_edt))
