"""Training of SegReg's learned variant (seed 001, "Training and Inference"), in `loop.fit`.

One shared U-Net (`methods.segreg.build_network`, moving and fixed region images concatenated)
predicts a stationary velocity for a region pair ``(I_m * S_m^i, I_f * S_f^i)``; the velocity is
integrated by scaling and squaring and the loss is eq. 5, ``g0 L_v + g1 L_m + g2 R``
(`methods.segreg.region_loss`, R the plain gradient-L2 of the velocity over the crop, VoxelMorph's
convention). The paper feeds one random region pair per step; we feed ``batch_size`` of them.

Choices where the paper is silent (recorded here):

- data: synthetic pairs only, from the bank (`training.bank`: the SynthSeg label maps of
  ../shared/data, extra-cerebral classes dropped, on a ``spacing`` mm grid of ``shape``, default 2 mm
  and 80 x 96 x 112; maps 1-16 train, 17-20 validate): each map deformed twice by random smooth
  diffeomorphisms and each image rendered with its own random contrast, zeroed outside the brain
  labels like the skull-stripped scans segreg registers. A new pair every ``pair_every`` iterations
  (default 4); the real scans with labels (benchmark pair, FreeSurfer subject) would leak the evaluation;
- regions: the ``all`` mode of `methods.regions` (one structure per region); each step draws
  ``batch_size`` regions present in both images (never the background: its masked images are empty);
- crop: the box of both region masks plus `methods.segreg.MARGIN` voxels, its size rounded up to a
  multiple of 16 (the inference rule); the regions of one batch share the largest of their sizes,
  each box grown about its own centre (inside the grid), so they stack without padding;
- network: `methods.segreg.ARCHITECTURE`, 7 integration steps; it runs at ``factor`` (2) times the
  fine grid's spacing at inference, so ``spacing`` should be ``factor`` mm (the fine grid is 1 mm);
- Adam ``lr`` 1e-3 (the paper's 1e-4 with polynomial decay is for days of GPU training; our runs
  are open-ended and resumable, so the rate is constant); weights ``g0, g1`` the method's defaults
  for the mask loss (`methods.segreg.DEFAULT_WEIGHTS`) and ``g2 = smoothness`` (0.1, the paper's
  abdomen value) on the velocity.

Validation: 4 held-apart pairs (maps 17-20, fixed seeds), 8 regions each (the 8 largest present in
both images whose crop fits in 48^3: deep structures, ventricles, cerebellum; one batch per pair): Dice of the warped moving region mask against the fixed one (``score``), before
(``identity_dice``) and after registration. Weights: ``segreg-<mask_loss>.pt`` with the manifest
entry the method reads (``architecture``, ``factor``, ``integration_steps``, ``network_spacing_mm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..methods.regions import plan_regions
from ..methods.segreg import (
    ARCHITECTURE,
    DEFAULT_WEIGHTS,
    FACTOR,
    INTEGRATION_STEPS,
    MARGIN,
    MASK_LOSSES,
    Box,
    Settings,
    build_network,
    region_box,
    region_loss,
)
from ..nets.layout import fast_layout
from ..spatial import identity_grid, integrate_velocity, sample_at_indices
from ..synth import DeformationOptions, render_image
from . import bank
from .augment import deform_labels
from .common import as_shape, config_from_dict, run_device
from .loop import CommonConfig, Trainer, held_apart_generator

TRAIN_MAPS = 16
VALIDATION_REGIONS = 8
VALIDATION_CROP = 48


@dataclass
class TrainConfig(CommonConfig):
    """Settings of one training run (see the module docstring)."""

    mask_loss: str = "dice"
    similarity: str = "ncc"
    smoothness: float = 0.1
    pair_every: int = 4
    architecture: dict[str, Any] | None = None
    shape: tuple[int, int, int] = (80, 96, 112)
    spacing: float = 2.0
    factor: int = FACTOR
    max_std: float = 2.0
    stage: str | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrainConfig:
        c = config_from_dict(cls, config, "segreg training")
        c.check_common("segreg training")
        if c.mask_loss not in MASK_LOSSES:
            raise InputError(f"mask_loss must be one of {', '.join(MASK_LOSSES)}; got {c.mask_loss!r}")
        if int(c.pair_every) < 1:
            raise InputError(f"segreg training setting 'pair_every' must be >= 1; got {c.pair_every!r}")
        c.pair_every = int(c.pair_every)
        if int(c.factor) not in (1, 2, 4):
            raise InputError(f"factor (network spacing / fine grid spacing) must be 1, 2 or 4; got {c.factor}")
        c.architecture = c.architecture or ARCHITECTURE
        c.shape = as_shape(c.shape)
        if any(s % 16 for s in c.shape):
            raise InputError(f"the training grid {c.shape} must be a multiple of 16 on every axis")
        if c.stage is not None:
            raise InputError(f"segreg trains in one stage; omit --stage (got {c.stage!r})")
        return c


def region_crop(fixed_mask: np.ndarray, moving_mask: np.ndarray) -> Box:
    """The crop both training and inference use on the network's grid: masks' box + margin, size a multiple of 16."""
    return region_box(fixed_mask | moving_mask, MARGIN, 1, min_size=16)


def grown(box: Box, size: tuple[int, int, int], grid: tuple[int, ...]) -> Box:
    """``box`` grown to ``size`` about its centre, shifted back inside ``grid``."""
    start = [min(max((a + b - n) // 2, 0), g - n) for a, b, n, g in zip(box.start, box.stop, size, grid)]
    return Box(tuple(start), tuple(a + n for a, n in zip(start, size)))


class SegRegTrainer(Trainer):
    """The region network's data, step and validation (module docstring)."""

    method = "segreg"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.name = f"segreg-{cfg.mask_loss}"
        self.device = run_device(cfg)
        torch.manual_seed(cfg.seed)
        self.settings = Settings(
            mask_loss=cfg.mask_loss, similarity=cfg.similarity,
            weights=(*DEFAULT_WEIGHTS[cfg.mask_loss][:2], float(cfg.smoothness)),
        )
        maps = bank.synthseg_maps("brain", cfg.spacing, cfg.shape)
        self.maps = torch.from_numpy(maps.astype(np.int64)).to(self.device)[:, None]
        self.deformation = DeformationOptions(max_std=cfg.max_std, factor=2)
        self.net = build_network(cfg.architecture).to(self.device)
        self.optimiser = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.current: tuple[int, dict[str, Any]] | None = None
        self.validation = self._validation_set()

    def optimisers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adam": self.optimiser}

    def _pair(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        """Map ``index`` deformed twice, rendered, skull-stripped, with its region plan (on ``generator``'s device)."""
        labels = self.maps[[index, index]].to(generator.device)
        fixed_labels = deform_labels(labels[:1], generator, self.deformation)
        moving_labels = deform_labels(labels[1:], generator, self.deformation)
        fixed = render_image(fixed_labels, generator) * (fixed_labels > 0)
        moving = render_image(moving_labels, generator) * (moving_labels > 0)
        plan = plan_regions(fixed_labels[0, 0].cpu().numpy(), moving_labels[0, 0].cpu().numpy(), "all")
        sizes = np.bincount(plan.fixed.ravel(), minlength=plan.count)
        present = [r for r in range(1, plan.count) if sizes[r] and (plan.moving == r).any()]
        return {
            "fixed": fixed, "moving": moving, "plan": plan, "regions": present, "sizes": sizes,
            "fixed_regions": torch.from_numpy(plan.fixed.astype(np.int64)).to(generator.device),
            "moving_regions": torch.from_numpy(plan.moving.astype(np.int64)).to(generator.device),
        }

    def _crops(self, pair: dict[str, Any], regions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed and moving channels (masked image, mask) of ``regions`` on crops of one shared size."""
        plan = pair["plan"]
        boxes = [region_crop(plan.fixed == r, plan.moving == r) for r in regions]
        size = tuple(max(b.shape()[axis] for b in boxes) for axis in range(3))
        fixed, moving = [], []
        for region, box in zip(regions, boxes):
            window = (slice(None), slice(None), *grown(box, size, plan.fixed.shape).slices())
            for image, region_map, out in ((pair["fixed"], pair["fixed_regions"], fixed), (pair["moving"], pair["moving_regions"], moving)):
                mask = (region_map[window[2:]] == region).to(image.dtype)[None, None]
                out.append(torch.cat([image[window] * mask, mask], dim=1))
        return torch.cat(fixed), torch.cat(moving)

    def _validation_set(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        held = range(TRAIN_MAPS, len(self.maps))
        crops = []
        for k, index in enumerate(held):
            pair = self._pair(index, held_apart_generator(10**6 + k))
            plan = pair["plan"]
            small = [r for r in pair["regions"] if max(region_crop(plan.fixed == r, plan.moving == r).shape()) <= VALIDATION_CROP]
            largest = sorted(small, key=lambda r: -pair["sizes"][r])[:VALIDATION_REGIONS]
            crops.append(fast_layout(self._crops(pair, largest), self.device))
        return crops

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        pair_index = n // cfg.pair_every
        if self.current is None or self.current[0] != pair_index:
            pick = torch.Generator().manual_seed(cfg.seed * 1000003 + pair_index)
            index = int(torch.randint(TRAIN_MAPS, (), generator=pick))
            self.current = (pair_index, self._pair(index, torch.Generator(device=self.device).manual_seed(cfg.seed * 1000003 + pair_index + 500009)))
        pair = self.current[1]
        pick = torch.Generator().manual_seed(cfg.seed * 1000003 + n + 700001)
        regions = [pair["regions"][int(i)] for i in torch.randint(len(pair["regions"]), (cfg.batch_size,), generator=pick)]
        fixed, moving = self._crops(pair, regions)
        return {"fixed": fixed, "moving": moving}

    def _warp(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Velocity, sampling points and the warped moving channels of a batch of region crops."""
        velocity = self.net(torch.cat([moving[:, 0:1], fixed[:, 0:1]], dim=1))
        disp = integrate_velocity(velocity, INTEGRATION_STEPS)
        points = identity_grid(disp.shape[2:], device=disp.device) + disp
        return velocity, points, sample_at_indices(moving, points.permute(0, 2, 3, 4, 1), padding_mode="border")

    def step(self, batch: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        fixed, moving = batch["fixed"], batch["moving"]
        velocity, points, _ = self._warp(fixed, moving)
        loss, terms = region_loss(self.settings, points, fixed, moving, velocity, torch.ones_like(fixed[:, 1:2]))
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        return {"loss": loss.item(), **{k: float(v) for k, v in terms.items()}}

    def validate(self) -> dict[str, float]:
        after, before = [], []
        for fixed, moving in self.validation:
            _, _, warped = self._warp(fixed, moving)
            truth = fixed[:, 1] > 0.5
            for mask, out in ((warped[:, 1] > 0.5, after), (moving[:, 1] > 0.5, before)):
                out.append(float(2.0 * (mask & truth).sum() / (mask.sum() + truth.sum()).clamp_min(1)))
        return {"region_dice": float(np.mean(after)), "identity_dice": float(np.mean(before)), "score": float(np.mean(after))}

    def describe(self) -> dict[str, Any]:
        return {
            "variant": "learned",
            "architecture": self.cfg.architecture,
            "factor": int(self.cfg.factor),
            "integration_steps": INTEGRATION_STEPS,
            "network_spacing_mm": float(self.cfg.spacing),
            "loss": {"mask_loss": self.cfg.mask_loss, "similarity": self.cfg.similarity, "weights": list(self.settings.weights)},
            "data": f"synthetic pairs from SynthSeg label maps 1-{TRAIN_MAPS} of ../shared/data/synthseg_labelmaps (brain only, "
            f"{self.cfg.spacing:g} mm grid {list(self.cfg.shape)}, random deformations and contrasts, background zeroed)",
            "validation_set": f"4 pairs of held-apart SynthSeg maps 17-20, the {VALIDATION_REGIONS} largest regions of each "
            f"whose crop fits in {VALIDATION_CROP}^3",
        }


def make_trainer(config: dict[str, Any]) -> SegRegTrainer:
    """The segreg trainer for ``config`` (`TrainConfig` keys)."""
    return SegRegTrainer(TrainConfig.from_dict(dict(config)))
