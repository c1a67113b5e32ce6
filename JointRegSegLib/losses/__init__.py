"""Losses to minimise for registration and segmentation (similarity, segmentation, regularisers)."""

from JointRegSegLib.losses.regularisers import bending_energy, divergence_l2, gradient_l2
from JointRegSegLib.losses.segmentation import (
    cross_entropy_loss,
    edt_dice_loss,
    edt_loss,
    edt_mask,
    soft_dice_loss,
)
from JointRegSegLib.losses.similarity import LocalNCC, box_sum, lncc_loss, mi_loss, multi_axis_mi_loss, ncc_loss

__all__ = [
    "LocalNCC",
    "bending_energy",
    "box_sum",
    "cross_entropy_loss",
    "divergence_l2",
    "edt_dice_loss",
    "edt_loss",
    "edt_mask",
    "gradient_l2",
    "lncc_loss",
    "mi_loss",
    "multi_axis_mi_loss",
    "ncc_loss",
    "soft_dice_loss",
]
