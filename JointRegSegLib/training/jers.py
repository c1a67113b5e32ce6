"""Training of JERS (seed 003) on synthetic raw heads and one labelled atlas.

Data (ours: the paper trains on real raw scans, which ../shared/data does not have):

- raw heads are rendered from the SynthSeg whole-head label maps (skull, scalp, eyes included,
  codes >= 500), resampled (mode pooling, `synth.load_synthseg_maps`) to the network grid: 64^3 at
  3 mm, RAS+ (the orientation of the method's network grid), centred on each brain (`head_maps`).
  Maps ``1 .. train_maps`` (file order, default the first 16) train; the others are held apart for
  evaluation (`heldout_heads`);
- each iteration draws one map, a random affine about the grid centre (rotation U(-10, 10) degrees
  per axis, scale 1 + U(-0.1, 0.1), shear U(-0.02, 0.02), translation U(-4, 4) voxels; labels moved by
  nearest-neighbour sampling), and a T1-like rendering (`render_head`): white matter brightest,
  grey matter darker, CSF darkest, random brightness per extra-cerebral class, noise, blur, bias
  field and gamma (`synth.render.render_image` with drawn means);
- the brain labels are NOT used for training (the method is one-shot): only the atlas image and its
  labels supervise. `brain_mask_of` / `tissue_of` give the ground truth for evaluation only.

Loss (eq. 9-12): ``L = L_sim(W^N, T) + lambda_seg CE(R, V) + eta sum_j R(M^j)`` with

- ``L_sim`` the local squared NCC ``-mean(cc^2)`` (`losses.lncc_loss`), window ``window`` voxels
  (default 7 = 21 mm at 3 mm; the paper's window is not stated);
- ``CE`` the cross-entropy of the segmentation logits against the soft targets ``V`` (one-hot
  atlas labels warped trilinearly by ``(A_c^N)^{-1}``, eq. 7; where the inverse warp samples outside
  the atlas grid, the missing probability goes to background). Deviation: by default the CE term
  does NOT back-propagate into the registration (``seg_to_registration=false``): with the paper's
  coupling, our first run collapsed within 25 iterations (CE fell from 1.0 to 0.02 while the NCC
  got worse: the affine moved the atlas labels out of the raw image's view, so ``V`` became all
  background, which an untrained segmentation network matches trivially; with ``lambda = 0.1`` the
  CE term outweighs the NCC term, about -0.05, early in training). ``seg_to_registration=true``
  restores the paper's coupling;
- ``R(M^j)`` the squared forward differences of the stage mask, averaged over voxels and axes (eq. 12
  sums over voxels; the mean keeps ``eta = 1`` on the same scale as the other terms at any grid size);
- ``lambda_seg = 0.1``, ``eta = 1`` (appendix A.3), slope ``k = 10``.

Budget choices (2 shared CPU cores, one thread): small networks (`nets.jers`; the extraction U-Net
runs at half resolution), ``M = N = 5`` stages as in the paper, Adam ``lr`` 1e-3, batch 1. Ablations (Table 3): ``extraction=false`` (mask of ones, the w/o-Ext variant) and
``lambda_seg=0`` (no segmentation loss); the w/o-Seg variant of the paper (the atlas labels warped
into the raw space instead of a segmentation network) needs no training (method option
``segmentation="atlas"``).

Outputs (in ``output``, default Resources/weights): ``<name>.pt`` (state dict of `nets.jers.JERS`,
recorded in the manifest with provenance), ``<name>_loss.csv``, ``<name>_training.png``; a resumable
checkpoint in ``output/checkpoints/<name>.pt`` every ``save_every`` iterations; ``snapshot_at``
iterations also keep a copy ``output/checkpoints/<name>_it<N>.pt`` (to compare runs at equal
iterations). Iteration ``n`` draws everything from generators seeded with ``seed * 1000003 + n``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..atlas import atlas_paths, load_atlas
from ..device import resolve_device
from ..errors import InputError
from ..imageio.geometry import Geometry, Volume
from ..imageio.network_grid import RAS_DIRECTION, resample
from ..losses import lncc_loss
from ..methods.base import ProgressCallback
from ..methods.jers import CLASSES, GRID_SHAPE, SPACING, atlas_on_grid, build_model
from ..nets.jers import JERSOutput, affine_warp
from ..spatial.affine import index_affine_to_normalised
from ..synth import load_synthseg_maps
from ..synth.deform import AffineRanges, random_affine_matrices
from ..labels import CSF_CODES, EXTRACEREBRAL_FIRST_CODE, LUT, TISSUE_LABELS, WHITE_MATTER_CODES, tissue_of
from ..synth.render import RenderOptions, render_image
from ..data_paths import shared_data_dir, synthseg_labelmaps_dir
from ..weights import record_weights, sha256_of, weights_dir
from .common import atomic_torch_save, device_name, plot_histories, read_history, settings_from_argv, write_history

DEEP_GREY = (10, 11, 12, 13, 26, 49, 50, 51, 52, 58)  # rendered between grey and white matter
MAX_CODE = 531
AUGMENT = AffineRanges(rotation_deg=10.0, scale=0.1, shear=0.02, translation=4.0)
RENDER = RenderOptions(max_blur=0.6, max_bias_std=0.3, gamma_std=0.15)


def brain_mask_of(labels: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Ground-truth brain mask of a SynthSeg map: every brain code (1 .. 499, CSF included)."""
    return (labels > 0) & (labels < EXTRACEREBRAL_FIRST_CODE)


def _t1_means(generator: torch.Generator, batch: int) -> torch.Tensor:
    """Per-code means ``(B, MAX_CODE)`` of a T1-like contrast (WM > deep GM > GM > CSF; random extra-cerebral)."""
    def u(low: float, high: float, size: tuple[int, ...] = (batch, 1)) -> torch.Tensor:
        return low + (high - low) * torch.rand(size, generator=generator)

    wm = u(0.7, 0.95)
    gm = wm * u(0.55, 0.75)
    csf = wm * u(0.05, 0.3)
    means = gm.expand(batch, MAX_CODE).clone()
    for codes, value in ((WHITE_MATTER_CODES, wm), (CSF_CODES, csf), (DEEP_GREY, (gm + wm) / 2.0)):
        means[:, list(codes)] = value
    means = means * u(0.95, 1.05, (batch, MAX_CODE))  # per-structure jitter
    means[:, EXTRACEREBRAL_FIRST_CODE:] = u(0.0, 1.0, (batch, MAX_CODE - EXTRACEREBRAL_FIRST_CODE))
    means[:, 0] = u(0.0, 0.05)[:, 0]
    return means


def render_head(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A T1-like image ``(B, 1, I, J, K)`` in [0, 1] of whole-head label maps (module docstring)."""
    batch = labels.shape[0]
    means = _t1_means(generator, batch)
    stds = 0.01 + 0.04 * torch.rand((batch, 1), generator=generator) * torch.ones(batch, MAX_CODE)
    return render_image(labels.clamp_max(MAX_CODE - 1), generator, RENDER, means=means, stds=stds)


def percentile_normalise(image: torch.Tensor, low: float = 0.005, high: float = 0.995) -> torch.Tensor:
    """Per-sample percentile normalisation to [0, 1], as `imageio.intensity.normalise_intensity` does at inference."""
    flat = image.flatten(1)
    lo = torch.quantile(flat, low, dim=1).view(-1, 1, 1, 1, 1)
    hi = torch.quantile(flat, high, dim=1).view(-1, 1, 1, 1, 1)
    return ((image - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)


def head_maps(data: Path | None = None) -> np.ndarray:
    """All SynthSeg whole-head maps on the network grid (64^3 at 3 mm, RAS+) centred on each brain, ``(N, I, J, K)``.

    The maps are first resampled whole (96^3 at 3 mm about the centre of the labelled box, which
    includes the neck), then cropped to 64^3 about the centre of the brain's bounding box, as a
    scan's field of view would be centred on the head.
    """
    whole = load_synthseg_maps(data or synthseg_labelmaps_dir(), (96, 96, 96), spacing=SPACING, orientation="RAS")
    crops = []
    for labels in whole:
        brain = np.argwhere(brain_mask_of(labels))
        centre = np.rint((brain.min(axis=0) + brain.max(axis=0)) / 2.0).astype(int)
        low = np.clip(centre - np.asarray(GRID_SHAPE) // 2, 0, np.asarray(labels.shape) - np.asarray(GRID_SHAPE))
        crops.append(labels[tuple(slice(a, a + n) for a, n in zip(low, GRID_SHAPE))])
    return np.stack(crops)


def synthetic_head(maps: np.ndarray, index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map ``index`` randomly posed and rendered (deterministic in ``seed``): labels and image ``(1, 1, I, J, K)``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.from_numpy(np.array(maps[index], dtype=np.float32))[None, None]
    matrix = random_affine_matrices(GRID_SHAPE, generator, 1, AUGMENT)
    theta = index_affine_to_normalised(matrix.double(), GRID_SHAPE).float()
    theta = torch.cat([theta, torch.tensor([[[0.0, 0.0, 0.0, 1.0]]])], dim=1)
    labels = affine_warp(labels, theta, mode="nearest").round().long()
    image = percentile_normalise(render_head(labels, generator))
    return labels, image


@dataclass
class TrainConfig:
    """Settings of one training run (see the module docstring)."""

    name: str = "jers"
    iterations: int = 1000
    lr: float = 1e-3
    seed: int = 0
    data: str | None = None
    output: str | None = None
    resume: bool = True
    save_every: int = 10
    snapshot_at: list[int] = field(default_factory=list)
    time_limit: float | None = None
    train_maps: int = 16
    extraction_stages: int = 5
    registration_stages: int = 5
    slope: float = 10.0
    lambda_seg: float = 0.1
    eta: float = 1.0
    window: int = 7
    extraction: bool = True
    seg_to_registration: bool = False
    device: str = "cpu"
    threads: int | None = None
    stage: str | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise InputError(f"unknown jers training setting(s) {unknown}; the settings are {sorted(known)}")
        c = cls(**{k: v for k, v in config.items() if v is not None})
        if c.stage is not None:
            raise InputError(f"jers trains all its networks in one stage; omit --stage (got {c.stage!r})")
        for key in ("iterations", "save_every", "train_maps", "extraction_stages", "registration_stages", "window"):
            value = getattr(c, key)
            if isinstance(value, bool) or int(value) != value or int(value) < (0 if key == "iterations" else 1):
                raise InputError(f"jers training setting '{key}' must be a positive whole number; got {value!r}")
            setattr(c, key, int(value))
        for key in ("lr", "slope"):
            if not float(getattr(c, key)) > 0:
                raise InputError(f"jers training setting '{key}' must be positive; got {getattr(c, key)!r}")
        for key in ("lambda_seg", "eta"):
            if not float(getattr(c, key)) >= 0:
                raise InputError(f"jers training setting '{key}' must be >= 0; got {getattr(c, key)!r}")
        if c.time_limit is not None and not float(c.time_limit) > 0:
            raise InputError(f"'time_limit' must be a positive number of seconds; got {c.time_limit!r}")
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


def jers_loss(out: JERSOutput, atlas: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 9 and its terms (module docstring)."""
    similarity = lncc_loss(out.warped, atlas, window=cfg.window)  # eq. 10
    loss = similarity
    terms = {"similarity": similarity.item()}
    if out.segmentation_logits is not None and out.inverse_labels is not None:
        target = out.inverse_labels.clone()
        target[:, 0] = target[:, 0] + (1.0 - out.inverse_labels.sum(dim=1)).clamp_min(0.0)
        segmentation = -(target * F.log_softmax(out.segmentation_logits, dim=1)).sum(dim=1).mean()  # eq. 11
        loss = loss + cfg.lambda_seg * segmentation
        terms["segmentation"] = segmentation.item()
    if cfg.extraction:
        regulariser = sum(mask_gradient_l2(m) for m in out.masks)  # eq. 12
        loss = loss + cfg.eta * regulariser
        terms["mask_smoothness"] = float(regulariser.detach())
    return loss, terms


def train(config: dict[str, Any], progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train JERS (see the module docstring); returns a summary dictionary."""
    cfg = TrainConfig.from_dict(dict(config))
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    output = Path(cfg.output) if cfg.output else weights_dir()
    (output / "checkpoints").mkdir(parents=True, exist_ok=True)
    weights_path = output / f"{cfg.name}.pt"
    checkpoint_path = output / "checkpoints" / f"{cfg.name}.pt"
    csv_path = output / f"{cfg.name}_loss.csv"
    plot_path = output / f"{cfg.name}_training.png"

    torch.manual_seed(cfg.seed)
    model = build_model().to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start, history, wall_before = 0, [], 0.0
    if cfg.resume and checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimiser.load_state_dict(checkpoint["optimiser"])
        start, wall_before = int(checkpoint["iteration"]), float(checkpoint["wall_seconds"])
        history = read_history(csv_path)[:start]

    data = Path(cfg.data) if cfg.data else synthseg_labelmaps_dir()
    maps = head_maps(data)
    if cfg.train_maps >= len(maps):
        raise InputError(f"train_maps ({cfg.train_maps}) must leave held-apart maps out of the {len(maps)} found")
    atlas_image, atlas_labels = load_atlas()
    atlas, onehot = atlas_on_grid(atlas_image, atlas_labels, device)
    if onehot is None:
        raise InputError("the shipped atlas labels are not the tissue codes; rebuild them with `python -m JointRegSegLib.atlas`")
    atlas_sha = {p.name: sha256_of(p) for p in atlas_paths()}
    run_start = time.perf_counter()

    def save(iteration: int) -> str:
        wall = wall_before + time.perf_counter() - run_start
        state = model.state_dict()
        atomic_torch_save({"model": state, "optimiser": optimiser.state_dict(), "iteration": iteration, "wall_seconds": wall}, checkpoint_path)
        atomic_torch_save(state, weights_path)
        if iteration in cfg.snapshot_at:
            atomic_torch_save(state, output / "checkpoints" / f"{cfg.name}_it{iteration}.pt")
        write_history(history, csv_path)
        recent = [h["loss"] for h in history[-50:]]
        provenance = {
            "method": "jers",
            "data": f"synthetic T1-like raw heads rendered from SynthSeg whole-head maps {data} (first {cfg.train_maps} "
            f"files, randomly posed); atlas {atlas_sha} (Resources/Atlas, MNI152 2009a + derived tissue labels)",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "config": asdict(cfg),
            "iterations": iteration,
            "seed": cfg.seed,
            "grid": {"shape": list(GRID_SHAPE), "spacing_mm": SPACING, "classes": CLASSES},
            "final_loss": float(np.mean(recent)) if recent else None,
            "final_loss_note": "mean of the last 50 iterations' losses",
            "wall_seconds": round(wall, 1),
            "device": device_name(device),
            "torch": torch.__version__,
        }
        checksum = record_weights(cfg.name, weights_path, provenance)
        plot_histories({f"jers training ({cfg.name})": history}, plot_path)
        return checksum

    checksum, saved_at, completed, stopped_by = None, -1, start, "iterations"
    model.train()
    while completed < cfg.iterations:
        if cfg.time_limit is not None and time.perf_counter() - run_start >= cfg.time_limit:
            stopped_by = "time limit"
            break
        tick = time.perf_counter()
        seed = cfg.seed * 1000003 + completed
        index = int(torch.randint(cfg.train_maps, (), generator=torch.Generator().manual_seed(seed + 7)))
        _, raw = synthetic_head(maps, index, seed)
        out = model(
            raw.to(device), atlas.tensor, onehot, cfg.extraction_stages, cfg.registration_stages, cfg.slope,
            extraction=cfg.extraction, segmentation=cfg.lambda_seg > 0, inverse_gradient=cfg.seg_to_registration,
        )
        loss, terms = jers_loss(out, atlas.tensor, cfg)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        completed += 1
        history.append({"iteration": completed, "loss": loss.item(), **terms, "seconds": time.perf_counter() - tick})
        if completed % cfg.save_every == 0 or completed in cfg.snapshot_at:
            checksum, saved_at = save(completed), completed
        if progress is not None:
            progress(completed / max(cfg.iterations, 1), "training")
        print(f"{cfg.name} {completed} loss {loss.item():.4f} {terms} {time.perf_counter() - tick:.1f}s", file=sys.stderr, flush=True)
    if saved_at != completed:
        checksum = save(completed)
    return {
        "name": cfg.name,
        "weights": str(weights_path),
        "sha256": checksum,
        "iterations": completed,
        "stopped_by": stopped_by,
        "final_loss": float(np.mean([h["loss"] for h in history[-50:]])) if history else None,
        "wall_seconds": round(wall_before + time.perf_counter() - run_start, 1),
        "loss_csv": str(csv_path),
        "plot": str(plot_path),
    }


def heldout_volume(labels: torch.Tensor, image: torch.Tensor, centre: np.ndarray) -> tuple[Volume, Volume]:
    """A synthetic head (network-grid tensors) as image and label Volumes: RAS+, 3 mm, centred on ``centre`` (LPS mm)."""
    origin = centre - RAS_DIRECTION @ (SPACING * (np.asarray(GRID_SHAPE) - 1) / 2.0)
    geometry = Geometry(GRID_SHAPE, (SPACING,) * 3, tuple(origin), RAS_DIRECTION)
    return Volume(image[0, 0].numpy().astype(np.float32), geometry), Volume(labels[0, 0].numpy().astype(np.int16), geometry)


VARIANTS: dict[str, dict[str, Any]] = {
    "JERS": {"weights": "jers"},
    "JERS w/o Seg (atlas labels warped, no segmentation network)": {"weights": "jers", "segmentation": "atlas"},
    "JERS, 1 extraction + 1 registration stage at inference": {"weights": "jers", "extraction_stages": 1, "registration_stages": 1},
    "JERS w/o Ext (trained without extraction)": {"weights": "jers_noext", "extraction": False},
    "JERS w/o segmentation loss (lambda = 0; labels from the atlas)": {"weights": "jers_noseg", "segmentation": "atlas"},
}


def evaluate_heldout(
    variants: dict[str, dict[str, Any]] | None = None,
    renders: int = 2,
    train_maps: int = 16,
    data: Path | None = None,
    picture: Path | None = None,
) -> dict[str, Any]:
    """Dice_ext, MI_reg, Dice_seg (Table 2 metrics) and seconds per volume on held-apart synthetic heads.

    Heads: maps ``train_maps ..`` (never seen in training), each rendered ``renders`` times (seeds
    ``10**6 + 97 * map + r``), randomly posed as in training, centred on the atlas. Dice_ext: brain
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
    maps = head_maps(data)
    atlas_image, atlas_labels = load_atlas()
    centre = atlas_image.geometry.index_to_physical((np.asarray(atlas_image.geometry.shape) - 1) / 2.0)
    fixed = normalise_intensity(atlas_image.array)
    heads = []
    for index in range(train_maps, len(maps)):
        for r in range(renders):
            labels, image = synthetic_head(maps, index, 10**6 + 97 * index + r)
            heads.append((index, *heldout_volume(labels, image, centre)))
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


REAL_SCANS = {
    "pair_fixed": ("pair/fixed_img.nii.gz", "pair/fixed_seg.nii.gz"),
    "flair": ("flair/FLAIR.nii.gz", None),
}


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
    """Run jers on the real scans of ../shared/data; PNG per scan in ``output``; Dice where labels exist.

    ``pair/fixed_img`` (skull-stripped T1 with FreeSurfer aseg labels): Dice_ext against ``aseg > 0``
    and Dice_seg against the aseg mapped to tissue classes (`tissue_of`); ``flair/FLAIR`` (a whole-head
    FLAIR, no labels): picture only.
    """
    from ..imageio.io import read_image, read_labels
    from ..methods.base import Inputs, Options
    from ..methods.jers import METHOD
    from ..metrics import dice_per_label

    shared = shared or shared_data_dir()
    atlas_image, atlas_labels = load_atlas()
    report: dict[str, Any] = {}
    for name, (image_file, labels_file) in REAL_SCANS.items():
        image = read_image(shared / image_file)
        tick = time.perf_counter()
        result = METHOD.register(Inputs(atlas_image, image, atlas_labels), Options())
        entry: dict[str, Any] = {"file": image_file, "seconds": time.perf_counter() - tick}
        if labels_file is not None:
            labels = read_labels(shared / labels_file).array
            seg = dice_per_label(tissue_of(labels), result.moving_seg.array, labels=list(TISSUE_LABELS))
            entry["dice_ext"] = dice_per_label((labels > 0).astype(np.uint8), result.brain_mask.array, labels=[1])[1]
            entry["dice_seg"] = float(np.mean([seg.get(c, 0.0) for c in TISSUE_LABELS]))
            entry["dice_seg_per_class"] = {LUT[c].name: seg.get(c, 0.0) for c in TISSUE_LABELS}
        path = output / f"jers_real_{name}.png"
        title = f"jers on {image_file}" + (f": Dice_ext {entry['dice_ext']:.3f}, Dice_seg {entry['dice_seg']:.3f}" if "dice_ext" in entry else " (no labels)")
        _picture(image, result.brain_mask.array, result.moving_seg.array, path, title)
        entry["picture"] = str(path)
        report[name] = entry
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m JointRegSegLib.training.jers KEY=JSON ...`` trains (e.g. ``time_limit=900 threads=1``);
    ``python -m JointRegSegLib.training.jers evaluate [OUT.json]`` evaluates on held-apart heads;
    ``python -m JointRegSegLib.training.jers real [FOLDER]`` runs the real scans (PNGs in FOLDER)."""
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
    config = settings_from_argv(args)
    print(json.dumps(train(config), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
