"""SegReg (seed 001): segmentation-driven, piecewise-smooth registration.

Each region pair ``(I_m * S_m^i, I_f * S_f^i)`` (eq. 3) is registered by its own smooth field
``Phi_i``; the fields are composed on the fixed grid, ``Phi = sum_i Phi_i * S_f^i`` (section
"Deformation Field Composition"), so the deformation may slide at region borders. Regions come
from the two label maps (`regions`: ``all``, ``coarse`` or ``N``). Options (``options.extra``;
the CLI's ``--option KEY=VALUE``):

``variant``           ``iterative`` (default; no training) or ``learned`` (the shared U-Net)
``mask_loss``         ``dice`` (default), ``edt`` or ``edt-dice`` (L_m of eq. 5)
``regions``           ``all`` (default), ``coarse`` or a number of regions (see `regions`)
``similarity``        L_v: ``ncc`` (default), ``mse`` or ``none``
``weights``           ``[g0, g1, g2]`` of eq. 5 (defaults below)
``levels``            iterative: pooling factors of the pyramid, coarse to fine (default ``[4, 2]``)
``level_iterations``  iterative: Adam iterations per pyramid level (default ``[60, 40]``)
``fine_iterations``   iterative: iterations of the sampled fine stage (default 60)
                      (``options.iterations`` sets every level and the fine stage)
``lr``                iterative: Adam learning rate, in voxels of the level (default 0.25)
``field_smoothing``   iterative: 3x3x3 box passes applied to the optimised field (default 2)
``integration_steps`` iterative: scaling-and-squaring steps (default 0: the field is the displacement)
``margin_mm``         iterative: context kept around each region (default 5 mm)
``mask_smoothing``    Gaussian sigma (voxels of the fine grid) of the composition masks (default 0:
                      the paper's hard masks)
``background_reach_mm`` composition: background (unlabelled) voxels within this distance of a labelled
                      voxel take the field of the nearest labelled voxel's region (default 0: the
                      paper's background field; at most ``REG_DILATION`` voxels of the finest level,
                      4 mm on a 1 mm grid, where the region fields are regularised)
``affine``            the affine pre-alignment: ``image`` (default: `affine_stage.fit_affine`, MI on
                      the images), ``labels`` (least squares on the shared labels' centroids, fast and
                      contrast-free) or ``none``
``spacing``           the fine network grid spacing in mm (default: the fixed image's smallest voxel
                      size, but not below 1 mm); learned: the network's spacing (2 mm) divided by 1,
                      2 or 4 (``spacing=2`` runs everything at 2 mm: faster, coarser region borders)
``weights_name``      learned: which shipped weights (default ``segreg-<mask_loss>``)
``batch``             learned: region crops per network call (default 4)

Choices where the paper is silent (recorded here, as METHODS.md asks):

- Grid: both images (and label maps, nearest neighbour) are resampled onto the fixed image's
  network grid (`common.prepare_pair`, RAS, isotropic ``spacing``). The pair of ../shared/data is
  only centre-of-mass aligned, so an affine stage comes first; the moving image and label map are
  resampled through it once (trilinear / nearest), the region fields register that pre-aligned
  moving image, and the output field is the composition ``affine o composed`` (`spatial.compose`),
  so the written field holds the whole mapping.
- Crops: region i is optimised on the box of its fixed mask widened by ``margin_mm`` (corners on
  multiples of the coarsest pooling factor); the moving side samples the box of the moving mask
  widened the same way (border padding). A region's field only matters where ``S_f^i`` is 1, so
  cost follows the regions' sizes, not their number. The background's box is that of the
  foreground it surrounds (plus the margin); beyond it the background field repeats its edge
  values (the far background holds nothing to align).
- Iterative variant (section "Training and Inference", ThoraxCBCT): per region, the field is
  optimised directly with Adam, starting from the translation between the region's fixed and
  moving centroids (zero for the background), on a pyramid of average-pooled crops (``levels``),
  carried to the next level by cell-centred trilinear upsampling (``align_corners=False``, values
  scaled by the factor), with the paper's polynomial learning-rate decay (power 0.9) restarted at
  each stage. Average pooling is not translation-equivariant (a mask shifted by 3 voxels and
  pooled by 2 is not the pooled mask shifted by 1.5), so a pooled loss is biased by up to a
  pooled voxel and leaves a wavy field; a last *sampled fine stage* keeps the field at the finest
  level but evaluates the loss at fine-grid voxels on a stride-``factor`` lattice whose offset
  cycles through all ``factor^3`` positions (seeded order), sampling the fine crops: unbiased, at
  the cost of the pooled level. The parameter goes through ``field_smoothing`` passes of a 3x3x3
  box average before use (the instance optimisation of ConvexAdam, Siebert et al. 2021, which the
  paper compares with): Adam's per-voxel step normalisation otherwise lets weakly constrained
  voxels wander. ``integration_steps`` > 0 makes the parameter a stationary velocity integrated by
  scaling and squaring (`spatial.integrate_velocity`), R then acting on the velocity (VoxelMorph).
  Fields stay at the finest pyramid level (2 mm for the 1 mm pair; smooth within a region) and
  are upsampled to the fine grid for the composition, which uses the fine masks, so the
  discontinuities sit on the 1 mm borders.
- Losses per region (eq. 5), summed over regions: ``g0 L_v + g1 L_m + g2 R``.
  L_v: global NCC (`losses.ncc_loss`) of the masked images over the region's crop (the paper's
  abdomen setting, inter-subject), or MSE summed over the crop and divided by the fixed region's
  voxel count. L_m Dice: `losses.soft_dice_loss` of the warped (trilinear, so soft) moving region
  mask against the fixed one. L_m EDT: `losses.edt_mask` maps of both masks (distance to the
  region border inside, normalised to 0-1; computed once on the fine grid, average-pooled per
  level), the MSE of `losses.edt_loss` taken as a sum over the crop divided by the fixed region's
  voxels, so the term does not depend on how much background a crop holds. EDT&Dice:
  ``(L_Dice + w L_EDT) / 2`` (the formula of `losses.edt_dice_loss`) on that region-mean EDT term
  with w = 10 (the paper's w = 100 multiplies a whole-image mean; for a 3-voxel misalignment of a
  20-voxel structure our region-mean EDT term is about a tenth of the Dice loss, so w = 10 balances
  them as the paper intends). R (section "Training and Inference": "L2-regularisation within each
  sub-region, split by the fixed segmentation"): forward-difference gradient-L2 (the convention
  of `losses.gradient_l2`, which it equals for a mask of ones) weighted by the fixed region mask
  dilated by 2 voxels of the level (the field is also read just outside the region by trilinear
  upsampling and mask smoothing); outside that band the field is free and never used.
- Default weights ``[g0, g1, g2]``: dice ``[1, 1, 0.5]``, edt ``[1, 10, 0.5]``, edt-dice
  ``[1, 1, 0.5]`` (the paper's abdomen ratios are 1:1:0.1 and 1:100:0.1 for its normalisations;
  on ../shared/data/pair g2 = 0.5 instead of 0.05 cost 0.005 Dice and removed 40 % of the folding).
- Composition: ``u = sum_i u_i * S_f^i`` (the identity parts cancel since ``sum_i S_f^i = 1``);
  with ``mask_smoothing`` = sigma > 0 the masks are Gaussian-blurred and renormalised to sum 1
  (a light smoothing of the discontinuity, METHODS.md: fewer folds, lower Dice for thin
  structures). A region empty in the fixed map has no weight anywhere and is skipped.
  With hard masks the sum is taken on the fixed image's own grid (`field_on_fixed_grid`): each
  fixed voxel takes its own region's field, interpolated from that field alone, so a voxel beside
  a border never mixes two sliding regions' displacements where the fine grid is off the fixed grid
  (2 mm sample data, odd sizes, other spacings). The background of a brain label map also holds
  unlabelled tissue (sulcal CSF, the medial surface at the midline) that the one smooth background
  field cannot follow: with ``background_reach_mm`` > 0, background voxels within that distance of a
  labelled voxel take the field of the nearest labelled voxel's region (capped at the band where
  that field is regularised, so it is defined there). Off by default: on ../shared/data/pair it cuts
  folding by a fifth but makes the near-brain background less plausible (docs/results/segreg.md).
- Learned variant: `nets.RegistrationUNet` (VoxelMorph-like: 4 down / 4 up with skips; the
  architecture is stored with the weights) predicts a stationary velocity on each region pair
  (moving first), integrated by scaling and squaring, at the coarser level the weights were
  trained for (``factor`` 2: 2 mm for a 1 mm grid). Inference batches the regions: each region's
  crop (the box of both masks plus 3 network voxels, its size rounded up to a multiple of 16 at
  the network's level, the rule training uses) is grouped with the crops of the same size,
  ``batch`` per network call. A region pair whose masked images are both empty (the background
  of skull-stripped scans) carries no information: its voxels get the smooth extension of the
  other regions' composed field (`extend_field`: normalised Gaussian convolution), which keeps
  the brain outline where the neighbouring structures put it. Training: `training.segreg`.
- Time budget (``options.time_budget``, seconds): the iterative optimisation stops when it is
  spent and composes the fields reached so far. Deterministic for a given seed (the only random
  draws are the affine stage's voxel sampling and the fine stage's lattice order, both seeded
  with ``options.seed``).
- Inputs: both label maps are required. Each may lie on its own grid: it is resampled (nearest,
  through physical space) onto the network grid; a label map that covers less than half of its
  image's extent is taken for the wrong file and refused. Regions found in one map only are
  merged into their neighbours (`regions`); maps sharing no label are refused.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..errors import InputError, WeightsError
from ..imageio.geometry import Volume
from ..imageio.network_grid import corner_points, network_geometry, resample
from ..losses import edt_mask, ncc_loss, soft_dice_loss
from ..nets import RegistrationUNet
from ..nets.layout import fast_layout
from ..spatial import affine_displacement_at, affine_to_displacement, fit_to_points, identity_grid, integrate_velocity, sample_at_indices, warp
from ..spatial.physical import grid_indices_of, grid_steps_to_physical
from ..synth.render import gaussian_blur
from ..timing import Stopwatch
from ..weights import fit_state, load_weights, read_manifest
from .affine_stage import fit_affine
from .base import Inputs, Options, ProgressCallback, Result
from .catalogue import method_info
from .common import NetworkPair, prepare_pair, result_from_physical_field
from .options import SEGREG_DEFAULT_WEIGHTS, SEGREG_MASK_LOSSES, SEGREG_VARIANTS, validate_options
from .regions import RegionPlan, plan_regions

VARIANTS = SEGREG_VARIANTS
MASK_LOSSES = SEGREG_MASK_LOSSES
DEFAULT_WEIGHTS = SEGREG_DEFAULT_WEIGHTS
EDT_MIX_WEIGHT = 10.0  # EDT&Dice = (L_Dice + w L_EDT) / 2 with L_EDT a mean over the region (paper: w = 100, image mean)
REG_DILATION = 2  # voxels of the level around the fixed region where R applies
MIN_COVERAGE = 0.5

@dataclass
class Settings:
    """SegReg's options, checked (see the module docstring)."""

    variant: str = "iterative"
    mask_loss: str = "dice"
    regions: str | int = "all"
    similarity: str = "ncc"
    weights: tuple[float, float, float] = DEFAULT_WEIGHTS["dice"]
    levels: tuple[int, ...] = (4, 2)
    level_iterations: tuple[int, ...] = (60, 40)
    fine_iterations: int = 60
    lr: float = 0.25
    integration_steps: int = 0
    field_smoothing: int = 2
    margin_mm: float = 5.0
    mask_smoothing: float = 0.0
    background_reach_mm: float = 0.0
    affine: str = "image"
    spacing: float | None = None
    weights_name: str = "segreg-dice"
    batch: int = 4

    @classmethod
    def from_options(cls, options: Options) -> "Settings":
        """The declared options (`options.OPTIONS['segreg']`) checked, and the cross-checks between them."""
        values = validate_options("segreg", options.extra)
        levels = values["levels"]
        if list(levels) != sorted(set(levels), reverse=True):
            raise InputError(f"segreg option 'levels' must list pooling factors coarse to fine, e.g. [4, 2]; got {list(levels)}.")
        if options.iterations is not None:
            if options.iterations < 1:
                raise InputError(f"segreg needs at least 1 iteration; got {options.iterations}.")
            iterations = (int(options.iterations),) * len(levels)
            fine_iterations = int(options.iterations)
        else:
            iterations, fine_iterations = values["level_iterations"], values["fine_iterations"]
            if len(iterations) != len(levels):
                raise InputError(
                    f"segreg option 'level_iterations' needs one count per pyramid level {list(levels)}; got {list(iterations)}."
                )
        mask_loss = values["mask_loss"]
        return cls(
            variant=values["variant"],
            mask_loss=mask_loss,
            regions=values["regions"],
            similarity=values["similarity"],
            weights=DEFAULT_WEIGHTS[mask_loss] if values["weights"] is None else values["weights"],
            levels=levels,
            level_iterations=iterations,
            fine_iterations=fine_iterations,
            lr=values["lr"],
            integration_steps=values["integration_steps"],
            field_smoothing=values["field_smoothing"],
            margin_mm=values["margin_mm"],
            mask_smoothing=values["mask_smoothing"],
            background_reach_mm=values["background_reach_mm"],
            affine=values["affine"],
            spacing=values["spacing"],
            weights_name=values["weights_name"] or f"segreg-{mask_loss}",
            batch=values["batch"],
        )


# ----------------------------------------------------------------------------- inputs and regions


def check_segmentations(inputs: Inputs) -> None:
    """Both label maps are present and each covers its image (else `InputError` saying what to do)."""
    for which in ("fixed", "moving"):
        labels: Volume | None = getattr(inputs, f"{which}_seg")
        if labels is None:
            raise InputError(
                f"segreg needs label maps of both images; the {which} label map is missing. Give --{which}-seg "
                "(a label map file or a Slicer segmentation), or produce one with a segmentation method first."
            )
        image: Volume = getattr(inputs, which)
        coverage = _coverage(labels, image)
        if coverage < MIN_COVERAGE:
            raise InputError(
                f"the {which} label map covers only {100 * coverage:.0f}% of the {which} image's extent: it was "
                f"probably made for another image. Give the label map of this {which} image."
            )


def _coverage(labels: Volume, image: Volume) -> float:
    """Fraction of the image's bounding box (along its own axes) that the label map's bounding box covers."""
    to_image = image.geometry.physical_to_index_matrix
    corners = corner_points(labels.geometry) @ to_image[:3, :3].T + to_image[:3, 3]
    low = np.maximum(corners.min(axis=0), -0.5)
    high = np.minimum(corners.max(axis=0), np.asarray(image.geometry.shape) - 0.5)
    extent = np.clip(high - low, 0.0, None)
    return float(np.prod(extent / np.asarray(image.geometry.shape, dtype=np.float64)))


@dataclass
class Box:
    """A box of the fine network grid, ``start`` inclusive, ``stop`` exclusive (voxels)."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def slices(self, factor: int = 1) -> tuple[slice, slice, slice]:
        return tuple(slice(a // factor, b // factor) for a, b in zip(self.start, self.stop))

    def shape(self, factor: int = 1) -> tuple[int, int, int]:
        return tuple((b - a) // factor for a, b in zip(self.start, self.stop))

    def size(self, factor: int = 1) -> int:
        return int(np.prod(self.shape(factor)))


def region_box(mask: np.ndarray, margin: int, multiple: int, min_size: int = 0) -> Box:
    """Bounding box of ``mask`` widened by ``margin``, its corners on multiples of ``multiple``, inside the grid.

    With ``min_size`` the box size is rounded up to a multiple of ``min_size`` (shifted back inside
    the grid where it would leave it; the grid size must itself be such a multiple).
    """
    bounds = []
    for axis in range(3):
        profile = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        bounds.append(slice(int(profile[0]), int(profile[-1]) + 1))
    return box_around(tuple(bounds), mask.shape, margin, multiple, min_size)


def box_around(
    bounds: tuple[slice, slice, slice], shape: tuple[int, ...], margin: int, multiple: int, min_size: int = 0
) -> Box:
    """`region_box` of a mask whose bounding box is ``bounds`` (slices, as `scipy.ndimage.find_objects` gives)."""
    start, stop = [], []
    for axis in range(3):
        low = max(bounds[axis].start - margin, 0) // multiple * multiple
        high = min(-(-(bounds[axis].stop + margin) // multiple) * multiple, shape[axis])
        if min_size:
            size = min(-(-(high - low) // min_size) * min_size, shape[axis])
            low = max(min(low, shape[axis] - size), 0)
            high = low + size
        start.append(low)
        stop.append(high)
    return Box(tuple(start), tuple(stop))


def region_bounds(region_map: np.ndarray, count: int) -> list[tuple[slice, slice, slice] | None]:
    """Bounding box (slices) of every region 0 .. count - 1 of a region map (None when empty), in one pass."""
    objects = ndimage.find_objects(region_map.astype(np.int32) + 1, max_label=count)
    return [tuple(o) if o is not None else None for o in objects]


def _union(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, slice, slice]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _one_hot_float(region_map: torch.Tensor, region: int, box: Box) -> torch.Tensor:
    return (region_map[(0, 0) + box.slices()] == region).float()[None, None]


def _masked(image: torch.Tensor, region_map: torch.Tensor, region: int, box: Box) -> torch.Tensor:
    """``image * one-hot(region)`` on ``box`` (one selection instead of a mask made, converted and multiplied)."""
    inside = (slice(None), slice(None)) + box.slices()
    return torch.where(region_map[inside] == region, image[inside], 0.0)


def _pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool3d(x, factor) if factor > 1 else x


def upsample_field(disp: torch.Tensor, factor: int) -> torch.Tensor:
    """A voxel field on a grid pooled by ``factor`` carried to the finer grid (cell-centred trilinear, scaled)."""
    if factor == 1:
        return disp
    return F.interpolate(disp * factor, scale_factor=factor, mode="trilinear", align_corners=False)


def field_at(disp: torch.Tensor, factor: int, points: torch.Tensor) -> torch.Tensor:
    """A pooled voxel field read at fine-grid indices ``points (1, I', J', K', 3)``, edge values beyond it: fine index
    ``p`` lies at pooled index ``(p + 1/2) / factor - 1/2``, so at whole fine voxels this is ``upsample_field(disp,
    factor)`` there, without upsampling the whole box; between them, linear interpolation of the pooled field."""
    if factor == 1:
        return sample_at_indices(disp, points, padding_mode="border")
    return sample_at_indices(disp * factor, (points + 0.5) / factor - 0.5, padding_mode="border")


def smooth_field(param: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` 3x3x3 box averages of a field (edge values repeated beyond the grid)."""
    for _ in range(passes):
        param = F.avg_pool3d(F.pad(param, (1, 1, 1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return param


def masked_gradient_l2(disp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gradient-L2 of ``disp (B, 3, I, J, K)`` restricted to ``weight (B, 1, I, J, K)``, per item, then the batch mean.

    Forward differences as `losses.gradient_l2`; each difference is weighted by the smaller weight
    of its two voxels; per axis the weighted mean over components and positions, then the mean of
    the three axes. Equals `gradient_l2` for a weight of ones and one item.
    """
    total = disp.new_zeros(disp.shape[0])
    dims = (1, 2, 3, 4)
    for axis in (2, 3, 4):
        n = disp.shape[axis]
        diff = disp.narrow(axis, 1, n - 1) - disp.narrow(axis, 0, n - 1)
        w = torch.minimum(weight.narrow(axis, 1, n - 1), weight.narrow(axis, 0, n - 1))
        total = total + (diff.pow(2).sum(dim=1, keepdim=True) * w).sum(dim=dims) / (3.0 * w.sum(dim=dims).clamp_min(1e-8))
    return (total / 3.0).mean()


# ----------------------------------------------------------------------------- shared stages


@dataclass
class Prepared:
    """The pair on the fine grid after the affine stage, and its regions."""

    pair: NetworkPair
    affine_index: np.ndarray
    affine_disp: torch.Tensor
    moving: torch.Tensor
    fixed_regions: torch.Tensor
    moving_regions: torch.Tensor
    plan: RegionPlan
    watch: Stopwatch = field(default_factory=Stopwatch)


AffineSchedule = tuple[tuple[int, ...], tuple[int, ...], int]
"""Pooling levels (coarse to fine), iterations per level and voxels sampled per iteration of `fit_affine`."""

FULL_AFFINE: AffineSchedule = ((4, 2), (150, 60), 8000)
# learned variant: one 4x-pooled level (at 1 mm, finer levels in so few steps lowered the Dice after the affine on the pair);
# 8192 samples a step: the affine's Dice over seeds 0.5435 +- 0.0024 against 0.532 +- 0.015 with 2048, whose
# spread carried into the final Dice (0.707-0.742 over seeds 0-2; 0.730-0.737 with 8192); 80 steps, not 120: the
# final Dice over seeds 0-5 on the pair 0.8226 (0.8220-0.8237) against 0.8222 (0.8218-0.8227), on two synthetic
# pairs (seeds 0-2) 0.8370 / 0.8287 against 0.8365 / 0.8289, the stage 0.87 -> 0.60 s (60 steps: 0.8219, down to 0.8191)
QUICK_AFFINE: AffineSchedule = ((4,), (80,), 8192)


def prepare(
    inputs: Inputs, settings: Settings, options: Options, multiple: int, progress: ProgressCallback,
    schedule: AffineSchedule = FULL_AFFINE,
) -> Prepared:
    """Resample, fit the affine stage, pre-align the moving image and label map, and plan the regions."""
    check_segmentations(inputs)
    device = torch.device(options.device)
    watch = Stopwatch()
    with watch.step("network grid"):
        shape = network_geometry(inputs.fixed.geometry, settings.spacing, multiple=multiple).shape
        pair = prepare_pair(inputs, device, settings.spacing, shape)
    with watch.step("affine stage"):
        matrix, affine_disp, moving, moving_labels = _affine_stage(pair, settings, options, shape, schedule, progress)
    with watch.step("regions"):
        plan = plan_regions(pair.fixed_seg[0, 0].cpu().numpy(), moving_labels[0, 0].cpu().numpy(), settings.regions)

    def as_tensor(region_map: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(region_map.astype(np.int64))[None, None].to(device)

    return Prepared(pair, matrix, affine_disp, moving, as_tensor(plan.fixed), as_tensor(plan.moving), plan, watch)


def _affine_stage(
    pair: NetworkPair, settings: Settings, options: Options, shape: tuple[int, int, int], schedule: AffineSchedule,
    progress: ProgressCallback,
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The affine pre-alignment (index matrix, its displacement) and the moving image and label map it pre-aligns."""
    device = pair.fixed.device
    if settings.affine == "none":
        matrix = np.eye(4)
    else:
        if settings.affine == "labels":
            matrix = label_affine(pair.fixed_seg[0, 0].cpu().numpy(), pair.moving_seg[0, 0].cpu().numpy())
        else:
            levels, iterations, samples = schedule
            usable = tuple(f for f in levels if min(n // f for n in shape) >= 4) or (1,)
            matrix = fit_affine(
                pair.fixed, pair.moving, levels=usable, iterations=iterations[-len(usable):], samples=samples,
                seed=options.seed, progress=progress,
            )
    affine_disp = affine_to_displacement(torch.as_tensor(matrix, dtype=torch.float32), shape).to(device)
    moving = warp(pair.moving, affine_disp, padding_mode="zeros")
    moving_labels = warp(pair.moving_seg.float(), affine_disp, mode="nearest", padding_mode="zeros").round().long()
    return matrix, affine_disp, moving, moving_labels


def label_affine(fixed_labels: np.ndarray, moving_labels: np.ndarray) -> np.ndarray:
    """Index affine (fixed -> moving, 4x4) fitted to the centroids of the labels both maps share.

    Weighted least squares ``c_m = A c_f + t`` over the shared non-zero labels, each weighted by
    the smaller of its two voxel counts (solved on centred coordinates); with fewer than 4 shared
    labels, or centroids too close to a plane (smallest singular value of the centred, weighted
    centroids under 5 % of the largest), the translation of the foreground centroids alone.
    """
    codes = sorted((set(np.unique(fixed_labels).tolist()) & set(np.unique(moving_labels).tolist())) - {0})
    fixed_c = np.array(ndimage.center_of_mass(np.ones_like(fixed_labels), fixed_labels, codes)).reshape(-1, 3)
    moving_c = np.array(ndimage.center_of_mass(np.ones_like(moving_labels), moving_labels, codes)).reshape(-1, 3)
    weights = np.minimum(ndimage.sum_labels(np.ones_like(fixed_labels), fixed_labels, codes),
                         ndimage.sum_labels(np.ones_like(moving_labels), moving_labels, codes)).reshape(-1)
    matrix = fit_to_points(fixed_c, moving_c, weights)
    if matrix is None:
        matrix = np.eye(4)
        matrix[:3, 3] = np.array(ndimage.center_of_mass(moving_labels > 0)) - np.array(ndimage.center_of_mass(fixed_labels > 0))
    return matrix


def composition_weights(fixed_regions: torch.Tensor, region: int, box: Box, sigma: float) -> torch.Tensor:
    """Region ``region``'s composition mask on ``box`` (one-hot, or Gaussian-blurred with ``sigma`` voxels)."""
    mask = _one_hot_float(fixed_regions, region, box)
    if sigma <= 0:
        return mask
    blurred = ndimage.gaussian_filter(mask[0, 0].cpu().numpy(), sigma, mode="constant")
    return torch.from_numpy(blurred.astype(np.float32))[None, None].to(mask.device)


def _replicate_to(disp: torch.Tensor, box: Box, shape: tuple[int, int, int]) -> torch.Tensor:
    """A field on ``box`` extended to the whole grid by repeating its edge values."""
    pads = []
    for axis in (2, 1, 0):  # F.pad lists the last axis first
        pads += [box.start[axis], shape[axis] - box.stop[axis]]
    return F.pad(disp, pads, mode="replicate")


def extend_field(total: torch.Tensor, known: torch.Tensor, pool: int = 4, sigma: float = 2.0) -> torch.Tensor:
    """Fill ``total (1, 3, ...)`` outside ``known (1, 1, ...)`` with the smooth extension of its values inside.

    Normalised Gaussian convolution on a grid pooled by ``pool`` (``sigma`` pooled voxels, radius
    3 sigma): ``blur(u * known) / blur(known)``, beyond the blur's reach the nearest value within
    it, upsampled (cell-centred trilinear) and used where ``known`` is 0.
    """
    radius = int(math.ceil(3 * sigma))
    num = _pool(total * known, pool)
    den = _pool(known, pool)
    blur = gaussian_blur(torch.cat([num, den], dim=1).transpose(0, 1), torch.full((4,), sigma, device=total.device), radius)
    blur = blur.transpose(0, 1)
    ratio = blur[:, :3] / blur[:, 3:].clamp_min(1e-6)
    reach = (blur[0, 3] > 1e-3).cpu().numpy()
    if reach.any() and not reach.all():
        _, index = ndimage.distance_transform_edt(~reach, return_indices=True)
        ratio = ratio[(slice(None), slice(None)) + tuple(torch.from_numpy(i).to(ratio.device) for i in index)]
    fine = F.interpolate(ratio, size=tuple(total.shape[2:]), mode="trilinear", align_corners=False)
    return total * known + fine * (1.0 - known)


def compose_regions(
    prepared: Prepared, fields: dict[int, tuple[Box, torch.Tensor, int]], sigma: float, extend: bool = False
) -> torch.Tensor:
    """``u = sum_i u_i * S_f^i`` on the fine grid (the deformable part, before the affine stage).

    ``fields[r] = (box, u_r on the box pooled by factor, factor)``. With ``sigma`` > 0 the masks are
    blurred and the sum renormalised by the sum of the blurred masks. With ``extend``, regions
    without a field get the smooth extension of the others (`extend_field`). `field_on_fixed_grid`
    turns it into the whole mapping on the fixed image's grid.
    """
    fixed_regions = prepared.fixed_regions
    total = torch.zeros((1, 3) + tuple(fixed_regions.shape[2:]), device=fixed_regions.device)
    norm = torch.zeros((1, 1) + tuple(fixed_regions.shape[2:]), device=fixed_regions.device) if sigma > 0 else None
    shape = tuple(fixed_regions.shape[2:])
    with torch.no_grad():
        for region, (box, disp, factor) in fields.items():
            if box.shape() != shape and region == 0:  # the background box holds the voxels near the foreground
                box, disp = Box((0, 0, 0), shape), _replicate_to(upsample_field(disp, factor), box, shape)
                factor = 1
            weight = composition_weights(fixed_regions, region, box, sigma)
            total[(slice(None), slice(None)) + box.slices()] += upsample_field(disp, factor) * weight
            if norm is not None:
                norm[(slice(None), slice(None)) + box.slices()] += weight
        if norm is not None:
            total = total / norm.clamp_min(1e-6)
        if extend:
            known = torch.isin(fixed_regions, torch.tensor(list(fields), device=fixed_regions.device)).float()
            total = extend_field(total, known)
        return total


def fixed_grid_regions(inputs: Inputs, prepared: Prepared, points: torch.Tensor) -> np.ndarray:
    """The region of every fixed-image voxel, from the fixed label map on the fixed image's own grid.

    Codes map to regions through the plan's code groups; voxels whose code the plan dropped (found
    in one map only, or lost by the resampling) take the region of the nearest fine-grid voxel
    (``points``: their fine-grid indices).
    """
    labels = inputs.fixed_seg
    if not labels.geometry.same_as(inputs.fixed.geometry):
        labels = resample(labels, inputs.fixed.geometry, "nearest")
    codes = labels.array
    table = np.full(int(codes.max()) + 1, -1, dtype=np.int64)  # code -> region (-1: dropped), one gather
    for region, group in enumerate(prepared.plan.codes):
        table[[code for code in group if 0 <= code < len(table)]] = region
    regions = table[codes]
    dropped = regions < 0
    if dropped.any():
        where = torch.from_numpy(dropped)
        nearest = sample_at_indices(
            prepared.fixed_regions.float(), points[where].view(1, -1, 1, 1, 3), mode="nearest", padding_mode="border"
        )
        regions[dropped] = nearest.view(-1).round().long().cpu().numpy()
    return regions


def background_reach(settings: Settings, factor: int) -> float:
    """``background_reach_mm``, capped at the band where the fields (at level ``factor``) are regularised."""
    return min(settings.background_reach_mm, REG_DILATION * factor * float(settings.spacing))


def unlabelled_to_nearest(regions: np.ndarray, spacing: tuple[float, ...], reach_mm: float) -> np.ndarray:
    """Background voxels within ``reach_mm`` of a labelled voxel take the region of the nearest labelled voxel.

    The background of a brain label map also holds unlabelled tissue (sulcal CSF, the medial
    surface at the midline); one smooth background field cannot follow it between the gyri.
    """
    background = regions == 0
    if reach_mm <= 0 or background.all() or not background.any():
        return regions
    foreground = np.nonzero(~background)
    pad = int(math.ceil(reach_mm / min(spacing))) + 1
    box = tuple(slice(max(int(w.min()) - pad, 0), int(w.max()) + 1 + pad) for w in foreground)
    distance, index = ndimage.distance_transform_edt(background[box], sampling=spacing, return_indices=True)
    near = background[box] & (distance <= reach_mm)
    out = regions.copy()
    inner = out[box]
    inner[near] = regions[box][tuple(i[near] for i in index)]
    return out


def field_on_fixed_grid(
    inputs: Inputs,
    prepared: Prepared,
    fields: dict[int, tuple[Box, torch.Tensor, int]],
    sigma: float,
    reach_mm: float = 0.0,
    extend: bool = False,
) -> Volume:
    """The whole mapping (affine stage, then the composed region fields) as a physical field on the fixed grid.

    With hard masks (``sigma`` 0) each fixed voxel takes the field of its own region (`fixed_grid_regions`),
    interpolated from that region's field alone, so where the fine grid's voxels do not coincide with
    the fixed image's (other spacing, odd padding), a voxel beside a region border never mixes two
    regions' displacements (two sliding regions would send it between their targets, into a third
    structure); background voxels within ``reach_mm`` of a labelled voxel take the field of the nearest
    labelled voxel's region (`unlabelled_to_nearest`). Regions without a field, and the blurred
    composition of ``sigma`` > 0, sample the composed field on the fine grid (`compose_regions`, with
    ``extend``; made only where needed). Then ``c(x) = t(x) + a(x + t(x))``, the affine stage ``a`` as `spatial.compose`
    reads it, computed from its matrix (`affine_displacement_at`).
    """
    grid, geometry = prepared.pair.grid, inputs.fixed.geometry
    device = prepared.affine_disp.device
    points = grid_indices_of(geometry, grid).to(device)
    as_batch = points.view(1, -1, 1, 1, 3)
    if sigma > 0:
        total = compose_regions(prepared, fields, sigma, extend)
        whole = sample_at_indices(total, as_batch, padding_mode="border").view(3, -1).T
    else:
        regions = unlabelled_to_nearest(fixed_grid_regions(inputs, prepared, points), geometry.spacing, reach_mm).reshape(-1)
        # the voxels of each region, in order: one stable (radix) sort instead of one comparison of all voxels per region
        by_region = torch.from_numpy(np.argsort(regions.astype(np.int16), kind="stable")).to(device)
        counts = np.bincount(regions, minlength=prepared.plan.count)
        ends = np.cumsum(counts)
        whole = torch.empty((len(regions), 3), dtype=prepared.affine_disp.dtype, device=device)
        for region, (box, disp, factor) in fields.items():
            where = by_region[ends[region] - counts[region] : ends[region]]
            if len(where) == 0:
                continue
            start = torch.tensor(box.start, dtype=points.dtype, device=device)
            local = (as_batch[0, :, 0, 0][where] - start).view(1, -1, 1, 1, 3)
            whole[where] = field_at(disp, factor, local).view(3, -1).T
        rest = [by_region[ends[r] - counts[r] : ends[r]] for r in range(prepared.plan.count) if r not in fields and counts[r]]
        if rest:  # regions without a field of their own: the composed field
            where, total = torch.cat(rest), compose_regions(prepared, fields, sigma, extend)
            whole[where] = sample_at_indices(total, as_batch[:, where], padding_mode="border").view(3, -1).T
    whole += affine_displacement_at(prepared.affine_index, as_batch[0, :, 0, 0] + whole, prepared.affine_disp.shape[2:])
    return grid_steps_to_physical(whole.view(tuple(geometry.shape) + (3,)), grid, geometry)


def _finish(inputs: Inputs, prepared: Prepared, mapping: Volume, settings: Settings, details: dict[str, Any]) -> Result:
    result = result_from_physical_field(
        inputs, mapping, prepared.pair.grid, prepared.affine_index, prepared.watch, prepared.moving.device
    )
    result.details.update(
        {
            "variant": settings.variant,
            "mask_loss": settings.mask_loss,
            "regions": prepared.plan.summary(),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()},
            "timings": prepared.watch.seconds,
            "cpu_timings": prepared.watch.cpu_seconds,
            **details,
        }
    )
    return result


# ----------------------------------------------------------------------------- iterative variant


@dataclass
class _RegionProblem:
    """One region's fine crops: fixed channels on ``box``, moving channels on ``moving_box``."""

    region: int
    box: Box
    moving_box: Box
    fixed_fine: torch.Tensor  # (1, C, ...) masked image, mask[, EDT] on box
    moving_fine: torch.Tensor  # (1, C, ...) the same on moving_box
    translation: torch.Tensor  # (3,) moving centroid minus fixed centroid, fine voxels (0 for the background)


def _region_problems(prepared: Prepared, settings: Settings, multiple: int, margin: int, need_edt: bool) -> list[_RegionProblem]:
    pair = prepared.pair
    fixed_regions, moving_regions = prepared.fixed_regions, prepared.moving_regions
    fixed_np = fixed_regions[0, 0].cpu().numpy()
    moving_np = moving_regions[0, 0].cpu().numpy()
    problems = []
    fixed_bounds = region_bounds(fixed_np, prepared.plan.count)
    moving_bounds = region_bounds(moving_np, prepared.plan.count)
    for region in range(prepared.plan.count):
        if fixed_bounds[region] is None or moving_bounds[region] is None:
            continue
        if region == 0:  # the background's box is that of the foreground it surrounds
            fixed_mask, moving_mask = fixed_np == 0, moving_np == 0
            box = region_box(_box_mask(fixed_mask, 0), margin, multiple)
            moving_box = region_box(_box_mask(moving_mask, 0), margin, multiple)
        else:
            box = box_around(fixed_bounds[region], fixed_np.shape, margin, multiple)
            moving_box = box_around(moving_bounds[region], moving_np.shape, margin, multiple)
        fixed_fine = _stack(pair.fixed, _one_hot_float(fixed_regions, region, box), box, need_edt)
        moving_fine = _stack(prepared.moving, _one_hot_float(moving_regions, region, moving_box), moving_box, need_edt)
        translation = np.zeros(3) if region == 0 else _centroid(moving_np, region, moving_bounds[region]) - _centroid(
            fixed_np, region, fixed_bounds[region]
        )
        problems.append(
            _RegionProblem(
                region, box, moving_box, fixed_fine, moving_fine,
                torch.tensor(translation, dtype=torch.float32, device=fixed_fine.device),
            )
        )
    return problems


def _box_mask(mask: np.ndarray, region: int) -> np.ndarray:
    """What a region's box must hold: the region, or for the background the foreground it surrounds."""
    return mask if region or mask.all() else ~mask


def _centroid(region_map: np.ndarray, region: int, bounds: tuple[slice, slice, slice]) -> np.ndarray:
    """Centroid (voxel indices) of ``region`` inside its bounding box ``bounds``."""
    inside = ndimage.center_of_mass(region_map[bounds] == region)
    return np.array(inside, dtype=np.float64) + np.array([b.start for b in bounds], dtype=np.float64)


def _stack(image: torch.Tensor, mask: torch.Tensor, box: Box, need_edt: bool) -> torch.Tensor:
    """Channels (masked image, mask[, EDT of the mask]) of one region on its box."""
    crop = image[(slice(None), slice(None)) + box.slices()]
    channels = [crop * mask, mask] + ([edt_mask(mask)] if need_edt else [])
    return torch.cat(channels, dim=1)


def region_loss(
    settings: Settings,
    points: torch.Tensor,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    reg_field: torch.Tensor,
    reg_weight: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 5, ``g0 L_v + g1 L_m + g2 R``, summed over a batch of regions (one per item).

    ``points (B, 3, ...)``: where each fixed sample lands, in voxel indices of the ``moving``
    channels (masked image, mask[, EDT]); ``fixed``: the fixed channels at the samples;
    ``reg_field``: the field R acts on, weighted by ``reg_weight``; ``valid (B, 1, ...)``: 1 on
    each item's own crop, 0 on the padding that makes crops of different sizes one batch.
    Returns the total and each term summed over the items.
    """
    warped = sample_at_indices(moving, points.permute(0, 2, 3, 4, 1), padding_mode="border")
    if valid is not None:
        warped = warped * valid
    items = fixed.shape[0]
    dims = (1, 2, 3, 4)
    region_voxels = fixed[:, 1:2].sum(dim=dims).clamp_min(1e-6)
    g0, g1, g2 = settings.weights
    if settings.similarity == "ncc":
        similarity = items * ncc_loss(fixed[:, 0:1], warped[:, 0:1], mask=valid)
    elif settings.similarity == "mse":
        similarity = ((fixed[:, 0:1] - warped[:, 0:1]).pow(2).sum(dim=dims) / region_voxels).sum()
    else:
        similarity = fixed.new_zeros(())
    if settings.mask_loss != "edt":
        dice = items * soft_dice_loss(warped[:, 1:2], fixed[:, 1:2], include_background=True)
    if settings.mask_loss != "dice":
        # the MSE of losses.edt_loss, as a mean over each fixed region's voxels (not its crop's)
        edt = ((fixed[:, 2:3] - warped[:, 2:3]).pow(2).sum(dim=dims) / region_voxels).sum()
    mask = {"dice": lambda: dice, "edt": lambda: edt, "edt-dice": lambda: 0.5 * (dice + EDT_MIX_WEIGHT * edt)}[settings.mask_loss]()
    smoothness = items * masked_gradient_l2(reg_field, reg_weight)
    total = g0 * similarity + g1 * mask + g2 * smoothness
    return total, {"similarity": similarity.detach(), "mask": mask.detach(), "smoothness": smoothness.detach()}


@dataclass
class _Stage:
    """One stage of the schedule: the field lives at ``factor``; the loss is evaluated on pooled crops
    (``sampled`` False) or at fine voxels on a stride-``factor`` lattice whose offset cycles (True)."""

    factor: int
    iterations: int
    sampled: bool


def _schedule(settings: Settings) -> list[_Stage]:
    stages = [_Stage(f, n, False) for f, n in zip(settings.levels, settings.level_iterations)]
    last = settings.levels[-1]
    if last > 1 and settings.fine_iterations > 0:
        stages.append(_Stage(last, settings.fine_iterations, True))
    return stages


def _lattice_offsets(factor: int, count: int, seed: int) -> list[tuple[int, int, int]]:
    """``count`` lattice offsets cycling through all ``factor**3``, each cycle in a seeded random order."""
    every = [(a, b, c) for a in range(factor) for b in range(factor) for c in range(factor)]
    generator = np.random.default_rng(seed)
    offsets: list[tuple[int, int, int]] = []
    while len(offsets) < count:
        offsets.extend(every[i] for i in generator.permutation(len(every)))
    return offsets[:count]


def _sampled_field(disp: torch.Tensor, factor: int, offset: tuple[int, int, int], grid: torch.Tensor) -> torch.Tensor:
    """Fine-voxel displacement at fine indices ``factor * q + offset`` of a field ``disp`` on the grid pooled by ``factor``.

    Cell-centred: fine index x sits at pooled coordinate ``(x - (factor - 1) / 2) / factor``, the same
    mapping as `upsample_field`, so the stage optimises exactly the field that is composed.
    ``grid`` is `identity_grid` of ``disp``'s spatial shape.
    """
    shift = torch.tensor([(o - (factor - 1) / 2.0) / factor for o in offset], device=disp.device)
    where = (grid + shift.view(1, 3, 1, 1, 1)).expand(disp.shape[0], -1, -1, -1, -1)
    return factor * sample_at_indices(disp, where.permute(0, 2, 3, 4, 1), padding_mode="border")


MAX_BATCH = 16
MAX_PADDING = 1.5  # a batch of crops may hold at most this many times the voxels of its crops


def _buckets(problems: list[_RegionProblem], factor: int) -> list[list[_RegionProblem]]:
    """Regions grouped into batches of similar crop sizes (sorted by size, greedy, padding bounded)."""
    def volume(shape: tuple[int, ...]) -> int:
        return int(np.prod(shape))

    order = sorted(problems, key=lambda p: (p.box.size(factor) + p.moving_box.size(factor), p.region))
    buckets: list[list[_RegionProblem]] = []
    current: list[_RegionProblem] = []
    for problem in order:
        trial = current + [problem]
        fixed_max = np.max([q.box.shape(factor) for q in trial], axis=0)
        moving_max = np.max([q.moving_box.shape(factor) for q in trial], axis=0)
        padded = len(trial) * (volume(fixed_max) + volume(moving_max))
        actual = sum(q.box.size(factor) + q.moving_box.size(factor) for q in trial)
        if current and (padded > MAX_PADDING * actual or len(trial) > MAX_BATCH):
            buckets.append(current)
            current = [problem]
        else:
            current = trial
    if current:
        buckets.append(current)
    return buckets


def _pad_to(x: torch.Tensor, shape: tuple[int, ...], mode: str) -> torch.Tensor:
    """``x (1, C, ...)`` padded at the end of each spatial axis to ``shape`` (``constant`` 0 or ``replicate``)."""
    pads: list[int] = []
    for axis in (2, 1, 0):
        pads += [0, int(shape[axis]) - x.shape[2 + axis]]
    if not any(pads):
        return x
    return F.pad(x, pads, mode=mode) if mode == "replicate" else F.pad(x, pads)


class _Batch:
    """Regions of similar crop size stacked for one stage: padded fixed/moving channels, masks, offsets.

    Fixed channels and the field are padded to the largest fixed crop (zeros; ``valid`` marks each
    item's own crop), moving channels to the largest moving crop by repeating their edge values
    (what border padding of the crop alone would sample), so each item's loss is that of its
    region alone.
    """

    def __init__(self, problems: list[_RegionProblem], factor: int, sampled: bool, device: torch.device) -> None:
        self.problems, self.factor, self.sampled = problems, factor, sampled
        self.shape = tuple(int(n) for n in np.max([p.box.shape(factor) for p in problems], axis=0))
        moving = [p.moving_fine if sampled else _pool(p.moving_fine, factor) for p in problems]
        moving_shape = tuple(int(n) for n in np.max([m.shape[2:] for m in moving], axis=0))
        self.moving = torch.cat([_pad_to(m, moving_shape, "replicate") for m in moving])
        ones = [torch.ones((1, 1) + p.box.shape(factor), device=device) for p in problems]
        self.valid = torch.cat([_pad_to(o, self.shape, "constant") for o in ones])
        masks = [_pool(p.fixed_fine[:, 1:2], factor) for p in problems]
        weights = [F.max_pool3d(m, 2 * REG_DILATION + 1, stride=1, padding=REG_DILATION) for m in masks]
        self.reg_weight = torch.cat([_pad_to(w, self.shape, "constant") for w in weights])
        unit = 1 if sampled else factor  # fixed box start minus moving box start, in voxels of the sampled grid
        self.offsets = torch.tensor(
            [[(a - b) / unit for a, b in zip(p.box.start, p.moving_box.start)] for p in problems], device=device
        ).view(-1, 3, 1, 1, 1)
        self.grid = identity_grid(self.shape, device=device)
        self._fixed: dict[tuple[int, int, int] | None, torch.Tensor] = {}

    def pack(self, params: dict[int, torch.Tensor]) -> torch.Tensor:
        """The items' fields as one batch (edge values repeated into the padding)."""
        return torch.cat([_pad_to(params[p.region], self.shape, "replicate") for p in self.problems])

    def fixed(self, offset: tuple[int, int, int] | None) -> torch.Tensor:
        """Fixed channels: pooled crops, or the fine voxels of the lattice at ``offset`` (cached)."""
        if offset not in self._fixed:
            f = self.factor
            if offset is None:
                crops = [_pool(p.fixed_fine, f) for p in self.problems]
            else:
                lattice = (slice(None), slice(None)) + tuple(slice(o, None, f) for o in offset)
                crops = [p.fixed_fine[lattice] for p in self.problems]
            self._fixed[offset] = torch.cat([_pad_to(c, self.shape, "constant") for c in crops])
        return self._fixed[offset]

    def fixed_and_points(self, disp: torch.Tensor, offset: tuple[int, int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed channels and where their samples land in the moving crops, for the field ``disp``."""
        if offset is None:
            return self.fixed(None), self.grid + self.offsets + disp
        fine = _sampled_field(disp, self.factor, offset, self.grid)
        base = self.grid * self.factor + torch.tensor(offset, device=disp.device, dtype=disp.dtype).view(1, 3, 1, 1, 1)
        return self.fixed(offset), base + self.offsets + fine


def register_iterative(
    inputs: Inputs, settings: Settings, options: Options, progress: ProgressCallback
) -> Result:
    """Optimise one field per region (Adam, eq. 5) on a pyramid of crops and a sampled fine stage, then compose."""
    started = time.monotonic()
    coarsest = max(settings.levels)
    multiple = 16 * coarsest // math.gcd(16, coarsest)
    prepared = prepare(inputs, settings, options, multiple, lambda f, s: progress(0.1 * f, "affine"))
    margin = int(math.ceil(settings.margin_mm / settings.spacing))
    if settings.mask_smoothing > 0:
        margin = max(margin, int(math.ceil(3 * settings.mask_smoothing)))
    with prepared.watch.step("regions"):
        problems = _region_problems(prepared, settings, coarsest, margin, settings.mask_loss != "dice")
    device = prepared.moving.device
    stages = _schedule(settings)
    total_iterations = max(sum(stage.iterations for stage in stages), 1)
    params: dict[int, torch.Tensor] = {}
    done, stopped_early, history, previous = 0, False, [], None
    optimisation = time.monotonic()
    for stage in stages:
        f = stage.factor
        for p in problems:
            if previous is None:
                start = (p.translation / f).view(1, 3, 1, 1, 1)
                params[p.region] = start.expand((1, 3) + p.box.shape(f)).clone()
            elif previous != f:
                carried = smooth_field(params[p.region].detach(), settings.field_smoothing)
                params[p.region] = upsample_field(carried, previous // f)
            params[p.region].requires_grad_(True)
        previous = f
        batches = [_Batch(chunk, f, stage.sampled, device) for chunk in _buckets(problems, f)]
        lattice = _lattice_offsets(f, stage.iterations, options.seed) if stage.sampled else [None] * stage.iterations
        optimiser = torch.optim.Adam(list(params.values()), lr=settings.lr)
        for step in range(stage.iterations):
            for group in optimiser.param_groups:
                group["lr"] = settings.lr * (1.0 - step / stage.iterations) ** 0.9  # the paper's polynomial decay
            optimiser.zero_grad()
            loss = torch.zeros((), device=device)
            parts = {"similarity": 0.0, "mask": 0.0, "smoothness": 0.0}
            for batch in batches:
                v = smooth_field(batch.pack(params), settings.field_smoothing)
                disp = integrate_velocity(v, settings.integration_steps) if settings.integration_steps else v
                fixed, points = batch.fixed_and_points(disp, lattice[step])
                value, terms = region_loss(settings, points, fixed, batch.moving, v, batch.reg_weight, batch.valid)
                loss = loss + value
                for k in parts:
                    parts[k] += float(terms[k]) / len(problems)
            loss.backward()
            optimiser.step()
            done += 1
            if step % 10 == 0 or step == stage.iterations - 1:
                history.append({"factor": f, "sampled": stage.sampled, "iteration": step, "loss": float(loss.detach()), **parts})
            where = "fine samples" if stage.sampled else f"1/{f} resolution"
            progress(0.1 + 0.85 * done / total_iterations, f"regions at {where} ({step + 1}/{stage.iterations})")
            if options.time_budget is not None and time.monotonic() - started > options.time_budget:
                stopped_early = True
                break
        if stopped_early:
            break
    prepared.watch.add("optimisation", time.monotonic() - optimisation)
    with prepared.watch.step("field to fixed grid"):
        fields = {}
        with torch.no_grad():
            for p in problems:
                v = smooth_field(params[p.region].detach(), settings.field_smoothing)
                disp = integrate_velocity(v, settings.integration_steps) if settings.integration_steps else v
                fields[p.region] = (p.box, disp, previous)
        mapping = field_on_fixed_grid(inputs, prepared, fields, settings.mask_smoothing, background_reach(settings, previous or 1))
    progress(0.97, "writing the field")
    details = {"iterations": done, "stopped_by_time_budget": stopped_early, "loss_history": history}
    return _finish(inputs, prepared, mapping, settings, details)


# ----------------------------------------------------------------------------- learned variant

# The region network (VoxelMorph-like, 4 down / 4 up with skips, kept slim for CPU inference); its
# architecture, pooling factor and integration steps are stored in the weights' manifest entry.
ARCHITECTURE = {"encoder": [8, 16, 16, 16], "decoder": [16, 16, 16, 8], "final": []}
FACTOR = 2
INTEGRATION_STEPS = 7
MARGIN = 3  # network voxels around both region masks: the crop rule of training and inference


def build_network(architecture: dict[str, Any]) -> RegistrationUNet:
    """The region network of the given architecture (encoder, decoder, final channel lists)."""
    return RegistrationUNet(
        in_channels=2,
        encoder=architecture["encoder"],
        decoder=architecture["decoder"],
        final=architecture["final"],
    )


def load_network(name: str, device: torch.device) -> tuple[RegistrationUNet, dict[str, Any], str]:
    """The shipped network called ``name``, its provenance (architecture, factor, ...) and checksum."""
    state, checksum = load_weights(name)
    provenance = read_manifest().get(name, {}).get("provenance", {})
    missing = [k for k in ("architecture", "factor", "integration_steps") if k not in provenance]
    if missing:
        raise WeightsError(
            f"the manifest entry of weights '{name}' lacks {', '.join(missing)}: retrain them with "
            "`jointregseg train segreg` (see README.md)."
        )
    net = build_network(provenance["architecture"])
    fit_state(net, state, name)
    return fast_layout(net, device).eval(), provenance, checksum


def default_spacing(inputs: Inputs) -> float:
    """The fine grid's default spacing: the fixed image's smallest voxel size, but not below 1 mm."""
    return max(1.0, min(inputs.fixed.geometry.spacing))


def learned_factor(network_spacing: float, spacing: float) -> int:
    """Pooling factor from the fine grid (``spacing`` mm) to the network's grid (``network_spacing`` mm)."""
    factor = network_spacing / spacing
    if round(factor) not in (1, 2, 4) or abs(factor - round(factor)) > 0.05:
        raise InputError(
            f"the learned segreg network runs at {network_spacing:g} mm; option spacing must be that divided by "
            f"1, 2 or 4 (e.g. {network_spacing:g} or {network_spacing / 2:g}); got {spacing:g}."
        )
    return int(round(factor))


def register_learned(inputs: Inputs, settings: Settings, options: Options, progress: ProgressCallback) -> Result:
    """One shared U-Net predicts every region's velocity (batched by crop size), then compose."""
    device = torch.device(options.device)
    loading = time.perf_counter(), time.process_time()
    net, config, checksum = load_network(settings.weights_name, device)
    loading = time.perf_counter() - loading[0], time.process_time() - loading[1]
    if settings.spacing is None:  # the fine grid the weights were trained for, at the factor they record
        settings = replace(settings, spacing=default_spacing(inputs))
        factor = int(config["factor"])
    else:
        factor = learned_factor(float(config["network_spacing_mm"]), settings.spacing)
    steps = int(config["integration_steps"])
    prepared = prepare(inputs, settings, options, 16 * factor, lambda f, s: progress(0.4 * f, "affine"), QUICK_AFFINE)
    watch = prepared.watch
    watch.add("weights", *loading)
    with watch.step("regions"):
        crops, skipped = _region_crops(prepared, factor)
    fields: dict[int, tuple[Box, torch.Tensor, int]] = {}
    calls = sum(-(-len(items) // settings.batch) for items in crops.values())
    call = 0
    with watch.step("network"), torch.no_grad():
        for items in crops.values():
            for first in range(0, len(items), settings.batch):
                chunk = items[first : first + settings.batch]
                velocity = net(torch.cat([x for _, _, x in chunk], dim=0))
                disp = integrate_velocity(velocity, steps)
                for index, (region, box, _) in enumerate(chunk):
                    fields[region] = (box, disp[index : index + 1], factor)
                call += 1
                progress(0.4 + 0.5 * call / max(calls, 1), f"network on region crops ({call}/{calls})")
    with watch.step("field to fixed grid"):
        mapping = field_on_fixed_grid(
            inputs, prepared, fields, settings.mask_smoothing, background_reach(settings, factor), extend=bool(skipped)
        )
    progress(0.95, "writing the field")
    result = _finish(inputs, prepared, mapping, settings, {"empty_regions_extended": skipped, "network_calls": calls})
    result.weights = {settings.weights_name: checksum}
    return result


def _region_crops(prepared: Prepared, factor: int) -> tuple[dict[tuple[int, int, int], list[tuple[int, Box, torch.Tensor]]], list[str]]:
    """Each region's masked moving and fixed crops, pooled to the network's grid and grouped by crop shape;
    and the names of the regions whose crops are empty (skipped)."""
    margin = MARGIN * factor  # the training crop rule: 3 network voxels around both masks
    fixed_np = prepared.plan.fixed
    crops: dict[tuple[int, int, int], list[tuple[int, Box, torch.Tensor]]] = {}
    skipped = []
    fixed_bounds = region_bounds(fixed_np, prepared.plan.count)
    moving_bounds = region_bounds(prepared.plan.moving, prepared.plan.count)
    for region in range(prepared.plan.count):
        if fixed_bounds[region] is None or moving_bounds[region] is None:
            continue
        bounds = _union(fixed_bounds[region], moving_bounds[region])
        box = box_around(bounds, fixed_np.shape, margin, factor, min_size=16 * factor)
        pair_input = torch.cat(
            [_masked(prepared.moving, prepared.moving_regions, region, box), _masked(prepared.pair.fixed, prepared.fixed_regions, region, box)],
            dim=1,
        )
        if float(pair_input.abs().max()) < 1e-6:
            skipped.append(prepared.plan.names[region])
            continue
        crops.setdefault(box.shape(), []).append((region, box, _pool(pair_input, factor)))
    return crops, skipped


# ----------------------------------------------------------------------------- the method


class SegRegMethod:
    """The `Method` protocol for SegReg."""

    info = method_info("segreg")

    def register(self, inputs: Inputs, options: Options, progress: ProgressCallback) -> Result:
        settings = Settings.from_options(options)
        if settings.spacing is None and settings.variant == "iterative":
            settings = replace(settings, spacing=default_spacing(inputs))
        torch.manual_seed(int(options.seed))
        started = time.monotonic()
        if settings.variant == "learned":
            result = register_learned(inputs, settings, options, progress)
        else:
            result = register_iterative(inputs, settings, options, progress)
        result.details["register_s"] = time.monotonic() - started
        progress(1.0, "done")
        return result


METHOD = SegRegMethod()
