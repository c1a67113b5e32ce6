"""Training of the tto networks (seed 004): teacher pretraining on synthetic pairs, then distillation.

``train(config, progress)`` runs one stage:

- ``stage="teacher"`` (section 2.1, eq. 1): the teacher U-Net learns on synthetic pairs only
  (SynthMorph recipe, `JointRegSegLib.synth.SyntheticPairs`) with
  ``L = MultiAxisMI(I_f, I_m o phi) + lambda_smooth ||grad u||^2``;
- ``stage="student"`` (section 2.2): the student learns from the frozen teacher with
  ``L_KD = lambda_dist MultiAxisMI(I_m o phi_T, I_m o phi_S) + lambda_sim MultiAxisMI(I_f, I_m o phi_S)
  + lambda_smooth ||grad u_S||^2``.

Both networks take ``cat([moving, fixed])`` and output a displacement in voxels (`methods.tto.predict`).

Outputs, in ``output`` (default `weights.weights_dir()`, i.e. Resources/weights):
``tto_teacher.pt`` / ``tto_student.pt`` (a plain state dict, recorded in the manifest with its
provenance by `weights.record_weights`), ``tto_teacher_loss.csv`` / ``tto_student_loss.csv`` (the
loss history) and ``tto_training.png`` (the loss curves of both stages). A resumable checkpoint
(network, optimiser, iteration, history, wall time) goes to ``output/checkpoints/<name>.pt`` every
``save_every`` iterations together with the weights, so a stopped run leaves usable weights. Every
file is written to a temporary name and moved into place with ``os.replace``.

Configuration keys (`TrainConfig`; the CLI passes ``--stage``, ``--iterations``, ``--seed``,
``--device`` and ``--option KEY=JSON``): ``stage``, ``iterations`` (the TOTAL number of iterations:
resuming a run of 500 with ``iterations=800`` does 300 more), ``shape`` (training crop, multiples
of 16), ``spacing`` (mm of the label maps), ``batch_size``, ``lr``, ``seed``, ``data`` (folder of
SynthSeg label maps), ``output``, ``resume``, ``save_every``, ``time_limit`` (seconds of this run),
``lambda_smooth``, ``lambda_dist``, ``lambda_sim``, ``mi_bins``, ``mi_stride``, ``sources``,
``max_std``, ``device``, ``threads``.

Choices where the paper is silent (ours):

- label maps: the 20 SynthSeg maps, resampled (mode pooling) to ``spacing`` mm on an 80 x 96 x 112
  grid centred on each map's labelled box (the network grid the method uses for a whole brain at
  2 mm), either brain-only (extra-cerebral classes >= 500 set to background, like skull-stripped
  scans, like the benchmark pair) or whole-head; plus SynthMorph's smooth-noise maps (26 labels).
  ``sources`` gives the probability of each kind (default brain 0.7, head 0.15, noise 0.15). Each
  iteration draws a random ``shape`` crop (default 48^3) of all maps (the network is fully
  convolutional; on two CPU cores a 48^3 iteration costs 2-5 s against 4-9 s at 64^3, most of it
  generating the pair), then `SyntheticPairs` deforms (velocity RMS up to ``max_std`` voxels,
  SynthMorph's 3) and renders both images;
- training at the inference spacing (2 mm), so the network sees anatomy at the scale it registers;
- randomness: iteration ``n`` draws everything from generators seeded with ``seed * 1000003 + n``,
  so a resumed run sees the same data as an uninterrupted one;
- ``lr`` default 1e-3 (the paper's 1e-4 is for 150 000 GPU iterations; CPU runs are hundreds to
  a few thousand), Adam; ``lambda_smooth`` default 0.3 (MI terms are about 0.3-0.8 nats; 0.3 keeps
  synthetic deformations of a few voxels affordable); ``lambda_dist = lambda_sim = 1``;
- MultiAxisMI on a random ``mi_stride`` sub-lattice per iteration (as in `methods.tto`; 1 = every
  voxel), 32 bins;
- the student starts from scratch (paper: distillation from the teacher's outputs only).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..errors import InputError
from ..losses import gradient_l2
from ..methods.base import ProgressCallback
from ..methods.tto import WEIGHT_NAMES, build_network, multi_axis_mi, predict
from ..spatial import warp
from ..synth import DeformationOptions, SyntheticPairs, load_synthseg_maps
from ..data_paths import synthseg_labelmaps_dir
from ..weights import load_into, record_weights
from .common import (
    as_shape,
    check_time_limit,
    config_from_dict,
    plot_histories,
    read_history,
    resume_checkpoint,
    run_device,
    run_files,
    run_provenance,
    save_progress,
    set_floats,
    set_integers,
    settings_from_argv,
)

STAGES = ("teacher", "student")
MAP_SHAPE = (80, 96, 112)
NOISE_LABELS = 26
PLOT_NAME = "tto_training.png"


@dataclass
class TrainConfig:
    """Settings of one training run (see the module docstring)."""

    stage: str = "teacher"
    iterations: int = 2000
    shape: tuple[int, int, int] = (48, 48, 48)
    spacing: float = 2.0
    batch_size: int = 1
    lr: float = 1e-3
    seed: int = 0
    data: str | None = None
    output: str | None = None
    resume: bool = True
    save_every: int = 25
    time_limit: float | None = None
    lambda_smooth: float = 0.3
    lambda_dist: float = 1.0
    lambda_sim: float = 1.0
    mi_bins: int = 32
    mi_stride: int = 2
    sources: dict[str, float] = field(default_factory=lambda: {"brain": 0.7, "head": 0.15, "noise": 0.15})
    max_std: float = 3.0
    device: str = "cpu"
    threads: int | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "TrainConfig":
        """Checked settings from a plain dictionary (unknown keys and bad values raise InputError)."""
        c = config_from_dict(cls, config, "tto training")
        if c.stage not in STAGES:
            raise InputError(f"tto training stage must be 'teacher' or 'student'; got {c.stage!r}")
        shape = as_shape(c.shape)
        if len(shape) != 3 or any(s < 16 or s % 16 for s in shape):
            raise InputError(f"training shape must be three multiples of 16 (e.g. [64, 64, 64]); got {c.shape}")
        if any(s > m for s, m in zip(shape, MAP_SHAPE)):
            raise InputError(f"training shape {shape} must fit in the label-map grid {MAP_SHAPE}")
        c.shape = shape
        set_integers(c, ("iterations", "batch_size", "save_every", "mi_bins", "mi_stride"))
        set_floats(c, ("spacing", "lr", "max_std"))
        set_floats(c, ("lambda_smooth", "lambda_dist", "lambda_sim"), positive=False)
        if not isinstance(c.sources, dict) or set(c.sources) - {"brain", "head", "noise"} or sum(c.sources.values()) <= 0:
            raise InputError(f"'sources' must map some of brain, head, noise to probabilities; got {c.sources!r}")
        if any(float(v) < 0 for v in c.sources.values()):
            raise InputError(f"'sources' probabilities must be >= 0; got {c.sources!r}")
        check_time_limit(c.time_limit)
        c.resume = bool(c.resume)
        return c


class _Data:
    """Synthetic pairs for iteration ``n``: a random source kind and crop, deterministic in (seed, n)."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        kinds = [k for k in ("brain", "head", "noise") if float(cfg.sources.get(k, 0.0)) > 0]
        self.kinds = kinds
        weights = np.asarray([float(cfg.sources[k]) for k in kinds])
        self.cumulative = np.cumsum(weights / weights.sum())
        folder = Path(cfg.data) if cfg.data else synthseg_labelmaps_dir()
        self.folder = folder
        self.maps: dict[str, torch.Tensor] = {}
        for kind in ("brain", "head"):
            if kind in kinds:
                maps = load_synthseg_maps(folder, MAP_SHAPE, spacing=cfg.spacing, drop_extracerebral=kind == "brain")
                self.maps[kind] = torch.from_numpy(np.array(maps))

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        seed = self.cfg.seed * 1000003 + n
        generator = torch.Generator().manual_seed(seed)
        kind = self.kinds[int(np.searchsorted(self.cumulative, float(torch.rand((), generator=generator))))]
        deformation = DeformationOptions(max_std=self.cfg.max_std)
        shape = self.cfg.shape
        if kind == "noise":
            source: Any = "noise"
        else:
            start = [int(torch.randint(m - s + 1, (), generator=generator)) for m, s in zip(MAP_SHAPE, shape)]
            source = self.maps[kind][:, start[0]:start[0] + shape[0], start[1]:start[1] + shape[1], start[2]:start[2] + shape[2]]
        pairs = SyntheticPairs(
            source, shape, seed=seed, device=self.device, batch_size=self.cfg.batch_size,
            deformation=deformation, n_labels=NOISE_LABELS,
        )
        return pairs.sample()


def plot_curves(folder: Path) -> Path | None:
    """Loss curves of the teacher and student logs in ``folder`` (raw and a 25-iteration running mean) as a PNG."""
    keys = ("iteration", "loss", "similarity", "smooth", "distillation")
    histories = {
        f"tto {stage}": [{k: row[k] for k in keys if k in row} for row in read_history(folder / f"{WEIGHT_NAMES[stage]}_loss.csv")]
        for stage in STAGES
    }
    return plot_histories(histories, folder / PLOT_NAME)


def train(config: dict[str, Any], progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Run one tto training stage (see the module docstring); returns a summary dictionary."""
    cfg = TrainConfig.from_dict(dict(config))
    device = run_device(cfg)
    name = WEIGHT_NAMES[cfg.stage]
    files = run_files(cfg.output, name)
    output = files.folder

    torch.manual_seed(cfg.seed)
    net = build_network(cfg.stage).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    start, history, wall_before = 0, [], 0.0
    if cfg.resume and files.checkpoint.exists():
        checkpoint, start, wall_before = resume_checkpoint(files.checkpoint, net, device)
        optimiser.load_state_dict(checkpoint["optimiser"])
        for group in optimiser.param_groups:
            group["lr"] = cfg.lr
        history = read_history(files.history)[:start]

    teacher, teacher_sha = None, None
    if cfg.stage == "student":
        teacher = build_network("teacher")
        teacher_sha = load_into(teacher, WEIGHT_NAMES["teacher"], folder=output)
        teacher = teacher.to(device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

    data = _Data(cfg, device)
    run_start = time.perf_counter()

    def save(iteration: int) -> str:
        wall = wall_before + time.perf_counter() - run_start
        save_progress(net, {"optimiser": optimiser.state_dict()}, iteration, wall, history, files)
        recent = [h["loss"] for h in history[-50:]]
        provenance = {
            "method": "tto",
            "stage": cfg.stage,
            "data": f"synthetic pairs (SynthMorph recipe) from {data.folder} label maps and smooth-noise maps; "
            f"sources {cfg.sources}",
            **run_provenance(cfg, device),
            "iterations": iteration,
            "seed": cfg.seed,
            "shape": list(cfg.shape),
            "spacing_mm": cfg.spacing,
            "final_loss": float(np.mean(recent)) if recent else None,
            "final_loss_note": "mean of the last 50 iterations' losses",
            "wall_seconds": round(wall, 1),
            "teacher_sha256": teacher_sha,
        }
        checksum = record_weights(name, files.weights, provenance)
        plot_curves(output)
        return checksum

    checksum, saved_at, completed = None, -1, start
    bar = tqdm(total=cfg.iterations, initial=min(start, cfg.iterations), desc=f"tto {cfg.stage}", file=sys.stderr)
    stopped_by = "iterations"
    net.train()
    while completed < cfg.iterations:
        if cfg.time_limit is not None and time.perf_counter() - run_start >= cfg.time_limit:
            stopped_by = "time limit"
            break
        tick = time.perf_counter()
        batch = data.sample(completed)
        fixed, moving = batch["fixed"], batch["moving"]
        generator = torch.Generator().manual_seed(cfg.seed * 1000003 + completed + 500009)
        disp = predict(net, fixed, moving)
        warped = warp(moving, disp)
        similarity = multi_axis_mi(fixed, warped, cfg.mi_bins, cfg.mi_stride, generator)
        smooth = gradient_l2(disp)
        terms: dict[str, torch.Tensor] = {"similarity": similarity, "smooth": smooth}
        if teacher is None:
            loss = similarity + cfg.lambda_smooth * smooth  # eq. 1 (lambda_sim = 1)
        else:
            with torch.no_grad():
                warped_teacher = warp(moving, predict(teacher, fixed, moving))
            distillation = multi_axis_mi(warped_teacher, warped, cfg.mi_bins, cfg.mi_stride, generator)
            terms["distillation"] = distillation
            loss = cfg.lambda_dist * distillation + cfg.lambda_sim * similarity + cfg.lambda_smooth * smooth  # L_KD
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        completed += 1
        history.append(
            {"iteration": completed, "loss": loss.item(), **{k: v.item() for k, v in terms.items()},
             "seconds": time.perf_counter() - tick}
        )
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if completed % cfg.save_every == 0:
            checksum, saved_at = save(completed), completed
        if progress is not None:
            progress(completed / max(cfg.iterations, 1), cfg.stage)
    bar.close()
    if saved_at != completed:
        checksum = save(completed)
    return {
        "stage": cfg.stage,
        "weights": str(files.weights),
        "sha256": checksum,
        "iterations": completed,
        "stopped_by": stopped_by,
        "final_loss": float(np.mean([h["loss"] for h in history[-50:]])) if history else None,
        "wall_seconds": round(wall_before + time.perf_counter() - run_start, 1),
        "loss_csv": str(files.history),
        "plot": str(output / PLOT_NAME),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m JointRegSegLib.training.tto KEY=JSON ...``: a plain entry point for long background runs.

    Example: ``python -m JointRegSegLib.training.tto stage=teacher iterations=5000 time_limit=1500 threads=2``.
    """
    import json

    summary = train(settings_from_argv(argv))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
