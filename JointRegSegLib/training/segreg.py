"""Training of SegReg's learned variant (seed 001, "Training and Inference").

One shared U-Net (`nets.RegistrationUNet`, moving and fixed region images concatenated) predicts a
stationary velocity for a region pair ``(I_m * S_m^i, I_f * S_f^i)``; the velocity is integrated
by scaling and squaring and the loss is eq. 5, ``g0 L_v + g1 L_m + g2 R`` (the same terms as the
iterative variant, `methods.segreg.region_loss`, with R the plain gradient-L2 of the velocity over
the crop, VoxelMorph's convention). Each step feeds ONE random region pair (the paper's scheme).

Choices where the paper is silent (recorded here):

- Data: synthetic pairs only (`synth.SyntheticPairs`: the 20 SynthSeg label maps of
  ../shared/data/synthseg_labelmaps, extra-cerebral classes dropped, on a 2 mm grid of
  80 x 96 x 112, each image of a pair deformed by its own random smooth diffeomorphism and
  rendered with its own random contrast), the image zeroed outside the brain labels, like the
  skull-stripped scans segreg registers. The only real scans with labels in ../shared/data are the
  benchmark pair and the FreeSurfer subject its moving image was made from: training on them would
  leak the evaluation, so they are not used.
- Regions: the ``all`` mode of `methods.regions` (one structure per region) on each synthetic
  pair; a step draws one region uniformly among those present in both images, except the
  background (its masked images are empty for skull-stripped brains: nothing to learn; at
  inference such a region gets the smooth extension of its neighbours' field). A new synthetic
  pair is drawn every ``pair_every`` steps (default 4) to spend the time on the network rather
  than on the generator.
- Crop: the box of both region masks plus a 3-voxel margin, its size rounded up to a multiple of
  16 (the same rule as inference), so the network sees what it will see at inference.
- Network (VoxelMorph-like, 4 down / 4 up with skips, kept slim for CPU inference): encoder
  8, 16, 16, 16, decoder 16, 16, 16, 8, the flow head straight after the decoder; 7 integration steps;
  it runs at ``factor`` (default 2) times the fine grid's spacing, i.e. 2 mm for the 1 mm pair;
  the training grid's ``spacing`` should be ``factor`` mm (the fine grid is 1 mm by default).
- Optimiser: Adam with the paper's polynomial decay (power 0.9) from ``lr`` (default 1e-3: the
  paper's 1e-4 is for days of GPU training; a short CPU run needs a larger step).
- Loss weights: the method's defaults for the chosen mask loss (`methods.segreg.DEFAULT_WEIGHTS`),
  with g2 = ``smoothness`` (default 0.1, the paper's abdomen value) on the velocity.
- Weights are written to ``Resources/weights/segreg-<mask_loss>.pt`` (state dict) and recorded in
  the manifest with their provenance (architecture, data, settings, steps, final loss, versions).
"""

from __future__ import annotations

import datetime
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, WeightsError
from ..methods.base import ProgressCallback
from ..methods.regions import plan_regions
from ..methods.segreg import (
    DEFAULT_WEIGHTS,
    MASK_LOSSES,
    Settings,
    _one_hot_float,
    _stack,
    region_box,
    region_loss,
)
from ..nets import RegistrationUNet
from ..spatial import identity_grid, integrate_velocity
from ..synth import SyntheticPairs
from ..data_paths import synthseg_labelmaps_dir
from ..weights import fit_state, load_weights, read_manifest, record_weights, weights_dir

ARCHITECTURE = {"encoder": [8, 16, 16, 16], "decoder": [16, 16, 16, 8], "final": []}
FACTOR = 2
INTEGRATION_STEPS = 7
SHAPE = (80, 96, 112)
SPACING_MM = 2.0
MARGIN = 3

_DEFAULTS: dict[str, Any] = {
    "mask_loss": "dice",
    "similarity": "ncc",
    "smoothness": 0.1,
    "lr": 1e-3,
    "iterations": 2000,
    "minutes": None,
    "seed": 0,
    "device": "cpu",
    "pair_every": 4,
    "labelmaps": None,
    "architecture": None,
    "shape": SHAPE,
    "spacing": SPACING_MM,
    "factor": FACTOR,
    "output": None,
}


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
    return net.to(device).eval(), provenance, checksum


def _config(config: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - set(_DEFAULTS))
    if unknown:
        raise InputError(f"unknown segreg training setting(s) {', '.join(unknown)}; the settings are: {', '.join(_DEFAULTS)}.")
    values = {**_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if values["mask_loss"] not in MASK_LOSSES:
        raise InputError(f"mask_loss must be one of {', '.join(MASK_LOSSES)}; got {values['mask_loss']!r}")
    if int(values["iterations"]) < 1 or int(values["pair_every"]) < 1 or float(values["lr"]) <= 0:
        raise InputError("iterations and pair_every must be >= 1 and lr positive")
    if int(values["factor"]) not in (1, 2, 4):
        raise InputError(f"factor (network spacing / fine grid spacing) must be 1, 2 or 4; got {values['factor']}")
    values["architecture"] = values["architecture"] or ARCHITECTURE
    values["shape"] = tuple(int(s) for s in values["shape"])
    if any(s % 16 for s in values["shape"]):
        raise InputError(f"the training grid {values['shape']} must be a multiple of 16 on every axis")
    return values


def region_crop(fixed_mask: np.ndarray, moving_mask: np.ndarray) -> Any:
    """The crop both training and inference use on the network's grid: masks' box + margin, size a multiple of 16."""
    return region_box(fixed_mask | moving_mask, MARGIN, 1, min_size=16)


def _step_tensors(batch: dict[str, torch.Tensor], region: int, plan, need_edt: bool):
    """Fixed and moving channels (masked image, mask, EDT) of one region on its crop."""
    fixed_regions = torch.from_numpy(plan.fixed.astype(np.int64))[None, None]
    moving_regions = torch.from_numpy(plan.moving.astype(np.int64))[None, None]
    box = region_crop(plan.fixed == region, plan.moving == region)
    fixed = _stack(batch["fixed"].cpu(), _one_hot_float(fixed_regions, region, box), box, need_edt)
    moving = _stack(batch["moving"].cpu(), _one_hot_float(moving_regions, region, box), box, need_edt)
    return fixed, moving


def train(config: dict[str, Any], progress: ProgressCallback) -> dict[str, Any]:
    """Train the region network (see the module docstring); returns a summary with the weights' path."""
    values = _config(config)
    device = torch.device(values["device"])
    seed = int(values["seed"])
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    settings = Settings(
        mask_loss=values["mask_loss"],
        similarity=values["similarity"],
        weights=(*DEFAULT_WEIGHTS[values["mask_loss"]][:2], float(values["smoothness"])),
    )
    labelmaps = Path(values["labelmaps"] or synthseg_labelmaps_dir())
    data = SyntheticPairs(
        labelmaps,
        values["shape"],
        seed=seed,
        device="cpu",
        labelmap_kwargs={"spacing": float(values["spacing"]), "drop_extracerebral": True},
    )
    net = build_network(values["architecture"]).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=float(values["lr"]))
    steps = int(values["iterations"])
    limit = None if values["minutes"] is None else 60.0 * float(values["minutes"])
    started = time.monotonic()
    need_edt = settings.mask_loss != "dice"
    history: list[dict[str, float]] = []
    recent: list[float] = []
    batch, plan, regions = None, None, []
    step = 0
    for step in range(steps):
        if limit is not None and time.monotonic() - started > limit:
            break
        if step % int(values["pair_every"]) == 0 or not regions:
            batch = data.sample(1)
            for key in ("fixed", "moving"):
                batch[key] = batch[key] * (batch[f"{key}_labels"] > 0)  # skull-stripped, like the scans
            plan = plan_regions(batch["fixed_labels"][0, 0].numpy(), batch["moving_labels"][0, 0].numpy(), "all")
            regions = [r for r in range(1, plan.count) if (plan.fixed == r).any() and (plan.moving == r).any()]
        region = int(regions[rng.integers(len(regions))])
        fixed, moving = _step_tensors(batch, region, plan, need_edt)
        fixed, moving = fixed.to(device), moving.to(device)
        fraction = step / steps if limit is None else max(step / steps, (time.monotonic() - started) / limit)
        for group in optimiser.param_groups:
            group["lr"] = float(values["lr"]) * (1.0 - min(fraction, 0.999)) ** 0.9
        velocity = net(torch.cat([moving[:, 0:1], fixed[:, 0:1]], dim=1))
        disp = integrate_velocity(velocity, INTEGRATION_STEPS)
        points = identity_grid(disp.shape[2:], device=device) + disp
        ones = torch.ones_like(fixed[:, 1:2])
        loss, terms = region_loss(settings, points, fixed, moving, velocity, ones)
        terms = {k: float(v) for k, v in terms.items()}
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        recent.append(float(loss.detach()))
        if step % 25 == 0:
            history.append({"step": step, "loss": float(np.mean(recent)), **terms, "seconds": time.monotonic() - started})
            recent = []
        progress(min(1.0, max(step / steps, 0.0 if limit is None else (time.monotonic() - started) / limit)), f"step {step + 1}")
    trained_steps = step + 1
    out_dir = Path(values["output"]) if values["output"] else weights_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"segreg-{settings.mask_loss}"
    path = out_dir / f"{name}.pt"
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, path)
    provenance = {
        "method": "segreg",
        "variant": "learned",
        "architecture": values["architecture"],
        "factor": int(values["factor"]),
        "integration_steps": INTEGRATION_STEPS,
        "network_spacing_mm": float(values["spacing"]),
        "training": {
            "script": "JointRegSegLib/training/segreg.py (jointregseg train segreg)",
            "data": f"synthetic pairs from the SynthSeg label maps in {labelmaps.name} "
            "(extra-cerebral classes dropped, random deformations and contrasts, background zeroed)",
            "grid": list(values["shape"]),
            "mask_loss": settings.mask_loss,
            "similarity": settings.similarity,
            "loss_weights": list(settings.weights),
            "lr": float(values["lr"]),
            "steps": trained_steps,
            "seconds": round(time.monotonic() - started, 1),
            "seed": seed,
            "device": str(device),
            "final_loss": history[-1]["loss"] if history else None,
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    checksum = record_weights(name, path, provenance)
    return {"weights": str(path), "sha256": checksum, "steps": trained_steps, "history": history[-5:]}

