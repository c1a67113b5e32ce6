"""Training of the tto networks (seed 004): teacher pretraining on synthetic pairs, then distillation, in `loop.fit`.

Two trainers (``stage``):

- ``teacher`` (section 2.1, eq. 1): the teacher U-Net learns on synthetic pairs only (SynthMorph
  recipe) with ``L = MultiAxisMI(I_f, I_m o phi) + lambda_smooth ||grad u||^2``;
- ``student`` (section 2.2): the student learns from the frozen teacher (the best teacher weights in
  the output folder) with ``L_KD = lambda_dist MultiAxisMI(I_m o phi_T, I_m o phi_S) + lambda_sim
  MultiAxisMI(I_f, I_m o phi_S) + lambda_smooth ||grad u_S||^2``.

Both networks take ``cat([moving, fixed])`` and output a displacement in voxels (`methods.tto.predict`).

Data (ours where the paper is silent), a batch of ``batch_size`` pairs per iteration:

- label maps: the SynthSeg maps of the bank (`training.bank`) on an 80 x 96 x 112 grid at
  ``spacing`` mm (2 mm: the network grid the method uses for a whole brain on a GPU), brain-only
  (extra-cerebral classes set to background, like skull-stripped scans) or whole-head, maps 1-16
  (17-20 are held apart for validation); plus SynthMorph's smooth-noise maps (26 labels).
  ``sources`` gives the probability of each kind (default brain 0.7, head 0.15, noise 0.15); one
  kind and one random ``shape`` crop (default 48^3; the network is fully convolutional) per batch;
- each image of a pair is its label map deformed by its own random diffeomorphism (velocity RMS up
  to ``max_std`` voxels, SynthMorph's 3; integrated on a grid twice as coarse,
  `synth.DeformationOptions.factor`) and rendered with its own random contrast (`synth.render_image`),
  so the network learns contrast-invariant registration;
- MultiAxisMI on a random ``mi_stride`` sub-lattice per iteration (as in `methods.tto`), 32 bins;
- ``lr`` default 1e-3 (the paper's 1e-4 is for 150 000 GPU iterations), Adam; ``lambda_smooth`` 0.3,
  ``lambda_dist = lambda_sim = 1``; the student starts from scratch.

Validation (fixed seeds, never trained on): 4 pairs of held-apart brain maps 17-20 (each map
deformed twice, random contrasts) on the whole 80 x 96 x 112 grid: Dice of the moving labels warped
by the predicted field against the fixed labels over every structure present (``score``;
``identity_dice`` before registration), and the two OASIS scans (``oasis_ncc``; NCC on the 2 mm grid).

Without the shared data (``sources`` = noise only) the trainer needs no bank: its validation pairs
are smooth-noise maps with other seeds (the tests use this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..losses import gradient_l2
from ..methods.tto import WEIGHT_NAMES, build_network, multi_axis_mi, predict
from ..metrics.similarity import ncc
from ..nets.blocks import count_parameters
from ..nets.layout import fast_layout
from ..spatial import warp
from ..synth import DeformationOptions, render_image, smooth_noise_labelmap
from ..weights import load_into, weights_dir
from . import bank
from .augment import deform_labels
from .common import as_shape, config_from_dict, dice_present, image_array, run_device, set_floats
from .loop import CommonConfig, Trainer, held_apart_generator

STAGES = ("teacher", "student")
MAP_SHAPE = (80, 96, 112)
NOISE_LABELS = 26
TRAIN_MAPS = 16
OASIS = ("oasis_unlabelled/OASIS_0001_0000.nii.gz", "oasis_unlabelled/OASIS_0075_0000.nii.gz")


@dataclass
class TrainConfig(CommonConfig):
    """Settings of one training run (see the module docstring)."""

    stage: str = "teacher"
    shape: tuple[int, int, int] = (48, 48, 48)
    spacing: float = 2.0
    lambda_smooth: float = 0.3
    lambda_dist: float = 1.0
    lambda_sim: float = 1.0
    mi_bins: int = 32
    mi_stride: int = 2
    sources: dict[str, float] = field(default_factory=lambda: {"brain": 0.7, "head": 0.15, "noise": 0.15})
    max_std: float = 3.0
    clip_norm: float | None = None  # the gradient's norm is clipped to this (None: not clipped; the paper says nothing)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrainConfig:
        """Checked settings from a plain dictionary (unknown keys and bad values raise InputError)."""
        c = config_from_dict(cls, config, "tto training")
        c.check_common("tto training")
        if c.stage not in STAGES:
            raise InputError(f"tto training stage must be 'teacher' or 'student'; got {c.stage!r}")
        shape = as_shape(c.shape)
        if len(shape) != 3 or any(s < 16 or s % 16 for s in shape):
            raise InputError(f"training shape must be three multiples of 16 (e.g. [64, 64, 64]); got {c.shape}")
        if any(s > m for s, m in zip(shape, MAP_SHAPE)):
            raise InputError(f"training shape {shape} must fit in the label-map grid {MAP_SHAPE}")
        c.shape = shape
        for key in ("mi_bins", "mi_stride"):
            if int(getattr(c, key)) < 1:
                raise InputError(f"tto training setting '{key}' must be a positive integer; got {getattr(c, key)!r}")
            setattr(c, key, int(getattr(c, key)))
        set_floats(c, ("spacing", "max_std"))
        if c.clip_norm is not None:
            set_floats(c, ("clip_norm",))
        set_floats(c, ("lambda_smooth", "lambda_dist", "lambda_sim"), positive=False)
        if not isinstance(c.sources, dict) or set(c.sources) - {"brain", "head", "noise"} or sum(c.sources.values()) <= 0:
            raise InputError(f"'sources' must map some of brain, head, noise to probabilities; got {c.sources!r}")
        if any(float(v) < 0 for v in c.sources.values()):
            raise InputError(f"'sources' probabilities must be >= 0; got {c.sources!r}")
        return c


class TTOTrainer(Trainer):
    """The teacher's or the student's data, step and validation (module docstring)."""

    method = "tto"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.name = WEIGHT_NAMES[cfg.stage]
        self.device = run_device(cfg)
        torch.manual_seed(cfg.seed)
        self.kinds = [k for k in ("brain", "head", "noise") if float(cfg.sources.get(k, 0.0)) > 0]
        weights = np.asarray([float(cfg.sources[k]) for k in self.kinds])
        self.cumulative = np.cumsum(weights / weights.sum())
        self.maps = {
            kind: torch.from_numpy(bank.synthseg_maps(kind, cfg.spacing, MAP_SHAPE).astype(np.int64)).to(self.device)[:, None]
            for kind in ("brain", "head") if kind in self.kinds
        }
        self.deformation = DeformationOptions(max_std=cfg.max_std, factor=2)
        self.net = build_network(cfg.stage).to(self.device)
        self.optimiser = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.teacher, self.teacher_sha = None, None
        if cfg.stage == "student":
            teacher = build_network("teacher")
            self.teacher_sha = load_into(teacher, WEIGHT_NAMES["teacher"], folder=Path(cfg.output) if cfg.output else weights_dir())
            self.teacher = fast_layout(teacher.to(self.device).eval().requires_grad_(False), self.device)
        self.validation = fast_layout(self._validation_pairs(), self.device)
        self.oasis = None
        if "brain" in self.maps:
            oasis = [bank.real_scan(p, cfg.spacing, MAP_SHAPE) for p in OASIS]
            self.oasis = fast_layout(torch.from_numpy(np.stack(oasis)).to(self.device)[:, None], self.device)

    def optimisers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adam": self.optimiser}

    def _pairs(self, labels: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Each source map deformed twice and rendered with its own random contrast."""
        fixed_labels = deform_labels(labels, generator, self.deformation)
        moving_labels = deform_labels(labels, generator, self.deformation)
        return {
            "fixed": render_image(fixed_labels, generator), "moving": render_image(moving_labels, generator),
            "fixed_labels": fixed_labels, "moving_labels": moving_labels,
        }

    def _validation_pairs(self) -> dict[str, torch.Tensor]:
        generator = held_apart_generator()
        if "brain" in self.maps:
            labels = self.maps["brain"][TRAIN_MAPS:].cpu()
        else:
            labels = smooth_noise_labelmap(self.cfg.shape, NOISE_LABELS, generator, 4)
        return self._pairs(labels, generator)

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        pick = torch.Generator().manual_seed(cfg.seed * 1000003 + n)
        generator = self.generator(n, 1)
        kind = self.kinds[int(np.searchsorted(self.cumulative, float(torch.rand((), generator=pick))))]
        if kind == "noise":
            labels = smooth_noise_labelmap(cfg.shape, NOISE_LABELS, generator, cfg.batch_size)
        else:
            start = [int(torch.randint(m - s + 1, (), generator=pick)) for m, s in zip(MAP_SHAPE, cfg.shape)]
            index = torch.randint(TRAIN_MAPS, (cfg.batch_size,), generator=pick).tolist()
            window = (index, slice(None), *(slice(a, a + s) for a, s in zip(start, cfg.shape)))
            labels = self.maps[kind][window]
        batch = self._pairs(labels, generator)
        return {"fixed": batch["fixed"], "moving": batch["moving"]}

    def step(self, batch: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        cfg = self.cfg
        fixed, moving = batch["fixed"], batch["moving"]
        generator = torch.Generator().manual_seed(cfg.seed * 1000003 + n + 500009)
        disp = predict(self.net, fixed, moving)
        warped = warp(moving, disp)
        similarity = multi_axis_mi(fixed, warped, cfg.mi_bins, cfg.mi_stride, generator)
        smooth = gradient_l2(disp)
        terms = {"similarity": similarity.item(), "smooth": smooth.item()}
        if self.teacher is None:
            loss = similarity + cfg.lambda_smooth * smooth  # eq. 1 (lambda_sim = 1)
        else:
            with torch.no_grad():
                warped_teacher = warp(moving, predict(self.teacher, fixed, moving))
            distillation = multi_axis_mi(warped_teacher, warped, cfg.mi_bins, cfg.mi_stride, generator)
            terms["distillation"] = distillation.item()
            loss = cfg.lambda_dist * distillation + cfg.lambda_sim * similarity + cfg.lambda_smooth * smooth  # L_KD
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), math.inf if cfg.clip_norm is None else cfg.clip_norm)
        self.optimiser.step()
        return {"loss": loss.item(), **terms, "grad_norm": float(norm)}

    def validate(self) -> dict[str, float]:
        v = self.validation
        disp = predict(self.net, v["fixed"], v["moving"])
        warped = warp(v["moving_labels"].float(), disp, mode="nearest").long()
        count = len(warped)
        labels = sorted(int(c) for c in torch.unique(v["fixed_labels"]).tolist() if c > 0)
        scores = {
            "reg_dice": float(np.mean([dice_present(v["fixed_labels"][k], warped[k], labels) for k in range(count)])),
            "identity_dice": float(np.mean([dice_present(v["fixed_labels"][k], v["moving_labels"][k], labels) for k in range(count)])),
        }
        if self.oasis is not None:
            moved = warp(self.oasis.flip(0), predict(self.net, self.oasis, self.oasis.flip(0)))
            scores["oasis_ncc"] = float(np.mean([ncc(image_array(self.oasis[k]), image_array(moved[k])) for k in range(2)]))
            scores["identity_oasis_ncc"] = ncc(image_array(self.oasis[0]), image_array(self.oasis[1]))
        scores["score"] = scores["reg_dice"]
        return scores

    def describe(self) -> dict[str, Any]:
        return {
            "stage": self.cfg.stage,
            "architecture": {"network": f"tto {self.cfg.stage} U-Net", "parameters": count_parameters(self.net)},
            "data": f"synthetic pairs (SynthMorph recipe) from SynthSeg label maps 1-{TRAIN_MAPS} of "
            f"../shared/data/synthseg_labelmaps ({self.cfg.spacing:g} mm) and smooth-noise maps; sources {self.cfg.sources}; "
            f"{list(self.cfg.shape)} crops",
            "validation_set": "4 pairs of held-apart SynthSeg maps 17-20 (whole 2 mm grid, fixed seeds) and the two OASIS scans"
            if "brain" in self.maps else "4 smooth-noise pairs with seeds never trained on",
            "teacher_sha256": self.teacher_sha,
        }


def make_trainer(config: dict[str, Any]) -> TTOTrainer:
    """The tto trainer for ``config`` (`TrainConfig` keys; ``stage`` teacher or student)."""
    return TTOTrainer(TrainConfig.from_dict(dict(config)))
