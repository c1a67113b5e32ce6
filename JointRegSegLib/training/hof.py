"""Training of HOF (seed 000): data, losses (eq. 4-6), AAA (eq. 2-3) and the three phases of section 3.5.

``train(config, progress)`` runs one stage of one run (``run`` names the variant):

1. ``stage="pretrain"`` (section 3.5, "pretraining phase"; section 4.1: "similarity loss and
   smoothness loss"): the shared encoder and the registration decoder learn registration of
   random pairs of ALL training volumes (labelled and unlabelled), ``sim + lambda2 smo``;
   afterwards the encoder is frozen (every later stage; run ``unfrozen`` unfreezes it again);
2. ``stage="registration"`` (decoder training, first half): the registration decoder alone with
   the leader loss eq. 4; the Dice term uses the GROUND-TRUTH labels where both volumes of the
   pair are labelled (the segmentation decoder is not trained yet) and is left out otherwise;
3. ``stage="segmentation"`` (decoder training, second half): the segmentation decoder alone with
   the follower loss eq. 6 on AAA pseudo-pairs ``(x_p, y_p)`` and on the labelled volumes;
4. ``stage="refine"`` (iterative refinement): Algorithm 1 - both decoders together, the
   follower by its own gradient, the leader by the GRA hypergradient (`training.gra`).

Runs (Table 3 ablations; every run shares stages 1-3 of run ``full`` and differs in stage 4 only,
which is what a 2-core CPU affords): ``full``; ``no_aaa`` (the follower sees only the labelled
volumes: no pseudo-labelled data, so its loss no longer depends on ``w``); ``no_gra`` (first-order
alternation: the leader uses ``grad_w Phi_r(w, theta)``); ``no_feedback`` (``lambda3 = 0``: the
leader loss has no segmentation term, hence no coupling); ``unfrozen`` (the encoder joins the
leader's parameters ``w``).

Losses (ours where the paper is silent):

- ``sim`` (eq. 5) is the mean squared difference ``x_l - x_u o psi^-1``; we add the symmetric
  term ``x_u - x_l o psi`` (both fields are predicted and both are used by AAA) and average;
- ``smo`` is `losses.gradient_l2` of both fields expressed in grid_sample's NORMALISED
  coordinates (channel c scaled by 2 / (N_c - 1)): with voxel units the paper's lambda2 = 10 would
  leave no deformation against an MSE on [0, 1] intensities, while in normalised units it weighs
  like VoxelMorph's 0.01-0.02 per voxel gradient at these sizes;
- ``Dice`` (the segmentation feedback of eq. 4) is the soft Dice between the labelled volume's
  one-hot labels warped into the unlabelled volume, ``y_l o psi``, and the follower's softmax on the
  unlabelled volume; background excluded (`losses.soft_dice_loss`);
- follower loss eq. 6: soft Dice of the softmax against ``y_p`` (pseudo-pair) and against ``y_l``
  (the labelled volume itself), averaged;
- AAA eq. 3: ``x_p = gamma x_u o psi^-1 o psi + (1 - gamma) x_u`` with ``gamma ~ U(0, 1)`` per
  pair, ``y_p = y_l o psi`` (trilinear warp of the one-hot labels: soft pseudo-labels); both keep
  their graph to ``w`` (the follower loss depends on the leader through them: this is what the
  mixed second-order term of GRA differentiates);
- lambdas (1, 10, 1) and learning rates alpha = 1e-3 (leader, Adam), beta = 5e-4 (the unrolled
  follower step of Algorithm 1, line 9, plain gradient step) from section 4.1; the follower's own
  update is Adam with ``lr_follower`` (2e-3: hundreds, not tens of thousands, of iterations);
  batch 1 pair (paper: 4) for the CPU.

Data (`build_data`; the paper's data sets are not available): volumes on a 3 mm RAS+ grid of
64^3 (192 mm, a whole brain), crops of ``crop`` per iteration (48^3; 32^3 in the refine stage,
whose bi-level iteration costs about four ordinary ones), the same crop of both volumes of a pair:

- labelled (few-shot): 4 SynthSeg label maps (training_seg_01-04, extra-cerebral classes removed)
  rendered with a T1-like contrast (`T1_MEANS`, each mean jittered by +-10 %, noise, blur, bias,
  gamma); there are no labelled real scans to spare: the real labelled ones are the benchmark
  pair (and fs_subject is the pair's moving subject);
- unlabelled: the 4 real T1 scans of ../shared/data that are not in the benchmark pair (oasis
  0001 and 0075, the two MNI152 2009 T1 renderings) and 12 SynthSeg maps (05-16) rendered T1-like
  with their labels discarded; FLAIR is left out (eq. 5 is an MSE, single-contrast);
- held apart (never trained on): SynthSeg maps 17-20 rendered T1-like, with labels, for the
  held-apart segmentation and registration Dice.

Segmentation classes: background plus the 28 of the 30 evaluation structures that the SynthSeg
maps contain (`HOF_LABELS`; the choroid plexus, 31 and 63, is absent from them); other codes count
as background.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import functional_call
from torch.nn import functional as F

from ..data_paths import shared_data_dir
from ..errors import InputError
from ..imageio.intensity import normalise_intensity
from ..imageio.io import read_image
from ..imageio.network_grid import network_geometry, to_network
from ..labels import EVALUATION_LABELS
from ..losses import gradient_l2, soft_dice_loss
from ..metrics import dice_per_label
from ..nets.hof import HOFNet
from ..spatial import warp
from ..synth import RenderOptions, load_synthseg_maps, render_image
from ..weights import record_weights
from .common import (
    atomic_torch_save,
    check_time_limit,
    config_from_dict,
    plot_running_mean,
    pyplot,
    read_history,
    resume_checkpoint,
    run_device,
    run_files,
    run_provenance,
    save_figure,
    save_progress,
    settings_from_argv,
)
from .gra import MODES as GRA_MODES
from .gra import hypergradient

STAGES = ("pretrain", "registration", "segmentation", "refine")
RUNS = ("full", "no_aaa", "no_gra", "no_feedback", "unfrozen")
HOF_LABELS: tuple[int, ...] = tuple(code for code in EVALUATION_LABELS if code not in (31, 63))
N_CLASSES = len(HOF_LABELS) + 1
CROP = 48
REFINE_CROP = 32
PLOT_NAME = "hof_training.png"
PHASE2_NAME = "hof_phase2"

# T1-weighted mean intensities (0-255) per FreeSurfer code for rendering the labelled maps; codes
# not listed get 100 (ours, from typical T1 contrast: WM bright, GM mid, CSF dark).
T1_MEANS: dict[int, float] = {
    2: 210, 41: 210, 7: 200, 46: 200, 16: 185, 28: 175, 60: 175, 85: 190, 77: 170,
    3: 120, 42: 120, 8: 130, 47: 130, 17: 120, 53: 120, 18: 125, 54: 125, 26: 135, 58: 135,
    10: 170, 49: 170, 11: 135, 50: 135, 12: 150, 51: 150, 13: 180, 52: 180, 25: 120, 57: 120,
    4: 35, 43: 35, 5: 40, 44: 40, 14: 35, 15: 35, 24: 35, 72: 35, 136: 35, 137: 35, 163: 40, 164: 40,
    30: 110, 62: 110, 80: 110,
}


def weight_name(run: str) -> str:
    """Manifest name of a run's weights: ``hof`` for the full method, ``hof_<run>`` for an ablation."""
    return "hof" if run == "full" else f"hof_{run}"


def class_lookup(max_code: int) -> np.ndarray:
    """Array mapping a FreeSurfer code (0..max_code) to its HOF class (0 = background)."""
    lut = np.zeros(max(max_code, max(HOF_LABELS)) + 1, dtype=np.int64)
    for index, code in enumerate(HOF_LABELS, start=1):
        lut[code] = index
    return lut


def codes_to_classes(codes: np.ndarray) -> np.ndarray:
    """FreeSurfer label map -> HOF class map (codes outside `HOF_LABELS` become 0)."""
    codes = np.asarray(codes).astype(np.int64)
    if codes.min() < 0:
        raise InputError("label maps must hold non-negative FreeSurfer codes")
    return class_lookup(int(codes.max()))[codes]


def classes_to_codes(classes: np.ndarray) -> np.ndarray:
    """HOF class map -> FreeSurfer codes (`labels.py` codes; 0 stays background)."""
    table = np.asarray((0, *HOF_LABELS), dtype=np.int16)
    return table[np.asarray(classes, dtype=np.int64)]


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


def leader_loss(
    x_l: torch.Tensor,
    x_u: torch.Tensor,
    psi: torch.Tensor,
    psi_inv: torch.Tensor,
    lambdas: tuple[float, float, float],
    y_l: torch.Tensor | None = None,
    target_u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``Phi_r`` of eq. 4-5 for ``psi`` (l -> u, on u's grid) and ``psi_inv`` (u -> l, on l's grid).

    ``y_l``: one-hot labels of ``x_l``; ``target_u``: probabilities (the follower's softmax, or
    ground truth) on ``x_u``. The Dice term is included when both are given and lambda3 > 0.
    """
    sim = 0.5 * (F.mse_loss(warp(x_u, psi_inv), x_l) + F.mse_loss(warp(x_l, psi), x_u))  # eq. 5 (+ symmetric)
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


def follower_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``Phi_s`` of eq. 6: soft Dice of the softmax against (soft) one-hot ``target``, background excluded."""
    return soft_dice_loss(torch.softmax(logits, dim=1), target)


def bilevel_losses(
    net: HOFNet,
    x_l: torch.Tensor,
    y_l: torch.Tensor,
    x_u: torch.Tensor,
    gamma: torch.Tensor,
    lambdas: tuple[float, float, float],
    use_aaa: bool = True,
    encoder_grad: bool = False,
) -> tuple[Callable[[list[torch.Tensor]], torch.Tensor], Callable[[list[torch.Tensor]], torch.Tensor], dict[str, torch.Tensor]]:
    """Leader ``Phi_r(w, theta)`` and follower ``Phi_s(theta, w)`` of one labelled/unlabelled pair, as closures of theta.

    Runs the ``w``-dependent part once (Algorithm 1, lines 3-6: both fields, AAA, the pseudo-pair's
    features); the closures evaluate the segmentation decoder with the given parameters (in the
    order of ``net.segmentation.parameters()``). ``terms`` receives the leader's loss terms.
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
        own = follower_dice(segment(theta, f_l), y_l)
        if not use_aaa:
            return own
        return 0.5 * (follower_dice(segment(theta, f_p), y_p) + own)

    terms: dict[str, torch.Tensor] = {}

    def leader(theta: list[torch.Tensor]) -> torch.Tensor:  # Phi_r, eq. 4
        probs = torch.softmax(segment(theta, f_u), dim=1) if lambdas[2] > 0 else None
        loss, parts = leader_loss(x_l, x_u, psi, psi_inv, lambdas, y_l, probs)
        terms.update(parts)
        return loss

    return leader, follower, terms


# ------------------------------------------------------------------------------------------- data


@dataclass
class HOFData:
    """Training and held-apart volumes on the 3 mm grid, tensors ``(N, 1, S, S, S)``."""

    labelled: torch.Tensor
    labelled_classes: torch.Tensor
    unlabelled: torch.Tensor
    heldout: torch.Tensor
    heldout_classes: torch.Tensor
    description: dict[str, Any]


REAL_UNLABELLED = (
    "oasis_unlabelled/OASIS_0001_0000.nii.gz",
    "oasis_unlabelled/OASIS_0075_0000.nii.gz",
    "mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "mni152/MNI152_2009_template.nii.gz",
)


def render_t1(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """T1-like image in [0, 1] of label maps ``(B, 1, I, J, K)`` (`T1_MEANS` jittered by +-10 %)."""
    generator = torch.Generator().manual_seed(seed)
    n_codes = int(labels.max()) + 1
    base = torch.full((n_codes,), 100.0)
    base[0] = 0.0
    for code, value in T1_MEANS.items():
        if code < n_codes:
            base[code] = value
    batch = labels.shape[0]
    means = base[None] * (0.9 + 0.2 * torch.rand((batch, n_codes), generator=generator))
    stds = 3.0 + 5.0 * torch.rand((batch, n_codes), generator=generator)
    images = render_image(labels, generator, RenderOptions(max_blur=0.7, gamma_std=0.1), means=means, stds=stds)
    return torch.stack([torch.from_numpy(normalise_intensity(im[0].numpy())) for im in images])[:, None]


def build_data(root: Path, spacing: float, size: int, seed: int) -> HOFData:
    """The few-shot data set of the module docstring."""
    maps_folder = root / "synthseg_labelmaps"
    if not maps_folder.is_dir():
        raise InputError(f"the SynthSeg label maps are missing: {maps_folder}; set JRS_SHARED_DATA to ../shared/data")
    maps = load_synthseg_maps(maps_folder, (size,) * 3, spacing=spacing, drop_extracerebral=True, orientation="RAS")
    if maps.shape[0] < 20:
        raise InputError(f"HOF training expects the 20 SynthSeg label maps in {maps_folder}; found {maps.shape[0]}")
    labels = torch.from_numpy(np.array(maps, dtype=np.int64))[:, None]
    images = render_t1(labels, seed)
    classes = torch.from_numpy(codes_to_classes(labels.numpy()))
    real = []
    for relative in REAL_UNLABELLED:
        volume = read_image(root / relative)
        grid = network_geometry(volume.geometry, spacing=spacing, shape=(size,) * 3)
        real.append(torch.from_numpy(normalise_intensity(to_network(volume, grid)))[None])
    return HOFData(
        labelled=images[:4],
        labelled_classes=classes[:4],
        unlabelled=torch.cat([torch.stack(real), images[4:16]]),
        heldout=images[16:20],
        heldout_classes=classes[16:20],
        description={
            "labelled": "4 SynthSeg label maps (training_seg_01-04) rendered T1-like, with labels",
            "unlabelled": f"4 real T1 scans ({', '.join(REAL_UNLABELLED)}) and 12 SynthSeg maps (05-16) rendered "
            "T1-like, labels discarded",
            "heldout": "4 SynthSeg maps (17-20) rendered T1-like, with labels; never trained on",
            "grid": f"{size}^3 at {spacing} mm, RAS+",
        },
    )


def load_data(root: Path, cache: Path, spacing: float, size: int, seed: int) -> HOFData:
    """`build_data`, cached in ``cache`` (a gitignored checkpoint folder)."""
    path = cache / f"hof_data_{spacing:g}mm_{size}_{seed}.pt"
    if path.exists():
        stored = torch.load(path, weights_only=True)
        return HOFData(**stored)
    data = build_data(root, spacing, size, seed)
    atomic_torch_save(asdict(data), path)
    return data


def random_crop(volumes: list[torch.Tensor], crop: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The same random ``crop^3`` window of every volume ``(B, C, S, S, S)``."""
    size = volumes[0].shape[2:]
    start = [int(torch.randint(s - crop + 1, (), generator=generator)) for s in size]
    window = tuple(slice(a, a + crop) for a in start)
    return [v[(slice(None), slice(None), *window)] for v in volumes]


# ------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_heldout(net: HOFNet, data: HOFData) -> dict[str, float]:
    """Segmentation Dice (each held-apart volume) and registration Dice (pairs i -> i+1) on the 3 mm grid.

    Means over the structures present in both label maps (FreeSurfer codes of `HOF_LABELS`).
    """
    net.eval()
    seg_dice, reg_dice, initial = [], [], []
    n = data.heldout.shape[0]
    for i in range(n):
        image, truth = data.heldout[i:i + 1], data.heldout_classes[i:i + 1]
        predicted = net.segment(image).argmax(dim=1, keepdim=True)
        seg_dice.append(_mean_dice(truth, predicted))
        j = (i + 1) % n
        psi = net.register(data.heldout[j:j + 1], image)
        warped = warp(data.heldout_classes[j:j + 1].float(), psi, mode="nearest").long()
        reg_dice.append(_mean_dice(truth, warped))
        initial.append(_mean_dice(truth, data.heldout_classes[j:j + 1]))
    return {
        "heldout_seg_dice": float(np.mean(seg_dice)),
        "heldout_reg_dice": float(np.mean(reg_dice)),
        "heldout_reg_dice_initial": float(np.mean(initial)),
    }


def _mean_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    truth = a[0, 0].numpy()
    labels = [c for c in range(1, N_CLASSES) if (truth == c).any()]
    scores = dice_per_label(truth, b[0, 0].numpy(), labels=labels)
    return float(np.mean([scores.get(c, 0.0) for c in labels]))


# --------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Settings of one stage of one run (see the module docstring)."""

    stage: str = "pretrain"
    run: str = "full"
    iterations: int = 100000
    time_limit: float | None = None
    spacing: float = 3.0
    size: int = 64
    crop: int | None = None
    alpha: float = 1e-3
    beta: float = 5e-4
    lr_follower: float = 2e-3
    lambdas: tuple[float, float, float] = (1.0, 10.0, 1.0)
    gra: str = "finite_difference"
    epsilon: float = 0.01
    integration_steps: int = 5
    seed: int = 0
    data: str | None = None
    output: str | None = None
    resume: bool = True
    save_every: int = 20
    device: str = "cpu"
    threads: int | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrainConfig:
        """Checked settings (unknown keys and bad values raise InputError)."""
        c = config_from_dict(cls, config, "hof training")
        if c.stage not in STAGES:
            raise InputError(f"hof training stage must be one of {STAGES}; got {c.stage!r}")
        if c.run not in RUNS:
            raise InputError(f"hof training run must be one of {RUNS}; got {c.run!r}")
        if c.run != "full" and c.stage != "refine":
            raise InputError(f"the ablation run {c.run!r} only has the 'refine' stage (it branches from run 'full')")
        if c.gra not in GRA_MODES:
            raise InputError(f"hof setting 'gra' must be one of {GRA_MODES}; got {c.gra!r}")
        if c.crop is None:
            c.crop = REFINE_CROP if c.stage == "refine" else CROP
        if int(c.size) % 8 or int(c.crop) % 8 or not 16 <= int(c.crop) <= int(c.size):
            raise InputError(f"'size' and 'crop' must be multiples of 8 with 16 <= crop <= size; got {c.size}, {c.crop}")
        c.size, c.crop, c.iterations, c.save_every = int(c.size), int(c.crop), int(c.iterations), int(c.save_every)
        c.lambdas = tuple(float(v) for v in c.lambdas)
        if len(c.lambdas) != 3 or min(c.lambdas) < 0:
            raise InputError(f"'lambdas' must be three numbers >= 0; got {c.lambdas}")
        for key in ("spacing", "alpha", "lr_follower", "epsilon"):
            if not float(getattr(c, key)) > 0:
                raise InputError(f"hof setting '{key}' must be positive; got {getattr(c, key)!r}")
        check_time_limit(c.time_limit)
        return c


def _checkpoint_name(run: str, stage: str) -> str:
    return f"hof_{run}_{stage}"


def _parent(run: str, stage: str) -> tuple[str, str] | None:
    """The (run, stage) whose final model a stage starts from."""
    if stage == "pretrain":
        return None
    return "full", STAGES[STAGES.index(stage) - 1]


def build_net(integration_steps: int = 5) -> HOFNet:
    """The HOF network used by the method and the training (`nets.hof`)."""
    return HOFNet(N_CLASSES, integration_steps=integration_steps)


def plot_curves(folder: Path) -> Path | None:
    """Loss curves of every run's CSV in ``folder`` (one panel per stage), as ``hof_training.png``."""
    plt = pyplot()
    histories = {run: read_history(folder / f"{weight_name(run)}_loss.csv") for run in RUNS}
    histories = {k: v for k, v in histories.items() if v}
    if not histories:
        return None
    figure, axes = plt.subplots(1, len(STAGES), figsize=(5 * len(STAGES), 4))
    for axis, stage in zip(axes, STAGES):
        for run, rows in histories.items():
            values = np.asarray([float(r["loss"]) for r in rows if r["stage"] == stage])
            if values.size == 0:
                continue
            plot_running_mean(axis, np.arange(1, values.size + 1), values, run, window=15, raw=False)
        axis.set_title(f"hof {stage}")
        axis.set_xlabel("iteration")
        axis.set_ylabel("loss (15-iteration running mean)")
        axis.grid(alpha=0.3)
        if axis.get_lines():
            axis.legend()
    return save_figure(figure, folder / PLOT_NAME, dpi=80)


class _Stage:
    """Model, optimisers and one iteration of each stage."""

    def __init__(self, cfg: TrainConfig, net: HOFNet, data: HOFData) -> None:
        self.cfg, self.net, self.data = cfg, net, data
        frozen = cfg.stage != "pretrain" and cfg.run != "unfrozen"
        self.net.encoder.requires_grad_(not frozen)
        leader = list(net.registration.parameters())
        if cfg.stage == "pretrain" or cfg.run == "unfrozen":
            leader += list(net.encoder.parameters())
        self.w = leader
        self.theta = list(net.segmentation.parameters())
        self.leader_opt = torch.optim.Adam(self.w, lr=cfg.alpha)
        self.follower_opt = torch.optim.Adam(self.theta, lr=cfg.lr_follower)

    def state(self) -> dict[str, Any]:
        return {"leader": self.leader_opt.state_dict(), "follower": self.follower_opt.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.leader_opt.load_state_dict(state["leader"])
        self.follower_opt.load_state_dict(state["follower"])

    def _sample(self, n: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 1000003 + STAGES.index(self.cfg.stage) * 100003 + n)

    def step(self, n: int) -> dict[str, float]:
        generator = self._sample(n)
        return getattr(self, f"_{self.cfg.stage}")(generator)

    def _pick(self, pool: torch.Tensor, generator: torch.Generator, exclude: int | None = None) -> int:
        while True:
            index = int(torch.randint(pool.shape[0], (), generator=generator))
            if index != exclude:
                return index

    def _pretrain(self, generator: torch.Generator) -> dict[str, float]:
        pool = torch.cat([self.data.labelled, self.data.unlabelled])
        a = self._pick(pool, generator)
        b = self._pick(pool, generator, exclude=a)
        moving, fixed = random_crop([pool[a:a + 1], pool[b:b + 1]], self.cfg.crop, generator)
        psi = self.net.register(moving, fixed)
        sim = F.mse_loss(warp(moving, psi), fixed)
        smo = smoothness(psi)
        loss = self.cfg.lambdas[0] * sim + self.cfg.lambdas[1] * smo
        self.leader_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.leader_opt.step()
        return {"loss": loss.item(), "sim": sim.item(), "smo": smo.item()}

    def _registration(self, generator: torch.Generator) -> dict[str, float]:
        d = self.data
        a = self._pick(d.labelled, generator)
        use_labelled = bool(torch.rand((), generator=generator) < 0.5)
        if use_labelled:
            b = self._pick(d.labelled, generator, exclude=a)
            x_l, y_l, x_u, y_u = random_crop(
                [d.labelled[a:a + 1], d.labelled_classes[a:a + 1], d.labelled[b:b + 1], d.labelled_classes[b:b + 1]],
                self.cfg.crop, generator,
            )
            target = one_hot(y_u)
        else:
            b = self._pick(d.unlabelled, generator)
            x_l, y_l, x_u = random_crop(
                [d.labelled[a:a + 1], d.labelled_classes[a:a + 1], d.unlabelled[b:b + 1]], self.cfg.crop, generator
            )
            target = None
        with torch.no_grad():
            f_l, f_u = self.net.encoder(x_l), self.net.encoder(x_u)
        psi, psi_inv = self.net.registration(f_l, f_u), self.net.registration(f_u, f_l)
        loss, terms = leader_loss(x_l, x_u, psi, psi_inv, self.cfg.lambdas, one_hot(y_l), target)
        self.leader_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.leader_opt.step()
        return {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}}

    def _pair(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.data
        a, b = self._pick(d.labelled, generator), self._pick(d.unlabelled, generator)
        x_l, y_l, x_u = random_crop(
            [d.labelled[a:a + 1], d.labelled_classes[a:a + 1], d.unlabelled[b:b + 1]], self.cfg.crop, generator
        )
        gamma = torch.rand((1,), generator=generator)
        return x_l, one_hot(y_l), x_u, gamma

    def _segmentation(self, generator: torch.Generator) -> dict[str, float]:
        x_l, y_l, x_u, gamma = self._pair(generator)
        with torch.no_grad():
            f_l, f_u = self.net.encoder(x_l), self.net.encoder(x_u)
            psi, psi_inv = self.net.registration(f_l, f_u), self.net.registration(f_u, f_l)
            x_p, y_p = aaa(x_u, y_l, psi, psi_inv, gamma)  # eq. 3
            f_p = self.net.encoder(x_p)
        loss = 0.5 * (follower_dice(self.net.segmentation(f_p), y_p) + follower_dice(self.net.segmentation(f_l), y_l))
        self.follower_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.follower_opt.step()
        return {"loss": loss.item(), "gamma": float(gamma)}

    def _refine(self, generator: torch.Generator) -> dict[str, float]:
        cfg = self.cfg
        x_l, y_l, x_u, gamma = self._pair(generator)
        lambdas = (cfg.lambdas[0], cfg.lambdas[1], 0.0 if cfg.run == "no_feedback" else cfg.lambdas[2])
        leader, follower, terms = bilevel_losses(
            self.net, x_l, y_l, x_u, gamma, lambdas, use_aaa=cfg.run != "no_aaa", encoder_grad=cfg.run == "unfrozen"
        )
        mode = "first_order" if cfg.run in ("no_gra", "no_feedback") else cfg.gra
        result = hypergradient(leader, follower, self.w, self.theta, cfg.beta, mode=mode, epsilon=cfg.epsilon)
        for parameter, grad in zip(self.w, result.leader_grads):
            parameter.grad = grad
        for parameter, grad in zip(self.theta, result.follower_grads):
            parameter.grad = grad
        self.leader_opt.step()  # Algorithm 1, line 12
        self.follower_opt.step()
        return {
            "loss": result.leader_loss,
            "follower": result.follower_loss,
            **{k: v.item() for k, v in terms.items()},
            **result.details,
        }


def train(config: dict[str, Any], progress: Any = None) -> dict[str, Any]:
    """Run one stage of one HOF run (module docstring); resumable; returns a summary."""
    cfg = TrainConfig.from_dict(dict(config))
    device = run_device(cfg)
    if device.type != "cpu":
        raise InputError("hof training runs on the CPU in this release (its data are kept as CPU tensors)")
    name = weight_name(cfg.run)
    files = run_files(cfg.output, name, _checkpoint_name(cfg.run, cfg.stage))
    output = files.folder
    root = Path(cfg.data) if cfg.data else shared_data_dir()
    data = load_data(root, output / "checkpoints", cfg.spacing, cfg.size, cfg.seed)

    torch.manual_seed(cfg.seed)
    net = build_net(cfg.integration_steps)
    parent = _parent(cfg.run, cfg.stage)
    start, wall_before = 0, 0.0
    resumed = cfg.resume and files.checkpoint.exists()
    if resumed:
        checkpoint, start, wall_before = resume_checkpoint(files.checkpoint, net)
    elif parent is not None:
        parent_path = output / "checkpoints" / f"{_checkpoint_name(*parent)}.pt"
        if not parent_path.exists():
            raise InputError(f"stage {cfg.stage!r} starts from {parent_path}; run stage {parent[1]!r} of run 'full' first")
        net.load_state_dict(torch.load(parent_path, weights_only=True)["model"])
    stage = _Stage(cfg, net, data)
    if resumed:
        stage.load_state(checkpoint["optimisers"])
    history = [row for row in read_history(files.history) if row["stage"] != cfg.stage or int(row["iteration"]) <= start]
    run_start = time.perf_counter()

    def save(iteration: int) -> str:
        wall = wall_before + time.perf_counter() - run_start
        save_progress(net, {"optimisers": stage.state()}, iteration, wall, history, files)
        stages_done = {}
        for s in STAGES:
            rows = [r for r in history if r["stage"] == s]
            if rows:
                stages_done[s] = int(rows[-1]["iteration"])
        provenance = {
            "method": "hof",
            "run": cfg.run,
            "stage": cfg.stage,
            "stages_iterations": stages_done,
            "data": data.description,
            **run_provenance(cfg, device),
            "iterations": iteration,
            "seed": cfg.seed,
            "wall_seconds_this_stage": round(wall, 1),
        }
        checksum = record_weights(name, files.weights, provenance)
        if cfg.stage == "segmentation":  # the decoders before refinement: the "no refine phase" row
            atomic_torch_save(net.state_dict(), output / f"{PHASE2_NAME}.pt")
            record_weights(PHASE2_NAME, output / f"{PHASE2_NAME}.pt", provenance)
        plot_curves(output)
        return checksum

    completed, stopped_by, checksum = start, "iterations", None
    net.train()
    while completed < cfg.iterations:
        if cfg.time_limit is not None and time.perf_counter() - run_start >= cfg.time_limit:
            stopped_by = "time limit"
            break
        tick = time.perf_counter()
        terms = stage.step(completed)
        completed += 1
        history.append({"stage": cfg.stage, "iteration": completed, **terms, "seconds": round(time.perf_counter() - tick, 3)})
        if completed % cfg.save_every == 0:
            checksum = save(completed)
            print(json.dumps({"stage": cfg.stage, "run": cfg.run, **history[-1]}), flush=True)
        if progress is not None:
            progress(completed / max(cfg.iterations, 1), cfg.stage)
    checksum = save(completed)
    summary = {
        "run": cfg.run,
        "stage": cfg.stage,
        "weights": str(files.weights),
        "sha256": checksum,
        "iterations": completed,
        "stopped_by": stopped_by,
        "wall_seconds": round(wall_before + time.perf_counter() - run_start, 1),
        **evaluate_heldout(net, data),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m JointRegSegLib.training.hof KEY=JSON ...``: entry point for background runs.

    Example: ``python -m JointRegSegLib.training.hof stage=pretrain time_limit=330 threads=1``.
    """
    print(json.dumps(train(settings_from_argv(argv)), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
