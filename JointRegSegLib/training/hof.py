"""Training of HOF (seed 000): data, losses (eq. 4-6), AAA (eq. 2-3) and the phases of section 3.5, in `loop.fit`.

One resumable run walks through the paper's phases by iteration count (``phases``: iterations of
the first three; refinement goes on for the rest of the time):

1. ``pretrain`` (section 3.5; section 4.1: "similarity loss and smoothness loss"): the shared encoder
   and the registration decoder learn registration of random pairs of ALL training volumes
   (labelled and unlabelled), ``sim + lambda2 smo``; afterwards the encoder is frozen (run
   ``unfrozen`` unfreezes it again);
2. ``registration`` (decoder training, first half): the registration decoder alone with the leader
   loss eq. 4; the Dice term uses the GROUND-TRUTH labels where both volumes of the pair are
   labelled (the segmentation decoder is not trained yet) and is left out otherwise;
3. ``segmentation`` (decoder training, second half): the segmentation decoder alone with the
   follower loss on AAA pseudo-pairs ``(x_p, y_p)`` and on the labelled volumes;
4. ``refine`` (iterative refinement, Algorithm 1): both decoders together, the follower by its own
   gradient, the leader by the GRA hypergradient (`training.gra`), the segmentation feedback of the
   leader (lambda3) ramped up from 0 over ``lambda3_ramp`` refinement iterations, so registration is
   not pulled towards the follower's early, poor segmentations.

Runs (Table 3 ablations, each its own weights): ``full``; ``no_aaa`` (the follower sees only the
labelled volumes); ``no_gra`` (first-order alternation); ``no_feedback`` (``lambda3 = 0``);
``unfrozen`` (the encoder joins the leader's parameters ``w``). An ablation run starts from the full
run's state at the end of phase 3 (`PHASE2_SNAPSHOT`, written by the full run) and only refines.

Losses (ours where the paper is silent):

- ``sim`` (eq. 5): mean squared difference ``x_l - x_u o psi^-1``, plus the symmetric term
  ``x_u - x_l o psi`` (both fields are predicted and both are used by AAA), averaged; both images of
  each term smoothed first by a Gaussian of ``sim_blur`` voxels (default 1; 0 = the paper's plain MSE).
  Ours: trilinear sampling blurs most at half-voxel offsets, so an MSE of two images that no field
  aligns exactly (sharp-edged renderings of two deformations) is lowest half a voxel off the right
  field: a box against a box one voxel larger on each side scores best shifted by 0.5 voxels; with the
  images smoothed by 1 voxel its best shift is 0. (It does not explain why the shipped network moves an
  image registered to itself by about a voxel: 400 pretraining iterations from scratch left that field
  at 0.6-0.9 voxels with either loss; the method cancels it by registering symmetrically, `nets.hof`);
- ``smo``: `losses.gradient_l2` of both fields in grid_sample's NORMALISED coordinates (channel c
  times 2 / (N_c - 1)): with voxel units the paper's lambda2 = 10 would leave no deformation against
  an MSE on [0, 1] intensities;
- leader Dice (eq. 4): soft Dice between ``y_l o psi`` and the follower's softmax on ``x_u``,
  background excluded;
- follower (eq. 6): soft Dice INCLUDING the background class plus cross-entropy (soft targets),
  averaged over the pseudo-pair and the labelled volume. The paper's Dice without background never
  trains the background directly: the earlier weights labelled dark background as thalamus and
  brain stem (2.6 times the true foreground);
- AAA eq. 3: ``x_p = gamma x_u o psi^-1 o psi + (1 - gamma) x_u``, ``gamma ~ U(0, 1)`` per pair,
  ``y_p = y_l o psi`` (trilinear: soft pseudo-labels); both keep their graph to ``w``;
- GRA: the rank-1 gradient response (``gra="rank1"``, `training.gra`) by default; each logged row
  holds ``mixed_ratio``, the size of the response term against the first-order leader gradient;
- lambdas (1, 10, 1), leader Adam ``alpha`` 1e-3, the unrolled step ``beta`` 5e-4 (section 4.1);
  the follower's own update is Adam with ``lr_follower`` 2e-3.

Data (from the bank, `training.bank`: 3 mm RAS+ grids of 64^3, a whole brain), a batch of
``batch_size`` pairs per iteration (paper: 4), one random ``crop`` window (multiple of 8) of each pair:

- labelled (few-shot): SynthSeg maps 1-4 (extra-cerebral classes removed), deformed (smooth
  random diffeomorphism) and rendered T1-like afresh at every iteration (`augment.render_t1`),
  with their labels;
- unlabelled: SynthSeg maps 5-16, deformed and rendered the same way with their labels discarded,
  and the two MNI152 2009 T1 renderings of ../shared/data (deformed); FLAIR is left out (eq. 5 is
  an MSE, single-contrast); the OASIS scans are held apart for validation;
- same-brain pairs: with probability ``1 - other_subject`` (0.25) a batch's second volumes are the first
  ones' maps again, each deformed and rendered afresh (a rescan after a small deformation; in the registration
  phase with their labels). Ours: without them every pair is two different brains; the network so
  trained (iteration 2756) moved an image registered to itself by about a voxel inside the brain (0.6 of
  it one shift along the second axis) and lowered the benchmark pair's Dice after its affine stage at
  every fraction of its field;
- pre-alignment (``prealign``, default; ours, 2026-11-30): every map brought to the maps' mean shape by the
  least-squares affine of its structures' centroids, the MNI152 scans onto the first map by the NMI affine stage
  (`training.prealign`), so pairs start where the method's affine stage leaves them. Before, two maps differed by
  a whole affine, and the network learned first what that stage does: on the held-apart pairs the weights of
  iteration 4274 took Dice 0.329 to 0.495 alone, the affine stage alone to 0.578, and the network after it to
  0.606; on the same pairs pre-aligned (0.556) the network alone gave 0.548. Then each pair takes one random
  pose, both volumes together (``pose``: rotation degrees, scale, shear, voxels; default 15, 0.15, 0.02, 4, the
  benchmark pair's scans being 13 degrees and 13 % apart): the pairs stay aligned to each other while the brains
  meet the poses of real scans, which the segmentation labels unregistered (trained on the mean pose alone for 284
  iterations, hof segmented the benchmark pair's moving scan with Dice 0.34 against 0.61);
- validation: SynthSeg maps 17-20 rendered T1-like with fixed seeds (segmentation Dice of each, with
  ``prealign`` in a pose of its own; registration Dice of the pairs 17 -> 18 -> 19 -> 20 -> 17) and the two OASIS scans (NCC after
  registration), each scored as the method runs by default (the segmentation averaged with the mirror image's,
  the registration symmetric: options ``mirror`` and ``symmetric``; one-way and unmirrored before 2026-11-29's
  last change, when the shipped weights (4274) scored 0.672 one-way and 0.696 as the method runs: segmentation
  0.769 -> 0.787, registration 0.497 -> 0.495, OASIS NCC 0.916 -> 0.932);
  ``score = (seg_dice + reg_dice) / 2 + oasis_ncc - identity_oasis_ncc`` (`common.with_real_pair`; from commit
  4a3100a to f2d4a8c only a fall below ``identity_oasis_ncc`` counted, before it the real pair not at all): the
  continuation of 2026-11-29 scored up to 0.645 on the synthetic volumes against the shipped weights' 0.633 while
  registering the OASIS pair worse than they do (NCC 0.86-0.89 against 0.916).

Segmentation classes: `methods.hof.HOF_LABELS` (28 of the 30 evaluation structures), background 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call
from torch.nn import functional as F

from ..errors import InputError
from ..losses import gradient_l2, soft_dice_loss
from ..methods.hof import N_CLASSES, build_net, class_probabilities, codes_to_classes
from ..methods.options import defaults
from ..metrics.similarity import ncc
from ..nets.hof import HOFNet
from ..nets.layout import fast_layout
from ..spatial import affine_to_displacement, warp
from ..synth import AffineRanges, DeformationOptions, random_deformation
from ..synth.deform import random_affine_matrices
from ..synth.render import smoothed
from . import bank
from .augment import deform_labels, render_t1
from .common import config_from_dict, dice_present, image_array, run_device, set_floats, set_probabilities, with_real_pair
from .gra import MODES as GRA_MODES
from .gra import hypergradient
from .loop import CommonConfig, Trainer, checkpoint_dir, held_apart_generator
from .prealign import align_maps, align_scans

PHASES = ("pretrain", "registration", "segmentation", "refine")
RUNS = ("full", "no_aaa", "no_gra", "no_feedback", "unfrozen")
LABELLED, UNLABELLED, HELD_APART = range(0, 4), range(4, 16), range(16, 20)
REAL_UNLABELLED = (
    "mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "mni152/MNI152_2009_template.nii.gz",
)
OASIS = ("oasis_unlabelled/OASIS_0001_0000.nii.gz", "oasis_unlabelled/OASIS_0075_0000.nii.gz")
PHASE2_SNAPSHOT = "hof_phase2_state.pt"


def weight_name(run: str) -> str:
    """Manifest name of a run's weights: ``hof`` for the full method, ``hof_<run>`` for an ablation."""
    return "hof" if run == "full" else f"hof_{run}"


def one_hot(classes: torch.Tensor, n_classes: int = N_CLASSES) -> torch.Tensor:
    """``(B, 1, I, J, K)`` integer classes -> ``(B, n_classes, I, J, K)`` float one-hot."""
    return F.one_hot(classes[:, 0].long(), n_classes).permute(0, 4, 1, 2, 3).float()


# ----------------------------------------------------------------------------------------- losses


def normalised_field(disp: torch.Tensor) -> torch.Tensor:
    """A voxel displacement in grid_sample's normalised units (channel c times 2 / (N_c - 1))."""
    scale = torch.tensor([2.0 / (n - 1) for n in disp.shape[2:]], dtype=disp.dtype, device=disp.device)
    return disp * scale.view(1, 3, 1, 1, 1)


def smoothness(disp: torch.Tensor) -> torch.Tensor:
    """``smo`` of eq. 4: gradient-L2 of the field in normalised coordinates (module docstring)."""
    return gradient_l2(normalised_field(disp))


def similarity(moving: torch.Tensor, fixed: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """Eq. 5 for one direction, ``MSE(moving o psi, fixed)``, of images already smoothed (`synth.render.smoothed`
    by ``sim_blur`` voxels, module docstring)."""
    return F.mse_loss(warp(moving, psi), fixed)


def leader_loss(
    x_l: torch.Tensor,
    x_u: torch.Tensor,
    psi: torch.Tensor,
    psi_inv: torch.Tensor,
    lambdas: tuple[float, float, float],
    y_l: torch.Tensor | None = None,
    target_u: torch.Tensor | None = None,
    sim_blur: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``Phi_r`` of eq. 4-5 for ``psi`` (l -> u, on u's grid) and ``psi_inv`` (u -> l, on l's grid).

    ``y_l``: one-hot labels of ``x_l``; ``target_u``: probabilities (the follower's softmax, or
    ground truth) on ``x_u``. The Dice term is included when both are given and lambda3 > 0.
    ``sim_blur``: the similarity's smoothing in voxels (module docstring).
    """
    s_l, s_u = smoothed(x_l, sim_blur), smoothed(x_u, sim_blur)
    sim = 0.5 * (similarity(s_u, s_l, psi_inv) + similarity(s_l, s_u, psi))  # eq. 5 (+ symmetric)
    smo = 0.5 * (smoothness(psi) + smoothness(psi_inv))
    terms = {"sim": sim, "smo": smo}
    loss = lambdas[0] * sim + lambdas[1] * smo
    if y_l is not None and target_u is not None and lambdas[2] > 0:
        dice = soft_dice_loss(target_u, warp(y_l, psi))
        terms["dice"] = dice
        loss = loss + lambdas[2] * dice  # eq. 4
    return loss, terms


def aaa(
    x_u: torch.Tensor, y_l: torch.Tensor, psi: torch.Tensor, psi_inv: torch.Tensor, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive Appearance Alignment, eq. 3: ``x_p = gamma x_u o psi^-1 o psi + (1 - gamma) x_u``, ``y_p = y_l o psi``.

    ``psi`` lives on u's grid (``warp(x_l, psi) ~ x_u``), ``psi_inv`` on l's grid. ``gamma``
    ``(B,)`` in [0, 1]. Pull convention: ``warp(warp(x_u, psi_inv), psi)(p) = x_u(psi^-1(psi(p)))``.
    """
    g = gamma.view(-1, 1, 1, 1, 1).to(x_u)
    round_trip = warp(warp(x_u, psi_inv), psi)
    return g * round_trip + (1.0 - g) * x_u, warp(y_l, psi)


def follower_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``Phi_s`` of eq. 6 (module docstring): soft Dice with the background class plus soft-target cross-entropy."""
    dice = soft_dice_loss(torch.softmax(logits, dim=1), target, include_background=True)
    cross_entropy = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return 0.5 * (dice + cross_entropy)


def bilevel_losses(
    net: HOFNet,
    x_l: torch.Tensor,
    y_l: torch.Tensor,
    x_u: torch.Tensor,
    gamma: torch.Tensor,
    lambdas: tuple[float, float, float],
    use_aaa: bool = True,
    encoder_grad: bool = False,
    sim_blur: float = 1.0,
) -> tuple[Callable[[list[torch.Tensor]], torch.Tensor], Callable[[list[torch.Tensor]], torch.Tensor], dict[str, torch.Tensor]]:
    """Leader ``Phi_r(w, theta)`` and follower ``Phi_s(theta, w)`` of labelled/unlabelled pairs, as closures of theta.

    Runs the ``w``-dependent part once (Algorithm 1, lines 3-6: both fields, AAA, the pseudo-pair's
    features); the closures evaluate the segmentation decoder with the given parameters (in the
    order of ``net.segmentation.parameters()``). ``terms`` receives the leader's loss terms; ``sim_blur`` as in
    `leader_loss`.
    """
    names = [name for name, _ in net.segmentation.named_parameters()]
    with torch.set_grad_enabled(encoder_grad):
        f_l, f_u = net.encoder(x_l), net.encoder(x_u)
    psi, psi_inv = net.registration(f_l, f_u), net.registration(f_u, f_l)  # eq. 2, line 3
    if use_aaa:
        x_p, y_p = aaa(x_u, y_l, psi, psi_inv, gamma)  # eq. 3, lines 5-6
        f_p = net.encoder(x_p)

    def segment(theta: list[torch.Tensor], features: list[torch.Tensor]) -> torch.Tensor:
        return functional_call(net.segmentation, dict(zip(names, theta)), (features,))

    def follower(theta: list[torch.Tensor]) -> torch.Tensor:  # Phi_s, eq. 6
        own = follower_loss(segment(theta, f_l), y_l)
        if not use_aaa:
            return own
        return 0.5 * (follower_loss(segment(theta, f_p), y_p) + own)

    terms: dict[str, torch.Tensor] = {}

    def leader(theta: list[torch.Tensor]) -> torch.Tensor:  # Phi_r, eq. 4
        probs = torch.softmax(segment(theta, f_u), dim=1) if lambdas[2] > 0 else None
        loss, parts = leader_loss(x_l, x_u, psi, psi_inv, lambdas, y_l, probs, sim_blur)
        terms.update(parts)
        return loss

    return leader, follower, terms


# --------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig(CommonConfig):
    """Settings of one run (see the module docstring)."""

    run: str = "full"
    phases: tuple[int, int, int] = (600, 300, 1200)
    spacing: float = 3.0
    size: int = 64
    crop: int = 48
    max_std: float = 1.5
    sim_blur: float = 1.0
    other_subject: float = 0.75
    prealign: bool = True
    pose: tuple[float, float, float, float] = (15.0, 0.15, 0.02, 4.0)
    alpha: float = 1e-3
    beta: float = 5e-4
    lr_follower: float = 2e-3
    lambdas: tuple[float, float, float] = (1.0, 10.0, 1.0)
    lambda3_ramp: int = 500
    gra: str = "rank1"
    epsilon: float = 0.01
    integration_steps: int = 5
    stage: str | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrainConfig:
        """Checked settings (unknown keys and bad values raise InputError)."""
        c = config_from_dict(cls, config, "hof training")
        c.check_common("hof training")
        if c.stage is not None:
            raise InputError(f"hof walks through its phases by iteration ('phases'); omit --stage (got {c.stage!r})")
        if c.run not in RUNS:
            raise InputError(f"hof training run must be one of {RUNS}; got {c.run!r}")
        if c.gra not in GRA_MODES:
            raise InputError(f"hof setting 'gra' must be one of {GRA_MODES}; got {c.gra!r}")
        if int(c.size) % 8 or int(c.crop) % 8 or not 16 <= int(c.crop) <= int(c.size):
            raise InputError(f"'size' and 'crop' must be multiples of 8 with 16 <= crop <= size; got {c.size}, {c.crop}")
        c.size, c.crop, c.lambda3_ramp = int(c.size), int(c.crop), int(c.lambda3_ramp)
        if len(c.phases) != 3 or min(int(v) for v in c.phases) < 0:
            raise InputError(f"'phases' must be three iteration counts >= 0 (pretrain, registration, segmentation); got {c.phases}")
        c.phases = tuple(int(v) for v in c.phases)
        c.lambdas = tuple(float(v) for v in c.lambdas)
        if len(c.lambdas) != 3 or min(c.lambdas) < 0:
            raise InputError(f"'lambdas' must be three numbers >= 0; got {c.lambdas}")
        set_probabilities(c, ("other_subject",), "hof setting")
        set_floats(c, ("sim_blur",), "hof setting", positive=False)
        if not isinstance(c.prealign, bool):
            raise InputError(f"hof setting 'prealign' must be true or false; got {c.prealign!r}")
        if len(c.pose) != 4 or min(float(v) for v in c.pose) < 0:
            raise InputError(f"hof setting 'pose' must be four numbers >= 0 (degrees, scale, shear, voxels); got {c.pose}")
        c.pose = tuple(float(v) for v in c.pose)
        for key in ("spacing", "alpha", "lr_follower", "epsilon", "max_std"):
            if not float(getattr(c, key)) > 0:
                raise InputError(f"hof setting '{key}' must be positive; got {getattr(c, key)!r}")
        return c


class HOFTrainer(Trainer):
    """HOF's data, phases and validation (module docstring)."""

    method = "hof"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.name = weight_name(cfg.run)
        self.device = run_device(cfg)
        torch.manual_seed(cfg.seed)
        shape = (cfg.size,) * 3
        maps = bank.synthseg_maps("brain", cfg.spacing, shape)
        self.maps = torch.from_numpy(maps.astype(np.int64)).to(self.device)[:, None]
        self.lookup = torch.from_numpy(codes_to_classes(np.arange(int(maps.max()) + 1))).to(self.device)
        real = [bank.real_scan(p, cfg.spacing, shape) for p in REAL_UNLABELLED]
        self.real = torch.from_numpy(np.stack(real)).to(self.device)[:, None]
        if cfg.prealign:  # pairs as the method's affine stage leaves them (`training.prealign`)
            self.maps = align_maps(self.maps)[0]
            reference = render_t1(self.maps[:1], torch.Generator(device=self.device).manual_seed(cfg.seed))
            self.real = align_scans(self.real, reference, cfg.seed)
        oasis = [bank.real_scan(p, cfg.spacing, shape) for p in OASIS]
        self.oasis = fast_layout(torch.from_numpy(np.stack(oasis)).to(self.device)[:, None], self.device)
        self.deformation = DeformationOptions(max_std=cfg.max_std, factor=2)
        self.net = build_net(cfg.integration_steps).to(self.device)
        self.w_pretrain = [*self.net.encoder.parameters(), *self.net.registration.parameters()]
        self.leader_opt = torch.optim.Adam(self.w_pretrain, lr=cfg.alpha)
        self.follower_opt = torch.optim.Adam(self.net.segmentation.parameters(), lr=cfg.lr_follower)
        held = list(HELD_APART)
        generator = held_apart_generator()
        self.validation = fast_layout(render_t1(self.maps[held].cpu(), generator), self.device)
        self.validation_classes = self.lookup[self.maps[held]]
        self.posed, self.posed_classes = self.validation, self.validation_classes
        if cfg.prealign:  # the segmentation is scored on the held-apart images each in a pose of its own
            pose = affine_to_displacement(random_affine_matrices(shape, generator, len(held), self._pose_ranges()), shape).to(self.device)
            self.posed = fast_layout(warp(self.validation, pose), self.device)
            self.posed_classes = warp(self.validation_classes.float(), pose, mode="nearest").round().long()
        if cfg.run != "full":
            snapshot = checkpoint_dir(cfg.output) / PHASE2_SNAPSHOT
            if not snapshot.exists():
                raise InputError(f"the ablation run {cfg.run!r} starts from {snapshot}: train the full hof run past phase 3 first")
            self.net.load_state_dict(torch.load(snapshot, map_location=self.device, weights_only=True))

    def optimisers(self) -> dict[str, torch.optim.Optimizer]:
        return {"leader": self.leader_opt, "follower": self.follower_opt}

    def _pose_ranges(self) -> AffineRanges:
        return AffineRanges(*self.cfg.pose)

    def _pairs(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A batch as it is trained on: with ``prealign``, the volumes of each pair moved together by one random affine
        (``pose``), so pairs stay aligned to each other while the brains take the poses of real scans, which the
        segmentation must meet."""
        if not self.cfg.prealign:
            return batch
        keys = [k for k in ("x_l", "x_u", "y_l", "y_u") if k in batch]
        shape = batch["x_l"].shape[2:]
        pose = affine_to_displacement(random_affine_matrices(shape, generator, len(batch["x_l"]), self._pose_ranges()), shape)
        return {**batch, **{k: warp(batch[k], pose) for k in keys}}

    def phase(self, n: int) -> str:
        """The phase iteration ``n`` belongs to (ablation runs only refine)."""
        if self.cfg.run != "full":
            return "refine"
        bounds = np.cumsum(self.cfg.phases)
        return PHASES[int(np.searchsorted(bounds, n, side="right"))]

    def _volumes(self, indices: list[int], window: tuple[slice, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank maps ``indices`` cropped to ``window``, deformed and rendered T1-like; and their class maps."""
        labels = deform_labels(self.maps[indices][window], generator, self.deformation)
        return render_t1(labels, generator), self.lookup[labels]

    def _unlabelled(self, indices: list[int], window: tuple[slice, ...], generator: torch.Generator) -> torch.Tensor:
        """Unlabelled volumes: bank maps rendered (labels dropped), or (``index < 0``) the real scans deformed."""
        images = []
        for index in indices:
            if index >= 0:
                images.append(self._volumes([index], window, generator)[0])
            else:
                scan = self.real[[-1 - index]][window]
                images.append(warp(scan, random_deformation(scan.shape[2:], generator, 1, self.deformation)))
        return torch.cat(images)

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        cfg, b = self.cfg, self.cfg.batch_size
        pick = torch.Generator().manual_seed(cfg.seed * 1000003 + n)
        generator = self.generator(n, 1)
        phase = self.phase(n)
        start = [int(torch.randint(cfg.size - cfg.crop + 1, (), generator=pick)) for _ in range(3)]
        window = (slice(None), slice(None), *(slice(a, a + cfg.crop) for a in start))  # crop first: cheaper

        def draw(pool: list[int], count: int) -> list[int]:
            return [pool[int(i)] for i in torch.randint(len(pool), (count,), generator=pick)]

        same = cfg.other_subject < 1 and float(torch.rand((), generator=pick)) >= cfg.other_subject  # same-brain pairs
        if phase == "pretrain":
            pool = [*LABELLED, *UNLABELLED, -1, -2]  # -1, -2: the real scans
            chosen = [pool[int(i)] for i in torch.randperm(len(pool), generator=pick)[: 2 * b]]
            if same:
                chosen[b:] = chosen[:b]
            volumes = self._unlabelled(chosen, window, generator)
            return self._pairs({"x_l": volumes[:b], "x_u": volumes[b:]}, generator)
        labelled = draw(list(LABELLED), b)
        x_l, y_l = self._volumes(labelled, window, generator)
        batch = {"x_l": x_l, "y_l": one_hot(y_l), "gamma": torch.rand((b,), generator=pick).to(self.device)}
        if same:
            batch["x_u"], y_u = self._volumes(labelled, window, generator)
            if phase == "registration":
                batch["y_u"] = one_hot(y_u)
        elif phase == "registration" and float(torch.rand((), generator=pick)) < 0.5:
            batch["x_u"], y_u = self._volumes(draw(list(LABELLED), b), window, generator)
            batch["y_u"] = one_hot(y_u)
        else:
            batch["x_u"] = self._unlabelled(draw([*UNLABELLED, -1, -2], b), window, generator)
        return self._pairs(batch, generator)

    def step(self, batch: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        phase = self.phase(n)
        terms = getattr(self, f"_{phase}")(batch, n)
        return {**terms, "phase": PHASES.index(phase)}

    def _freeze_encoder(self, frozen: bool) -> None:
        self.net.encoder.requires_grad_(not frozen)

    def _pretrain(self, batch: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        self._freeze_encoder(False)
        psi = self.net.register(batch["x_l"], batch["x_u"])
        sim = similarity(smoothed(batch["x_l"], self.cfg.sim_blur), smoothed(batch["x_u"], self.cfg.sim_blur), psi)
        smo = smoothness(psi)
        loss = self.cfg.lambdas[0] * sim + self.cfg.lambdas[1] * smo
        self.leader_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.leader_opt.step()
        return {"loss": loss.item(), "sim": sim.item(), "smo": smo.item()}

    def _registration(self, batch: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        self._freeze_encoder(True)
        with torch.no_grad():
            f_l, f_u = self.net.encoder(batch["x_l"]), self.net.encoder(batch["x_u"])
        psi, psi_inv = self.net.registration(f_l, f_u), self.net.registration(f_u, f_l)
        loss, terms = leader_loss(
            batch["x_l"], batch["x_u"], psi, psi_inv, self.cfg.lambdas, batch["y_l"], batch.get("y_u"), self.cfg.sim_blur
        )
        self.leader_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.leader_opt.step()
        return {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}

    def _segmentation(self, batch: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        self._freeze_encoder(True)
        net = self.net
        with torch.no_grad():
            f_l, f_u = net.encoder(batch["x_l"]), net.encoder(batch["x_u"])
            psi, psi_inv = net.registration(f_l, f_u), net.registration(f_u, f_l)
            x_p, y_p = aaa(batch["x_u"], batch["y_l"], psi, psi_inv, batch["gamma"])  # eq. 3
            f_p = net.encoder(x_p)
        loss = 0.5 * (follower_loss(net.segmentation(f_p), y_p) + follower_loss(net.segmentation(f_l), batch["y_l"]))
        self.follower_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.follower_opt.step()
        return {"loss": loss.item(), "follower": loss.item()}

    def _refine(self, batch: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        cfg = self.cfg
        unfrozen = cfg.run == "unfrozen"
        self._freeze_encoder(not unfrozen)
        refined = n - sum(cfg.phases) if cfg.run == "full" else n
        ramp = min(1.0, (refined + 1) / max(cfg.lambda3_ramp, 1))
        lambda3 = 0.0 if cfg.run == "no_feedback" else cfg.lambdas[2] * ramp
        lambdas = (cfg.lambdas[0], cfg.lambdas[1], lambda3)
        leader, follower, terms = bilevel_losses(
            self.net, batch["x_l"], batch["y_l"], batch["x_u"], batch["gamma"], lambdas,
            use_aaa=cfg.run != "no_aaa", encoder_grad=unfrozen, sim_blur=cfg.sim_blur,
        )
        w = list(self.net.registration.parameters()) + (list(self.net.encoder.parameters()) if unfrozen else [])
        theta = list(self.net.segmentation.parameters())
        mode = "first_order" if cfg.run in ("no_gra", "no_feedback") else cfg.gra
        result = hypergradient(leader, follower, w, theta, cfg.beta, mode=mode, epsilon=cfg.epsilon)
        self.leader_opt.zero_grad(set_to_none=True)
        self.follower_opt.zero_grad(set_to_none=True)
        for parameter, grad in zip(w, result.leader_grads):
            parameter.grad = grad
        for parameter, grad in zip(theta, result.follower_grads):
            parameter.grad = grad
        self.leader_opt.step()  # Algorithm 1, line 12
        self.follower_opt.step()
        if cfg.run == "full" and refined == 0:
            torch.save(self.net.state_dict(), checkpoint_dir(cfg.output) / PHASE2_SNAPSHOT)
        return {
            "loss": result.leader_loss, "follower": result.follower_loss, "lambda3": lambda3,
            **{k: v.item() for k, v in terms.items()}, **result.details,
        }

    def validate(self) -> dict[str, float]:
        net, images, truth = self.net, self.validation, self.validation_classes
        labels = list(range(1, N_CLASSES))
        method = defaults("hof")  # scored as the method runs by default (options mirror and symmetric)
        predicted = class_probabilities(net, self.posed, method["mirror"]).argmax(dim=1, keepdim=True)
        following = torch.roll(images, -1, dims=0)
        psi = net.register(following, images, symmetric=method["symmetric"])
        warped = warp(torch.roll(truth, -1, dims=0).float(), psi, mode="nearest").long()
        count = len(images)
        psi_oasis = net.register(self.oasis.flip(0), self.oasis, symmetric=method["symmetric"])
        warped_oasis = warp(self.oasis.flip(0), psi_oasis)
        scores = {
            "seg_dice": float(np.mean([dice_present(self.posed_classes[k], predicted[k], labels) for k in range(count)])),
            "reg_dice": float(np.mean([dice_present(truth[k], warped[k], labels) for k in range(count)])),
            "identity_dice": float(np.mean([dice_present(truth[k], torch.roll(truth, -1, dims=0)[k], labels) for k in range(count)])),
            "oasis_ncc": float(np.mean([ncc(image_array(self.oasis[k]), image_array(warped_oasis[k])) for k in range(2)])),
            "identity_oasis_ncc": ncc(image_array(self.oasis[0]), image_array(self.oasis[1])),
        }
        scores["score"] = with_real_pair(0.5 * (scores["seg_dice"] + scores["reg_dice"]), scores["oasis_ncc"], scores["identity_oasis_ncc"])
        return scores

    def describe(self) -> dict[str, Any]:
        return {
            "run": self.cfg.run,
            "phases": dict(zip(PHASES[:3], self.cfg.phases)),
            "data": "few-shot: SynthSeg label maps 1-4 of ../shared/data/synthseg_labelmaps with labels, maps 5-16 and "
            f"the two MNI152 2009 T1 scans without; brain only, {self.cfg.spacing:g} mm grid {self.cfg.size}^3, deformed "
            f"and rendered T1-like at every iteration, {self.cfg.crop}^3 crops; in {1 - self.cfg.other_subject:.0%} of the "
            "batches each map is paired with itself, drawn afresh (same-brain pairs)"
            + ("; every volume affinely pre-aligned to the maps' mean shape (training.prealign)" if self.cfg.prealign else ""),
            "validation_set": "SynthSeg maps 17-20 (fixed T1-like renderings) and the two OASIS scans",
        }


def make_trainer(config: dict[str, Any]) -> HOFTrainer:
    """The hof trainer for ``config`` (`TrainConfig` keys)."""
    return HOFTrainer(TrainConfig.from_dict(dict(config)))
