"""Training of U-ReSNet (seed 002), end to end with eq. 7 (`methods.uresnet.uresnet_loss`).

``train(config, progress)`` draws one pair per iteration on the network grid the method uses
(``spacing`` mm, default 4, ``shape`` default 44 x 52 x 60, the grid of a 160 x 192 x 224 mm brain):

- synthetic labelled pairs (probability ``1 - real``): two of the 20 SynthSeg label maps
  (../shared/data/synthseg_labelmaps, extra-cerebral classes dropped like skull-stripped scans,
  RAS orientation like the network grid), a different subject for moving and fixed with
  probability ``other_subject`` (the paper registers random pairs of subjects), else the same map;
  each map is deformed by its own random affine (``AffineRanges``: rotation, scale, shear,
  translation) composed with a smooth random diffeomorphism (`synth.random_deformation`, velocity
  RMS up to ``max_std`` voxels), then rendered: with probability ``t1_like`` with T1-weighted
  contrast (`T1_MEANS`: white matter bright, grey matter darker, CSF dark, each label's mean
  jittered by +-10 %), otherwise with SynthMorph's random contrast (`synth.render_image`), so the
  network sees realistic and unusual contrasts alike;
- real unlabelled pairs (probability ``real``): the two OASIS T1 scans of
  ../shared/data/oasis_unlabelled (skull-stripped), one as fixed, the other warped by a random
  affine + smooth deformation as moving; only the image terms of eq. 7 (no labels).

The only real scans with labels in ../shared/data are the benchmark pair and the FreeSurfer
subject its moving image was made from; training on them would leak the evaluation, so they are
not used (same rule as `training.segreg`).

Settings (``--option KEY=JSON``): ``iterations`` (total, resumable), ``time_limit`` (seconds of
this run), ``lr`` (Adam, paper 1e-3, halved every ``halve_every`` iterations: the paper halves it
every 15 epochs), ``spacing``, ``shape``, ``max_std``, ``real``, ``t1_like``, ``other_subject``,
``seed``, ``save_every``, ``threads``, ``resume``, ``data`` (the shared data folder), ``output``
and the loss weights ``alpha``, ``beta``, ``gamma``, ``delta`` (paper 0.1, 1e-11, 1, 1).

Outputs in ``output`` (default Resources/weights): ``uresnet.pt`` (state dict, manifest entry with
provenance via `weights.record_weights`), ``uresnet_loss.csv``, ``uresnet_training.png``, and a
resumable checkpoint ``checkpoints/uresnet.pt``. Iteration ``n`` draws its data from generators
seeded with ``seed * 1000003 + n``, so a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data_paths import shared_data_dir
from ..errors import InputError
from ..imageio.intensity import normalise_intensity
from ..imageio.io import read_image
from ..imageio.network_grid import network_geometry, to_network
from ..methods.base import ProgressCallback
from ..methods.uresnet import (
    LOSS_WEIGHTS,
    WEIGHT_NAME,
    build_network,
    forward,
    labels_to_classes,
    uresnet_loss,
)
from ..nets.blocks import count_parameters
from ..spatial import warp
from ..synth import (
    AffineRanges,
    DeformationOptions,
    load_synthseg_maps,
    random_deformation,
    render_image,
)
from ..weights import record_weights
from .common import (
    as_shape,
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
    set_floats,
    set_integers,
    settings_from_argv,
)

PLOT_NAME = "uresnet_training.png"

# T1-weighted mean intensity per FreeSurfer code (0-255 scale; unlisted brain codes get 120).
T1_MEANS: dict[int, float] = {
    0: 0.0, 2: 200.0, 41: 200.0, 7: 190.0, 46: 190.0, 16: 185.0, 28: 175.0, 60: 175.0, 13: 180.0, 52: 180.0,
    10: 165.0, 49: 165.0, 12: 150.0, 51: 150.0, 11: 140.0, 50: 140.0, 26: 140.0, 58: 140.0, 3: 125.0, 42: 125.0,
    8: 130.0, 47: 130.0, 17: 125.0, 53: 125.0, 18: 125.0, 54: 125.0, 4: 40.0, 43: 40.0, 5: 45.0, 44: 45.0,
    14: 40.0, 15: 40.0, 24: 35.0, 72: 40.0, 31: 70.0, 63: 70.0, 77: 170.0, 85: 150.0, 30: 110.0, 62: 110.0,
}
N_CODES = 256


@dataclass
class TrainConfig:
    """Settings of one training run (see the module docstring)."""

    iterations: int = 2000
    time_limit: float | None = None
    lr: float = 1e-3
    halve_every: int = 400
    spacing: float = 4.0
    shape: tuple[int, int, int] = (44, 52, 60)
    max_std: float = 1.5
    real: float = 0.15
    t1_like: float = 0.7
    other_subject: float = 0.7
    alpha: float = LOSS_WEIGHTS["alpha"]
    beta: float = LOSS_WEIGHTS["beta"]
    gamma: float = LOSS_WEIGHTS["gamma"]
    delta: float = LOSS_WEIGHTS["delta"]
    seed: int = 0
    save_every: int = 25
    threads: int | None = None
    resume: bool = True
    data: str | None = None
    output: str | None = None
    device: str = "cpu"
    stage: str | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrainConfig:
        """Checked settings from a plain dictionary (unknown keys and bad values raise InputError)."""
        c = config_from_dict(cls, config, "uresnet training")
        shape = as_shape(c.shape)
        if len(shape) != 3 or any(s < 8 or s % 4 for s in shape):
            raise InputError(f"training shape must be three multiples of 4 (>= 8); got {c.shape}")
        c.shape = shape
        set_integers(c, ("iterations", "save_every", "halve_every"), "uresnet training setting")
        set_floats(c, ("lr", "spacing", "max_std"), "uresnet training setting")
        for key in ("real", "t1_like", "other_subject"):
            if not 0.0 <= float(getattr(c, key)) <= 1.0:
                raise InputError(f"uresnet training setting '{key}' is a probability in [0, 1]; got {getattr(c, key)!r}")
            setattr(c, key, float(getattr(c, key)))
        set_floats(c, ("alpha", "beta", "gamma", "delta"), "loss weight", positive=False)
        check_time_limit(c.time_limit)
        if c.stage not in (None, "joint"):
            raise InputError(f"uresnet trains in one stage ('joint'); got stage {c.stage!r}")
        return c


def shared_data(cfg: TrainConfig) -> Path:
    """The shared data folder: ``data``, else `data_paths.shared_data_dir`."""
    return Path(cfg.data) if cfg.data else shared_data_dir()


class _Data:
    """Training pairs for iteration ``n`` (see the module docstring), deterministic in (seed, n)."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        root = shared_data(cfg)
        folder = root / "synthseg_labelmaps"
        if not folder.is_dir():
            raise InputError(f"the SynthSeg label maps are missing ({folder}); give data=<shared data folder>")
        maps = load_synthseg_maps(folder, cfg.shape, spacing=cfg.spacing, drop_extracerebral=True, orientation="RAS")
        self.maps = torch.from_numpy(np.array(maps)).long()
        self.real: list[torch.Tensor] = []
        if cfg.real > 0:
            for path in sorted((root / "oasis_unlabelled").glob("*.nii.gz")):
                volume = read_image(path, f"OASIS scan {path.name}")
                grid = network_geometry(volume.geometry, spacing=cfg.spacing, shape=cfg.shape)
                array = normalise_intensity(to_network(volume, grid))
                self.real.append(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None])
            if len(self.real) < 2:
                raise InputError(f"real pairs need the two OASIS scans in {root / 'oasis_unlabelled'}; or set real=0")
        self.deformation = DeformationOptions(
            max_std=cfg.max_std, affine=AffineRanges(rotation_deg=10.0, scale=0.08, shear=0.03, translation=4.0)
        )
        self.sources = f"{folder} (SynthSeg maps, brain only)" + (
            f" and {root / 'oasis_unlabelled'} (real T1, unlabelled)" if self.real else ""
        )

    def _render(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if float(torch.rand((), generator=generator)) >= self.cfg.t1_like:
            return render_image(labels, generator)
        means = torch.full((1, N_CODES), 120.0)
        for code, mean in T1_MEANS.items():
            means[0, code] = mean
        means = means * (0.9 + 0.2 * torch.rand((1, N_CODES), generator=generator))
        stds = 2.0 + 10.0 * torch.rand((1, N_CODES), generator=generator)
        stds[0, 0] = 1.0
        return render_image(labels, generator, means=means, stds=stds)

    def sample(self, n: int) -> dict[str, torch.Tensor | None]:
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000003 + n)
        shape = self.cfg.shape
        disp_f = random_deformation(shape, generator, 1, self.deformation)
        disp_m = random_deformation(shape, generator, 1, self.deformation)
        if self.real and float(torch.rand((), generator=generator)) < self.cfg.real:
            order = torch.randperm(2, generator=generator).tolist()
            fixed, moving = self.real[order[0]], self.real[order[1]]
            return {"fixed": fixed, "moving": warp(moving, disp_m).clamp(0, 1), "fixed_labels": None, "moving_labels": None}
        a = int(torch.randint(self.maps.shape[0], (), generator=generator))
        b = a
        if float(torch.rand((), generator=generator)) < self.cfg.other_subject:
            b = (a + 1 + int(torch.randint(self.maps.shape[0] - 1, (), generator=generator))) % self.maps.shape[0]
        fixed_labels = warp(self.maps[b][None, None].float(), disp_f, mode="nearest").round().long()
        moving_labels = warp(self.maps[a][None, None].float(), disp_m, mode="nearest").round().long()
        return {
            "fixed": self._render(fixed_labels, generator),
            "moving": self._render(moving_labels, generator),
            "fixed_labels": labels_to_classes(fixed_labels),
            "moving_labels": labels_to_classes(moving_labels),
        }


def plot_curves(folder: Path) -> Path | None:
    """Training curves from ``uresnet_loss.csv`` (raw and a 25-iteration running mean) as a PNG."""
    plt = pyplot()
    history = read_history(folder / f"{WEIGHT_NAME}_loss.csv")
    if not history:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    panels = (("loss", "lcc", "mse"), ("dice_moving", "dice_warped"))
    for axis, keys in zip(axes, panels):
        for key in keys:
            rows = [h for h in history if np.isfinite(h.get(key, np.nan))]
            if not rows:
                continue
            iterations = np.asarray([h["iteration"] for h in rows])
            plot_running_mean(axis, iterations, np.asarray([h[key] for h in rows]), key)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0].set_title("U-ReSNet: eq. 7 total and image terms (lower is better)")
    axes[1].set_title("soft Dice losses, labelled pairs (lower is better)")
    return save_figure(figure, folder / PLOT_NAME)


def train(config: dict[str, Any], progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train U-ReSNet (see the module docstring); returns a summary dictionary."""
    cfg = TrainConfig.from_dict(dict(config))
    device = run_device(cfg)
    files = run_files(cfg.output, WEIGHT_NAME)
    output = files.folder
    weights = {**LOSS_WEIGHTS, **{k: getattr(cfg, k) for k in ("alpha", "beta", "gamma", "delta")}}

    torch.manual_seed(cfg.seed)
    net = build_network().to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    start, history, wall_before = 0, [], 0.0
    if cfg.resume and files.checkpoint.exists():
        checkpoint, start, wall_before = resume_checkpoint(files.checkpoint, net, device)
        optimiser.load_state_dict(checkpoint["optimiser"])
        history = read_history(files.history)[:start]
    data = _Data(cfg, device)
    run_start = time.perf_counter()

    def save(iteration: int) -> str:
        wall = wall_before + time.perf_counter() - run_start
        save_progress(net, {"optimiser": optimiser.state_dict()}, iteration, wall, history, files)
        recent = history[-50:]
        provenance = {
            "method": "uresnet",
            "architecture": {"network": "UReSNet", "channels": list(net.channels), "classes": net.n_classes,
                             "parameters": count_parameters(net)},
            "data": data.sources + " (the benchmark pair and fs_subject are not used: they would leak the evaluation)",
            **run_provenance(cfg, device),
            "iterations": iteration,
            "seed": cfg.seed,
            "shape": list(cfg.shape),
            "spacing_mm": cfg.spacing,
            "final_loss": float(np.mean([h["loss"] for h in recent])) if recent else None,
            "final_loss_note": "mean of the last 50 iterations' eq. 7 losses (labelled and unlabelled pairs)",
            "wall_seconds": round(wall, 1),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        checksum = record_weights(WEIGHT_NAME, files.weights, provenance)
        plot_curves(output)
        return checksum

    checksum, saved_at, completed, stopped_by = None, -1, start, "iterations"
    net.train()
    while completed < cfg.iterations:
        if cfg.time_limit is not None and time.perf_counter() - run_start >= cfg.time_limit:
            stopped_by = "time limit"
            break
        tick = time.perf_counter()
        for group in optimiser.param_groups:
            group["lr"] = cfg.lr * 0.5 ** (completed // cfg.halve_every)
        batch = data.sample(completed)
        fixed, moving = batch["fixed"].to(device), batch["moving"].to(device)
        out = forward(net, moving, fixed)
        labels = [batch[k].to(device) if batch[k] is not None else None for k in ("fixed_labels", "moving_labels")]
        loss, terms = uresnet_loss(out, fixed, moving, labels[0], labels[1], weights)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        completed += 1
        row = {"iteration": completed, "loss": loss.item(), **terms, "seconds": time.perf_counter() - tick}
        row.setdefault("dice_moving", float("nan"))
        row.setdefault("dice_warped", float("nan"))
        history.append(row)
        if completed % cfg.save_every == 0:
            checksum, saved_at = save(completed), completed
            print(f"uresnet iteration {completed}: loss {np.mean([h['loss'] for h in history[-25:]]):.4f}", file=sys.stderr, flush=True)
        if progress is not None:
            progress(completed / max(cfg.iterations, 1), "joint")
    if saved_at != completed and completed > 0:
        checksum = save(completed)
    return {
        "weights": str(files.weights),
        "sha256": checksum,
        "iterations": completed,
        "stopped_by": stopped_by,
        "parameters": count_parameters(net),
        "final_loss": float(np.mean([h["loss"] for h in history[-50:]])) if history else None,
        "wall_seconds": round(wall_before + time.perf_counter() - run_start, 1),
        "loss_csv": str(files.history),
        "plot": str(output / PLOT_NAME),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m JointRegSegLib.training.uresnet KEY=JSON ...`` for long background runs."""
    import json

    print(json.dumps(train(settings_from_argv(argv)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
