"""Training of U-ReSNet (seed 002), end to end with eq. 7 (`methods.uresnet.uresnet_loss`), in `loop.fit`.

Data (each iteration a batch of ``batch_size`` pairs, paper: 4), on the method's network grid
(``spacing`` mm, default 4, ``shape`` default 44 x 52 x 60, the grid of a 160 x 192 x 224 mm brain),
from the bank (`training.bank`: the 20 SynthSeg label maps resampled once, extra-cerebral classes
dropped like skull-stripped scans, RAS+ like the network grid, each centred on its labelled box as the
paper centres its volumes by centre of mass):

- maps 1-16 train, maps 17-20 are held apart for validation;
- a pair: the fixed image is map ``b`` deformed by a random smooth diffeomorphism (velocity RMS up to
  ``max_std`` voxels); the moving image is map ``a`` (``a != b`` with probability ``other_subject``,
  the paper registers pairs of subjects) deformed by its own diffeomorphism and one small random
  affine (``affine_ranges``: the residual misalignment of two centre-of-mass aligned brains, which
  the affine head learns to remove);
- one contrast per pair: T1-like (probability ``t1_like``, `augment.render_t1`) or SynthMorph's random
  mixture with the background kept at 0 (`augment.render_random`); both images of a pair share it,
  so the MSE term of eq. 4 is minimal at the right alignment. Percentile-normalised to [0, 1] like
  the images the method sees.

Validation (`UReSNetTrainer.validate`, the same every time): 4 held-apart pairs (maps 17 -> 18,
18 -> 19, 19 -> 20, 20 -> 17, generated like the training pairs with fixed seeds, T1-like, and the deformations of
the runs behind the shipped weights whatever the run's own settings, `VALIDATION_DEFORMATIONS`): the
registration Dice of the moving labels warped by the predicted mapping against the fixed labels
(15 classes; ``identity_dice`` before registration), the segmentation Dice of the moving image
(``seg_dice``); and the two real OASIS scans (``oasis_ncc`` after, ``identity_oasis_ncc`` before).
``score = (reg_dice + seg_dice) / 2 + oasis_ncc - identity_oasis_ncc`` (`common.with_real_pair`; the scores recorded
with the weights shipped so far, up to iteration 5723, are the synthetic part alone).

Settings (``--option KEY=JSON``; those of `loop.CommonConfig` too): ``spacing``, ``shape``,
``max_std``, ``sim_blur`` (the Gaussian, in voxels, both images are smoothed by before the similarity terms:
`methods.uresnet`), ``affine_ranges`` ([rotation degrees, scale, shear, translation voxels]), ``t1_like``,
``other_subject``, ``halve_every`` (Adam's ``lr``, paper 1e-3, halves every ``halve_every``
iterations; the paper halves every 15 epochs) and the loss weights ``alpha``, ``beta``, ``gamma``,
``delta`` (paper 0.1, 1e-11, 1, 1) and ``epsilon`` (the cross-entropy we add to eq. 6, 1).

The real scans with labels in ../shared/data (the benchmark pair and the FreeSurfer subject its
moving image was made from) are never used: they would leak the evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..methods.uresnet import LOSS_WEIGHTS, N_CLASSES, WEIGHT_NAME, build_network, class_lookup, forward, uresnet_loss
from ..metrics.similarity import ncc
from ..nets.blocks import count_parameters
from ..nets.layout import fast_layout
from ..spatial import warp
from ..synth import AffineRanges, DeformationOptions
from . import bank
from .augment import deform_labels, render_random, render_t1
from .common import as_shape, config_from_dict, dice_present, image_array, run_device, set_floats, set_probabilities, with_real_pair
from .loop import CommonConfig, Trainer, held_apart_generator

TRAIN_MAPS = 16
OASIS = ("oasis_unlabelled/OASIS_0001_0000.nii.gz", "oasis_unlabelled/OASIS_0075_0000.nii.gz")
SHIPPED_MAX_STD = 1.5
SHIPPED_AFFINE_RANGES = (15.0, 0.15, 0.02, 4.0)
"""The deformation settings of the runs behind the shipped weights (since iteration 608): the defaults of a run."""
VALIDATION_DEFORMATIONS = (
    DeformationOptions(max_std=SHIPPED_MAX_STD, factor=2),
    DeformationOptions(max_std=SHIPPED_MAX_STD, factor=2, affine=AffineRanges(*SHIPPED_AFFINE_RANGES)),
)
"""The validation pairs' deformations (fixed, moving), whatever a run's own settings: those of the runs behind the
shipped weights, so scores of any two runs compare."""


@dataclass
class TrainConfig(CommonConfig):
    """Settings of one training run (see the module docstring)."""

    spacing: float = 4.0
    shape: tuple[int, int, int] = (44, 52, 60)
    max_std: float = SHIPPED_MAX_STD
    sim_blur: float = 1.0
    affine_ranges: tuple[float, float, float, float] = SHIPPED_AFFINE_RANGES
    t1_like: float = 0.8
    other_subject: float = 0.7
    halve_every: int = 6000
    alpha: float = LOSS_WEIGHTS["alpha"]
    beta: float = LOSS_WEIGHTS["beta"]
    gamma: float = LOSS_WEIGHTS["gamma"]
    delta: float = LOSS_WEIGHTS["delta"]
    epsilon: float = LOSS_WEIGHTS["epsilon"]
    stage: str | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrainConfig:
        """Checked settings from a plain dictionary (unknown keys and bad values raise InputError)."""
        c = config_from_dict(cls, config, "uresnet training")
        c.check_common("uresnet training")
        shape = as_shape(c.shape)
        if len(shape) != 3 or any(s < 8 or s % 4 for s in shape):
            raise InputError(f"training shape must be three multiples of 4 (>= 8); got {c.shape}")
        c.shape = shape
        set_floats(c, ("spacing", "max_std"), "uresnet training setting")
        set_floats(c, ("sim_blur",), "uresnet training setting", positive=False)
        set_probabilities(c, ("t1_like", "other_subject"), "uresnet training setting")
        if len(c.affine_ranges) != 4 or min(float(v) for v in c.affine_ranges) < 0:
            raise InputError(f"'affine_ranges' must be four numbers >= 0 (degrees, scale, shear, voxels); got {c.affine_ranges}")
        c.affine_ranges = tuple(float(v) for v in c.affine_ranges)
        set_floats(c, ("alpha", "beta", "gamma", "delta", "epsilon"), "loss weight", positive=False)
        if int(c.halve_every) < 1:
            raise InputError(f"uresnet training setting 'halve_every' must be >= 1; got {c.halve_every!r}")
        c.halve_every = int(c.halve_every)
        if c.stage not in (None, "joint"):
            raise InputError(f"uresnet trains in one stage ('joint'); got stage {c.stage!r}")
        return c


class UReSNetTrainer(Trainer):
    """U-ReSNet's data, step and validation (module docstring)."""

    name = WEIGHT_NAME
    method = "uresnet"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = run_device(cfg)
        torch.manual_seed(cfg.seed)
        maps = bank.synthseg_maps("brain", cfg.spacing, cfg.shape)
        self.maps = torch.from_numpy(maps.astype(np.int64)).to(self.device)[:, None]
        self.lookup = class_lookup().to(self.device)
        self.net = build_network().to(self.device)
        self.optimiser = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.weights = {**LOSS_WEIGHTS, **{k: getattr(cfg, k) for k in ("alpha", "beta", "gamma", "delta", "epsilon")}}
        rotation, scale, shear, translation = cfg.affine_ranges
        self.fixed_deformation = DeformationOptions(max_std=cfg.max_std, factor=2)
        self.moving_deformation = DeformationOptions(
            max_std=cfg.max_std, factor=2, affine=AffineRanges(rotation, scale, shear, translation)
        )
        held = list(range(TRAIN_MAPS, len(self.maps)))
        validation = self.pair(held, held[1:] + held[:1], held_apart_generator(), t1_like=True, deformations=VALIDATION_DEFORMATIONS)
        self.validation = fast_layout(validation, self.device)
        oasis = torch.stack([torch.from_numpy(bank.real_scan(p, cfg.spacing, cfg.shape)) for p in OASIS])[:, None]
        self.oasis = fast_layout(oasis.to(self.device), self.device)

    def optimisers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adam": self.optimiser}

    def classes(self, labels: torch.Tensor) -> torch.Tensor:
        """FreeSurfer codes -> U-ReSNet class indices (`methods.uresnet.CLASSES`)."""
        return self.lookup.to(labels.device)[labels.clamp(0, len(self.lookup) - 1)]

    def pair(
        self, moving_maps: list[int], fixed_maps: list[int], generator: torch.Generator, t1_like: bool | None = None,
        deformations: tuple[DeformationOptions, DeformationOptions] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Pairs of maps ``moving_maps[k] -> fixed_maps[k]``, deformed and rendered (module docstring); ``deformations``:
        the fixed and the moving maps' (default the run's); on ``generator``'s device."""
        fixed, moving = deformations or (self.fixed_deformation, self.moving_deformation)
        fixed_labels = deform_labels(self.maps[fixed_maps].to(generator.device), generator, fixed)
        moving_labels = deform_labels(self.maps[moving_maps].to(generator.device), generator, moving)
        both = torch.stack([moving_labels, fixed_labels], dim=1).flatten(0, 1)  # moving_k, fixed_k interleaved
        if t1_like is None:
            t1_like = float(torch.rand((), generator=generator, device=generator.device)) < self.cfg.t1_like
        images = render_t1(both, generator, pairs=True) if t1_like else render_random(both, generator, pairs=True, background_zero=True)
        return {
            "moving": images[0::2], "fixed": images[1::2],
            "moving_classes": self.classes(moving_labels), "fixed_classes": self.classes(fixed_labels),
        }

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000003 + n)
        moving = torch.randint(TRAIN_MAPS, (self.cfg.batch_size,), generator=generator).tolist()
        fixed = [
            (a + 1 + int(torch.randint(TRAIN_MAPS - 1, (), generator=generator))) % TRAIN_MAPS
            if float(torch.rand((), generator=generator)) < self.cfg.other_subject else a
            for a in moving
        ]
        return self.pair(moving, fixed, torch.Generator(device=self.device).manual_seed(self.cfg.seed * 1000003 + n + 500009))

    def step(self, batch: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        for group in self.optimiser.param_groups:
            group["lr"] = self.cfg.lr * 0.5 ** (n // self.cfg.halve_every)
        out = forward(self.net, batch["moving"], batch["fixed"])
        loss, terms = uresnet_loss(
            out, batch["fixed"], batch["moving"], batch["fixed_classes"], batch["moving_classes"], self.weights,
            sim_blur=self.cfg.sim_blur,
        )
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        return {"loss": loss.item(), **terms}

    def validate(self) -> dict[str, float]:
        labels = list(range(1, N_CLASSES))
        v = self.validation
        out = forward(self.net, v["moving"], v["fixed"])
        warped = warp(v["moving_classes"].float(), out["disp"], mode="nearest").long()
        predicted = out["seg"].argmax(dim=1, keepdim=True)
        reg = [dice_present(v["fixed_classes"][k], warped[k], labels) for k in range(len(warped))]
        identity = [dice_present(v["fixed_classes"][k], v["moving_classes"][k], labels) for k in range(len(warped))]
        seg = [dice_present(v["moving_classes"][k], predicted[k], labels) for k in range(len(warped))]
        fixed, moving = self.oasis[0:1], self.oasis[1:2]
        warped_oasis = warp(self.oasis.flip(0), forward(self.net, self.oasis.flip(0), self.oasis)["disp"])
        scores = {
            "reg_dice": float(np.mean(reg)), "seg_dice": float(np.mean(seg)), "identity_dice": float(np.mean(identity)),
            "oasis_ncc": float(np.mean([ncc(image_array(self.oasis[k]), image_array(warped_oasis[k])) for k in range(2)])),
            "identity_oasis_ncc": ncc(image_array(fixed), image_array(moving)),
        }
        scores["score"] = with_real_pair(0.5 * (scores["reg_dice"] + scores["seg_dice"]), scores["oasis_ncc"], scores["identity_oasis_ncc"])
        return scores

    def describe(self) -> dict[str, Any]:
        return {
            "architecture": {"network": "UReSNet", "channels": list(self.net.channels), "classes": self.net.n_classes,
                             "parameters": count_parameters(self.net)},
            "data": f"synthetic pairs from SynthSeg label maps 1-{TRAIN_MAPS} of ../shared/data/synthseg_labelmaps (brain "
            f"only, {self.cfg.spacing:g} mm grid {list(self.cfg.shape)}), each image deformed, the moving one also by a "
            "small affine, one contrast per pair (T1-like or random, background 0); the benchmark pair and fs_subject "
            "are not used",
            "validation_set": "4 pairs of held-apart SynthSeg maps 17-20 (fixed seeds, T1-like) and the two OASIS scans",
        }


def make_trainer(config: dict[str, Any]) -> UReSNetTrainer:
    """The uresnet trainer for ``config`` (`TrainConfig` keys)."""
    return UReSNetTrainer(TrainConfig.from_dict(dict(config)))
