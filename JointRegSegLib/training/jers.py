"""Training of JERS (seed 003) on synthetic raw heads and one labelled atlas, in `loop.fit`.

Data (ours: the paper trains on real raw scans, which ../shared/data does not have), a batch of
``batch_size`` heads per iteration:

- raw heads come from the SynthSeg whole-head label maps (skull, scalp, eyes included, codes >= 500)
  of the bank (`training.bank`), on the network grid (64^3 at 3 mm, RAS+, the orientation of the
  method's grid), centred on each brain (`head_maps`). Maps 1-16 train; maps 17-20 are held apart;
- each head gets a random affine about the grid centre (rotation U(-10, 10) degrees per axis, scale
  1 + U(-0.1, 0.1), shear U(-0.02, 0.02), translation U(-4, 4) voxels; labels moved by nearest
  neighbour) and a T1-like rendering (`augment.render_t1`: white matter brightest, grey matter darker,
  CSF darkest, one random brightness per extra-cerebral class, noise, blur, bias field),
  percentile-normalised like the images the method sees;
- deviation (``stripped``, default 0.25): that share of the heads is skull-stripped before rendering (every
  extra-cerebral code set to background, the brain and its CSF kept, as skull-stripping tools leave a scan),
  since users also give jers skull-stripped scans (the benchmark pair's, OASIS's) and the paper's training
  scans are all raw. From the same weights (iteration 1277), 485 iterations with it gave validation 0.624
  and the benchmark pair's atlas route 0.503, 533 without it 0.621 and 0.480 (docs/results/jers.md);
- deviation (``mask_supervision``, default 1): a soft Dice between the product of the stage masks
  and the generator's brain mask (`brain_mask_of`) joins the loss. The paper is one-shot (only the
  atlas and its labels supervise; ``mask_supervision=0`` restores that), and its extraction learns
  from the similarity to the skull-stripped atlas alone, a signal that only reaches voxels within a
  window of the brain's edge: the earlier one-shot weights reached Dice_ext 0.65 after 312
  iterations. Our raw heads are synthetic, so their brain masks come for free, as in SynthStrip;
  the atlas labels still supervise the segmentation and the registration alone. Every stage's
  logit ``k f_e(E^{j-1})`` also gets a binary cross-entropy against the brain mask
  (`mask_supervision_loss`): the product of five slope-10 sigmoids saturates, and a Dice on it
  alone has no gradient once the masks are all 0 or all 1. That is how the extraction collapsed
  (overfitting one head at ``lr`` 3e-3: one large Adam step took every logit below 0, the
  product to 0 everywhere, and the Dice, the similarity and their gradients to constants for
  good); the cross-entropy's gradient ``sigmoid(logit) - target`` is largest exactly there, so
  the masks recover within a few steps.

Loss (eq. 9-12): ``L = L_sim(W^N, T) + lambda_seg CE(R, V) + eta sum_j R(M^j)`` with

- ``L_sim`` the local squared NCC ``-mean(cc^2)`` (`losses.lncc_loss`), window ``window`` voxels
  (default 7 = 21 mm at 3 mm; the paper's window is not stated);
- ``CE`` (eq. 11) the cross-entropy of the segmentation logits against the soft targets ``V`` (the
  one-hot atlas labels warped trilinearly by ``(A_c^N)^{-1}``, eq. 7), INSIDE the atlas's view only:
  every voxel weighs by the target mass the warp brings there (``sum_c V_c``: 1 inside the atlas
  grid, 0 outside) and the sum is divided by that mass. Counting all out-of-view mass as background
  (our first version) made a singular affine the easiest way to lower CE: with the coupling on, the
  composed affine's determinant fell from 1 to 0.004 within 25 iterations. Deviation: the soft Dice
  of the foreground classes (`losses.soft_dice_loss`) joins the cross-entropy (``segmentation_loss``):
  CSF is 8 % of the atlas's brain voxels and 2 % of the grid, and on cross-entropy alone the network
  never predicted it (the earlier weights' tissue maps had no CSF; overfitting one head: CSF Dice 0
  after 200 steps, 0.2 with the Dice);
- the coupling of the paper (CE back-propagated into the registration) switches on after
  ``warmup`` iterations (the segmentation network first learns on detached targets), and the
  registration network learns with its own, lower rate ``lr_registration`` (default 1e-4; the
  paper's appendix A.3 uses 1e-6 for 100 000s of iterations); ``seg_to_registration=false`` keeps
  the coupling off throughout;
- ``R(M^j)`` the squared forward differences of the stage mask, averaged over voxels and axes (eq. 12
  sums over voxels; the mean keeps ``eta = 1`` on the scale of the other terms at any grid size);
- ``lambda_seg = 0.1``, ``eta = 1`` (appendix A.3), slope ``k = 10``.

Budget choices: small networks (`nets.jers`; the extraction U-Net runs at half resolution), ``M =
N = 5`` stages as in the paper, Adam ``lr`` 1e-3. Ablations (Table 3): ``extraction=false`` (mask of
ones, the w/o-Ext variant) and ``lambda_seg=0`` (no segmentation loss), each under its own ``name``.

Validation (fixed renderings, never trained on): the 8 held-apart heads (maps 17-20, two renderings
each): ``dice_ext`` (brain mask against every brain code), ``dice_seg`` (the segmentation network's
CSF / grey / white matter against the labels), ``reg_dice`` (the atlas labels brought into the head
by the inverse affine, the w/o-Seg route, against the same classes; ``reg_dice_stage_k`` the same after the
first ``k`` registration stages); the same three of these heads skull-stripped before rendering
(``stripped_*``, not part of the score: what the option ``stripped`` aims at); and the two OASIS scans
(skull-stripped: ``oasis_dice_ext`` of the mask against the scan's nonzero voxels).
``score = (dice_ext + dice_seg + reg_dice) / 3``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..atlas import load_atlas
from ..errors import InputError
from ..imageio.geometry import Geometry, Volume
from ..imageio.network_grid import RAS_DIRECTION, resample, to_network
from ..labels import EXTRACEREBRAL_FIRST_CODE, LUT, TISSUE_LABELS, tissue_of
from ..losses import lncc_loss, soft_dice_loss
from ..metrics.foreground import fill_holes
from ..methods.jers import CLASSES, GRID_SHAPE, SPACING, build_model, labels_to_onehot, to_network_image
from ..nets.blocks import count_parameters
from ..nets.jers import JERSOutput, affine_warp
from ..nets.layout import fast_layout
from ..spatial.affine import index_affine_to_normalised
from ..synth.deform import AffineRanges, random_affine_matrices
from . import bank
from .augment import render_t1
from .common import as_shape, config_from_dict, dice_present, run_device
from .loop import CommonConfig, Trainer

AUGMENT = AffineRanges(rotation_deg=10.0, scale=0.1, shear=0.02, translation=4.0)
TRAIN_MAPS = 16
RENDERS = 2
OASIS = ("oasis_unlabelled/OASIS_0001_0000.nii.gz", "oasis_unlabelled/OASIS_0075_0000.nii.gz")


def brain_mask_of(labels: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Ground-truth brain mask of a SynthSeg map: every brain code (1 .. 499, CSF included)."""
    return (labels > 0) & (labels < EXTRACEREBRAL_FIRST_CODE)


def head_maps(spacing: float = SPACING, shape: tuple[int, int, int] = GRID_SHAPE) -> np.ndarray:
    """All SynthSeg whole-head maps on the network grid (default 64^3 at 3 mm, RAS+) centred on each brain, ``(N, I, J, K)``.

    The maps are resampled whole (1.5 times ``shape`` about the centre of the labelled box, which
    includes the neck), then cropped to ``shape`` about the centre of the brain's bounding box, as a
    scan's field of view would be centred on the head. A bank entry (`training.bank`).
    """
    def build() -> dict[str, np.ndarray]:
        whole = bank.synthseg_maps("head", spacing, tuple(3 * n // 2 for n in shape))
        crops = []
        for labels in whole:
            brain = np.argwhere(brain_mask_of(labels))
            centre = np.rint((brain.min(axis=0) + brain.max(axis=0)) / 2.0).astype(int)
            low = np.clip(centre - np.asarray(shape) // 2, 0, np.asarray(labels.shape) - np.asarray(shape))
            crops.append(labels[tuple(slice(a, a + n) for a, n in zip(low, shape))])
        return {"maps": np.stack(crops).astype(np.int16)}

    return bank.entry(f"jers_heads_{bank.grid_key(spacing, shape)}", build)["maps"]


def atlas_arrays(spacing: float = SPACING, shape: tuple[int, int, int] = GRID_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """The shipped atlas on its network grid: image ``(I, J, K)`` and one-hot tissue labels ``(C, I, J, K)`` (a bank entry)."""
    def build() -> dict[str, np.ndarray]:
        image, labels = load_atlas()
        atlas = to_network_image(image, torch.device("cpu"), shape, spacing)
        onehot = labels_to_onehot(to_network(labels, atlas.grid, labels=True), CLASSES, torch.device("cpu"))
        return {"image": atlas.tensor[0, 0].numpy(), "onehot": onehot[0].numpy().astype(np.uint8)}

    arrays = bank.entry(f"jers_atlas_{bank.grid_key(spacing, shape)}", build)
    return arrays["image"], arrays["onehot"].astype(np.float32)


def synthetic_heads(maps: torch.Tensor, indices: list[int], seed: int, stripped: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps ``indices`` randomly posed and rendered (deterministic in ``seed``): labels and images ``(B, 1, I, J, K)``;
    each head is skull-stripped (extra-cerebral codes set to 0) with probability ``stripped``."""
    generator = torch.Generator(device=maps.device).manual_seed(seed)
    labels = maps[indices].float()
    shape = tuple(maps.shape[2:])
    matrix = random_affine_matrices(shape, generator, len(indices), AUGMENT)
    theta = index_affine_to_normalised(matrix.double(), shape).float()
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], device=maps.device).expand(len(indices), 1, 4)
    labels = affine_warp(labels, torch.cat([theta, bottom], dim=1), mode="nearest").round().long()
    if stripped > 0:
        strip = torch.rand(len(indices), generator=generator, device=maps.device) < stripped
        labels = torch.where(strip.view(-1, 1, 1, 1, 1) & ~brain_mask_of(labels), torch.zeros_like(labels), labels)
    return labels, render_t1(labels, generator)


@dataclass
class TrainConfig(CommonConfig):
    """Settings of one training run (see the module docstring)."""

    name: str = "jers"
    extraction_stages: int = 5
    registration_stages: int = 5
    slope: float = 10.0
    lambda_seg: float = 0.1
    eta: float = 1.0
    window: int = 7
    extraction: bool = True
    seg_to_registration: bool = True
    warmup: int = 300
    lr_registration: float = 1e-4
    mask_supervision: float = 1.0
    stripped: float = 0.25
    spacing: float = SPACING
    shape: tuple[int, int, int] = GRID_SHAPE
    stage: str | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrainConfig:
        c = config_from_dict(cls, config, "jers training")
        c.check_common("jers training")
        c.shape = as_shape(c.shape)
        if len(c.shape) != 3 or any(n % 32 for n in c.shape):
            raise InputError(f"jers training shape must be three multiples of 32 (the networks' depth); got {c.shape}")
        if c.stage is not None:
            raise InputError(f"jers trains all its networks in one stage; omit --stage (got {c.stage!r})")
        for key in ("extraction_stages", "registration_stages", "window", "warmup"):
            value = getattr(c, key)
            if isinstance(value, bool) or int(value) != value or int(value) < (0 if key == "warmup" else 1):
                raise InputError(f"jers training setting '{key}' must be a positive whole number; got {value!r}")
            setattr(c, key, int(value))
        for key in ("slope", "lr_registration"):
            if not float(getattr(c, key)) > 0:
                raise InputError(f"jers training setting '{key}' must be positive; got {getattr(c, key)!r}")
        for key in ("lambda_seg", "eta", "mask_supervision"):
            if not float(getattr(c, key)) >= 0:
                raise InputError(f"jers training setting '{key}' must be >= 0; got {getattr(c, key)!r}")
        if not 0.0 <= float(c.stripped) <= 1.0:
            raise InputError(f"jers training setting 'stripped' is a share of the heads, from 0 to 1; got {c.stripped!r}")
        for key in ("extraction", "seg_to_registration"):
            if not isinstance(getattr(c, key), bool):
                raise InputError(f"'{key}' must be true or false; got {getattr(c, key)!r}")
        return c


def mask_gradient_l2(mask: torch.Tensor) -> torch.Tensor:
    """Eq. 12 as a mean: squared forward differences of a mask ``(B, 1, I, J, K)``, averaged over voxels and axes."""
    d_i = mask[:, :, 1:] - mask[:, :, :-1]
    d_j = mask[:, :, :, 1:] - mask[:, :, :, :-1]
    d_k = mask[:, :, :, :, 1:] - mask[:, :, :, :, :-1]
    return (d_i.pow(2).mean() + d_j.pow(2).mean() + d_k.pow(2).mean()) / 3.0


def in_view_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 11 inside the atlas's view: ``-sum_v sum_c V_c log p_c / sum_v sum_c V_c`` (module docstring)."""
    return -(target * F.log_softmax(logits, dim=1)).sum() / target.sum().clamp_min(1e-6)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 11's in-view cross-entropy plus the soft Dice of the foreground classes (module docstring)."""
    return in_view_cross_entropy(logits, target) + soft_dice_loss(torch.softmax(logits, dim=1), target)


def mask_supervision_loss(out: JERSOutput, brain: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Soft Dice of the product of the stage masks against ``brain``, plus every stage's binary cross-entropy on its
    logit (module docstring: the cross-entropy's gradient does not vanish where the sigmoid saturates)."""
    brain = brain.to(out.masks[0])
    dice = soft_dice_loss(torch.stack(out.masks).prod(dim=0), brain, include_background=True)
    entropy = torch.stack([F.binary_cross_entropy_with_logits(logit, brain) for logit in out.mask_logits]).mean()
    return dice + entropy, {"mask_dice": dice.item(), "mask_bce": entropy.item()}


def jers_loss(
    out: JERSOutput, atlas: torch.Tensor, cfg: TrainConfig, brain: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 9 and its terms (module docstring); ``brain``: the heads' brain masks, for ``mask_supervision``."""
    similarity = lncc_loss(out.warped, atlas.expand_as(out.warped), window=cfg.window)  # eq. 10
    loss = similarity
    terms = {"similarity": similarity.item()}
    if out.segmentation_logits is not None and out.inverse_labels is not None:
        segmentation = segmentation_loss(out.segmentation_logits, out.inverse_labels)  # eq. 11
        loss = loss + cfg.lambda_seg * segmentation
        terms["segmentation"] = segmentation.item()
    if cfg.extraction:
        regulariser = sum(mask_gradient_l2(m) for m in out.masks)  # eq. 12
        loss = loss + cfg.eta * regulariser
        terms["mask_smoothness"] = float(regulariser.detach())
        if cfg.mask_supervision > 0 and brain is not None:
            supervision, parts = mask_supervision_loss(out, brain)
            loss = loss + cfg.mask_supervision * supervision
            terms.update(parts)
    terms["determinant"] = float(torch.linalg.det(out.affine.detach()[:, :3, :3]).mean())
    return loss, terms


class JERSTrainer(Trainer):
    """JERS's data, step and validation (module docstring)."""

    method = "jers"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.device = run_device(cfg)
        torch.manual_seed(cfg.seed)
        self.maps = torch.from_numpy(head_maps(cfg.spacing, cfg.shape).astype(np.int64)).to(self.device)[:, None]
        image, onehot = atlas_arrays(cfg.spacing, cfg.shape)
        self.atlas = fast_layout(torch.from_numpy(image).to(self.device)[None, None], self.device)
        self.atlas_onehot = fast_layout(torch.from_numpy(onehot).to(self.device)[None], self.device)
        self.net = build_model().to(self.device)
        registration = list(self.net.registration.parameters())
        others = [p for n, p in self.net.named_parameters() if not n.startswith("registration.")]
        self.optimiser = torch.optim.Adam(
            [{"params": others, "lr": cfg.lr}, {"params": registration, "lr": cfg.lr_registration}]
        )
        held = [i for i in range(TRAIN_MAPS, len(self.maps)) for _ in range(RENDERS)]
        self.validation, self.validation_labels, self.validation_tissue = self._held_apart(held, stripped=0.0)
        self.stripped, self.stripped_labels, self.stripped_tissue = self._held_apart(held, stripped=1.0)
        oasis = np.stack([bank.real_scan(p, cfg.spacing, cfg.shape) for p in OASIS])
        self.oasis = fast_layout(torch.from_numpy(oasis).to(self.device)[:, None], self.device)

    def _held_apart(self, held: list[int], stripped: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The held-apart maps ``held`` posed and rendered with validation's fixed seed (skull-stripped with
        probability ``stripped``): images, labels and tissue classes (0 background, 1 CSF, 2 GM, 3 WM)."""
        labels, images = synthetic_heads(self.maps.cpu(), held, 10**6, stripped)  # on the CPU, as every validation set
        tissue = np.searchsorted((0, *TISSUE_LABELS), tissue_of(labels.numpy()))
        return fast_layout(images, self.device), labels.to(self.device), torch.from_numpy(tissue).to(self.device)

    def optimisers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adam": self.optimiser}

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        pick = torch.Generator().manual_seed(self.cfg.seed * 1000003 + n)
        indices = torch.randint(TRAIN_MAPS, (self.cfg.batch_size,), generator=pick).tolist()
        labels, images = synthetic_heads(self.maps, indices, self.cfg.seed * 1000003 + n + 500009, self.cfg.stripped)
        return {"raw": images, "brain": brain_mask_of(labels).float()}

    def forward(self, raw: torch.Tensor, coupled: bool, hard: bool = False) -> JERSOutput:
        cfg = self.cfg
        return self.net(
            raw, self.atlas.expand(len(raw), -1, -1, -1, -1), self.atlas_onehot.expand(len(raw), -1, -1, -1, -1),
            cfg.extraction_stages, cfg.registration_stages, cfg.slope, hard=hard,
            extraction=cfg.extraction, segmentation=cfg.lambda_seg > 0 or hard, inverse_gradient=coupled,
        )

    def step(self, batch: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        coupled = self.cfg.seg_to_registration and n >= self.cfg.warmup
        out = self.forward(batch["raw"], coupled)
        loss, terms = jers_loss(out, self.atlas, self.cfg, batch["brain"])
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        return {"loss": loss.item(), **terms, "coupled": float(coupled)}

    def validate(self) -> dict[str, float]:
        scores, out = self._head_scores(self.validation, self.validation_labels, self.validation_tissue)
        oasis = self.forward(self.oasis, coupled=False, hard=True)
        oasis_mask = torch.stack(oasis.masks).prod(dim=0).long()
        scores["oasis_dice_ext"] = float(np.mean([dice_present((self.oasis[k] > 0.05).long(), oasis_mask[k], [1]) for k in range(2)]))
        scores["determinant"] = float(torch.linalg.det(out.affine[:, :3, :3]).mean())
        scores.update(self._stage_dice(out.stage_affines))
        stripped, _ = self._head_scores(self.stripped, self.stripped_labels, self.stripped_tissue)
        scores.update({f"stripped_{key}": value for key, value in stripped.items()})
        scores["score"] = (scores["dice_ext"] + scores["dice_seg"] + scores["reg_dice"]) / 3.0
        return scores

    def _head_scores(self, images: torch.Tensor, labels: torch.Tensor, tissue: torch.Tensor) -> tuple[dict[str, float], JERSOutput]:
        """``dice_ext``, ``dice_seg`` and ``reg_dice`` (module docstring) of held-apart heads ``images`` with their
        ``labels`` and tissue classes; and the network's output."""
        out = self.forward(images, coupled=False, hard=True)
        mask = torch.stack(out.masks).prod(dim=0).long()
        truth = brain_mask_of(labels).long()
        seg = out.segmentation_logits.argmax(dim=1, keepdim=True)
        atlas_classes = out.inverse_labels.argmax(dim=1, keepdim=True)
        heads = range(len(mask))
        return {
            "dice_ext": float(np.mean([dice_present(truth[k], mask[k], [1]) for k in heads])),
            "dice_seg": float(np.mean([dice_present(tissue[k], seg[k], [1, 2, 3]) for k in heads])),
            "reg_dice": float(np.mean([dice_present(tissue[k], atlas_classes[k], [1, 2, 3]) for k in heads])),
        }, out

    def _stage_dice(self, stage_affines: list[torch.Tensor]) -> dict[str, float]:
        """``reg_dice`` after each registration stage (``reg_dice_stage_k``: the atlas labels brought by ``A_c^k``), to
        see whether the later stages of the cascade add to the first ones (not part of the score)."""
        composed = torch.eye(4, dtype=stage_affines[0].dtype, device=self.device).expand(len(stage_affines[0]), 4, 4)
        scores = {}
        for k, step in enumerate(stage_affines, 1):
            composed = composed @ step  # eq. 6
            classes = affine_warp(self.atlas_onehot.expand(len(composed), -1, -1, -1, -1), torch.linalg.inv(composed))
            classes = classes.argmax(dim=1, keepdim=True)  # eq. 7
            scores[f"reg_dice_stage_{k}"] = float(
                np.mean([dice_present(self.validation_tissue[i], classes[i], [1, 2, 3]) for i in range(len(classes))])
            )
        return scores

    def describe(self) -> dict[str, Any]:
        return {
            "architecture": {"network": "JERS", "parameters": count_parameters(self.net), "grid": list(self.cfg.shape),
                             "spacing_mm": self.cfg.spacing, "classes": CLASSES},
            "data": f"synthetic T1-like raw heads rendered from SynthSeg whole-head maps 1-{TRAIN_MAPS} of "
            "../shared/data/synthseg_labelmaps, randomly posed"
            + (f", a share of {self.cfg.stripped:g} skull-stripped before rendering" if self.cfg.stripped > 0 else "")
            + "; atlas Resources/Atlas (MNI152 2009a + derived tissue labels)"
            + (f"; brain masks of the synthetic heads supervise the extraction (weight {self.cfg.mask_supervision})"
               if self.cfg.mask_supervision > 0 else "; brain labels not used (one-shot)"),
            "validation_set": "8 held-apart heads (SynthSeg maps 17-20, two fixed renderings each) and the two OASIS scans",
        }


def make_trainer(config: dict[str, Any]) -> JERSTrainer:
    """The jers trainer for ``config`` (`TrainConfig` keys)."""
    return JERSTrainer(TrainConfig.from_dict(dict(config)))


def heldout_volume(labels: torch.Tensor, image: torch.Tensor, centre: np.ndarray) -> tuple[Volume, Volume]:
    """A synthetic head (network-grid tensors) as image and label Volumes: RAS+, 3 mm, centred on ``centre`` (LPS mm)."""
    origin = centre - RAS_DIRECTION @ (SPACING * (np.asarray(GRID_SHAPE) - 1) / 2.0)
    geometry = Geometry(GRID_SHAPE, (SPACING,) * 3, tuple(origin), RAS_DIRECTION)
    return Volume(image[0, 0].numpy().astype(np.float32), geometry), Volume(labels[0, 0].numpy().astype(np.int16), geometry)


VARIANTS: dict[str, dict[str, Any]] = {
    "JERS": {"weights": "jers"},
    "JERS w/o Seg (atlas labels warped, no segmentation network)": {"weights": "jers", "segmentation": "atlas"},
    "JERS, 1 extraction + 1 registration stage at inference": {"weights": "jers", "extraction_stages": 1, "registration_stages": 1},
}
"""The ablations trained without extraction or without the segmentation loss (Table 3) are not shipped: their
weights were of the network before its segmentation U-Net was instance-normalised and widened, and need retraining."""


def evaluate_heldout(variants: dict[str, dict[str, Any]] | None = None, picture: Path | None = None) -> dict[str, Any]:
    """Dice_ext, MI_reg, Dice_seg (Table 2 metrics) and seconds per volume on held-apart synthetic heads.

    Heads: the validation heads of `JERSTrainer` (maps 17-20, never seen in training, two renderings
    each, randomly posed as in training), centred on the atlas, through the method. Dice_ext: brain
    mask vs every brain code; Dice_seg: mean over CSF, GM, WM of the segmentation vs `tissue_of`;
    MI_reg: mutual information (32 bins, nats) between the warped extracted image and the atlas
    over the atlas grid (``mi_initial``: the raw head as it lies). ``picture``: a PNG of the first
    head with the first variant's brain mask and segmentation.
    """
    from ..imageio.intensity import normalise_intensity
    from ..methods.base import Inputs, Options
    from ..methods.jers import METHOD
    from ..metrics import dice_per_label
    from ..metrics.similarity import mutual_information

    variants = variants or VARIANTS
    maps = torch.from_numpy(head_maps().astype(np.int64))[:, None]
    atlas_image, atlas_labels = load_atlas()
    centre = atlas_image.geometry.index_to_physical((np.asarray(atlas_image.geometry.shape) - 1) / 2.0)
    fixed = normalise_intensity(atlas_image.array)
    held = [i for i in range(TRAIN_MAPS, len(maps)) for _ in range(RENDERS)]
    labels, images = synthetic_heads(maps, held, 10**6)
    heads = [(index, *heldout_volume(labels[k:k + 1], images[k:k + 1], centre)) for k, index in enumerate(held)]
    table: dict[str, Any] = {}
    for name, extra in variants.items():
        rows = []
        for index, image, labels in heads:
            tick = time.perf_counter()
            result = METHOD.register(Inputs(atlas_image, image, atlas_labels), Options(extra=dict(extra)))
            seconds = time.perf_counter() - tick
            truth = tissue_of(labels.array)
            seg = dice_per_label(truth, result.moving_seg.array, labels=list(TISSUE_LABELS))
            initial = resample(image, atlas_image.geometry).array
            if picture is not None and not rows and not table:
                _picture(image, result.brain_mask.array, result.moving_seg.array, picture, f"jers ({name}) on held-apart synthetic head {index + 1}")
            rows.append({
                "map": index,
                "dice_ext": dice_per_label(brain_mask_of(labels.array).astype(np.uint8), result.brain_mask.array, labels=[1])[1],
                "mi_reg": mutual_information(fixed, normalise_intensity(result.warped.array)),
                "mi_initial": mutual_information(fixed, normalise_intensity(initial)),
                "dice_seg": float(np.mean([seg.get(c, 0.0) for c in TISSUE_LABELS])),
                "dice_seg_per_class": {LUT[c].name: seg.get(c, 0.0) for c in TISSUE_LABELS},
                "seconds": seconds,
            })
        summary = {
            key: [float(np.mean([r[key] for r in rows])), float(np.std([r[key] for r in rows]))]
            for key in ("dice_ext", "mi_reg", "mi_initial", "dice_seg", "seconds")
        }
        table[name] = {"settings": extra, "mean_std": summary, "volumes": rows}
    return table


# name: (image, label map for Dice_seg, where the reference brain mask for Dice_ext comes from (`reference_brain`)).
# fs_subject/fs_brainmask.mgz is NOT norm.mgz's mask: it holds another head (other ventricles and folds,
# intensities correlating 0.24 with norm.mgz's where both are nonzero, Dice 0.80 of the two supports).
REAL_SCANS = {
    "pair_fixed": ("pair/fixed_img.nii.gz", "pair/fixed_seg.nii.gz", "labels"),
    "fs_subject": ("fs_subject/norm.mgz", "fs_subject/aparc.a2009s+aseg.mgz", "support"),
    "flair": ("flair/FLAIR.nii.gz", None, None),
}


def reference_brain(image: np.ndarray, labels: np.ndarray, source: str) -> np.ndarray:
    """The scan's reference brain mask: ``"labels"`` every brain code of its label map (`brain_mask_of`);
    ``"support"`` the nonzero voxels of a skull-stripped image, holes filled (FreeSurfer's ``norm.mgz`` is
    its T1 inside its own brain mask, zero outside)."""
    if source == "support":
        return fill_holes(image > 0)
    return brain_mask_of(labels)


def _picture(image: Volume, mask: np.ndarray, seg: np.ndarray, path: Path, title: str) -> None:
    """Axial, coronal and sagittal slices through the mask's centre: brain-mask contour, then tissue overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from ..report.slices import orthogonal_aspects, orthogonal_slices

    centre = tuple(int(c) for c in np.rint(np.argwhere(mask > 0).mean(axis=0))) if mask.any() else None
    geometry = image.geometry
    views = orthogonal_slices(image.array.astype(np.float32), centre, geometry)
    masks = orthogonal_slices(mask.astype(np.float32), centre, geometry)
    classes = np.searchsorted((0, *TISSUE_LABELS), seg)  # 0 background, 1 CSF, 2 GM, 3 WM
    segs = orthogonal_slices(classes.astype(np.float32), centre, geometry)
    aspects = orthogonal_aspects(geometry)
    colours = ListedColormap([(0, 0, 0, 0), (0.2, 0.4, 1.0, 0.55), (1.0, 0.3, 0.3, 0.55), (1.0, 1.0, 0.4, 0.55)])
    low, high = np.percentile(image.array, [1, 99])
    figure, axes = plt.subplots(2, 3, figsize=(11, 7.5))
    for column in range(3):
        for row in range(2):
            ax = axes[row, column]
            ax.imshow(views[column], cmap="gray", vmin=low, vmax=high, aspect=aspects[column])
            ax.axis("off")
        axes[0, column].contour(masks[column], levels=[0.5], colors="lime", linewidths=1.0)
        axes[1, column].imshow(segs[column], cmap=colours, vmin=0, vmax=3, interpolation="nearest", aspect=aspects[column])
    axes[0, 0].set_title("brain mask (green)", loc="left")
    axes[1, 0].set_title("segmentation: CSF blue, GM red, WM yellow", loc="left")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def evaluate_real(output: Path, shared: Path | None = None) -> dict[str, Any]:
    """Run jers on the real scans of ../shared/data (`REAL_SCANS`); PNG per scan in ``output``; Dice where labels exist.

    ``pair/fixed_img`` (skull-stripped T1 with FreeSurfer aseg labels): Dice_ext against ``aseg > 0``
    and Dice_seg against the aseg mapped to tissue classes (`tissue_of`); ``fs_subject/norm.mgz`` (the
    FreeSurfer subject, intensity-normalised inside its brain mask): Dice_ext against that mask (the image's
    support, `reference_brain`), Dice_seg against its ``aparc.a2009s+aseg``; ``flair/FLAIR``: picture only.
    """
    from ..imageio.io import read_image, read_labels
    from ..methods.base import Inputs, Options
    from ..methods.jers import METHOD
    from ..metrics import dice_per_label

    shared = shared or bank.require_shared_data()
    atlas_image, atlas_labels = load_atlas()
    report: dict[str, Any] = {}
    for name, (image_file, labels_file, brain_source) in REAL_SCANS.items():
        image = read_image(shared / image_file)
        tick = time.perf_counter()
        result = METHOD.register(Inputs(atlas_image, image, atlas_labels), Options())
        entry: dict[str, Any] = {"file": image_file, "seconds": time.perf_counter() - tick}
        if labels_file is not None:
            labels = read_labels(shared / labels_file).array
            brain = reference_brain(image.array, labels, brain_source)
            seg = dice_per_label(tissue_of(labels), result.moving_seg.array, labels=list(TISSUE_LABELS))
            entry["dice_ext"] = dice_per_label(brain.astype(np.uint8), result.brain_mask.array, labels=[1])[1]
            entry["dice_seg"] = float(np.mean([seg.get(c, 0.0) for c in TISSUE_LABELS]))
            entry["dice_seg_per_class"] = {LUT[c].name: seg.get(c, 0.0) for c in TISSUE_LABELS}
        path = output / f"jers_real_{name}.png"
        title = f"jers on {image_file}" + (f": Dice_ext {entry['dice_ext']:.3f}, Dice_seg {entry['dice_seg']:.3f}" if "dice_ext" in entry else " (no labels)")
        _picture(image, result.brain_mask.array, result.moving_seg.array, path, title)
        entry["picture"] = str(path)
        report[name] = entry
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m JointRegSegLib.training.jers evaluate [OUT.json]`` evaluates the shipped weights on held-apart
    heads; ``python -m JointRegSegLib.training.jers real [FOLDER]`` runs the real scans (PNGs in FOLDER).
    Training: ``jointregseg train jers``."""
    import json

    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "real":
        torch.set_num_threads(1)
        print(json.dumps(evaluate_real(Path(args[1]) if len(args) > 1 else Path.cwd()), indent=2))
        return 0
    if args and args[0] == "evaluate":
        torch.set_num_threads(1)
        table = evaluate_heldout(picture=Path.cwd() / "jers_heldout_example.png")
        text = json.dumps(table, indent=2)
        if len(args) > 1:
            Path(args[1]).write_text(text + "\n")
        for name, entry in table.items():
            m = entry["mean_std"]
            print(f"{name}: " + ", ".join(f"{k} {v[0]:.3f} +- {v[1]:.3f}" for k, v in m.items()))
        return 0
    print(main.__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
