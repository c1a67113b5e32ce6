"""Evaluation metrics on the fixed image's grid: overlap, similarity, Jacobian and the PMM."""

from .jacobian import deformable_jacobian, folding_percent, jacobian_determinant, sdlogj
from .overlap import dice_per_label, hd95_per_label, labels_in, mean_dice
from .pmm import pmm_map, pmm_mean
from .similarity import (
    arithmetic_normalised_mutual_information,
    joint_histogram,
    mutual_information,
    ncc,
)

__all__ = [
    "arithmetic_normalised_mutual_information",
    "deformable_jacobian",
    "dice_per_label",
    "folding_percent",
    "hd95_per_label",
    "jacobian_determinant",
    "joint_histogram",
    "labels_in",
    "mean_dice",
    "mutual_information",
    "ncc",
    "pmm_map",
    "pmm_mean",
    "sdlogj",
]
