"""tto: generalised deep registration with test-time optimisation (seed 004).

Pipeline of `TTOMethod.register` (paper sections 2.1-2.3 and the choices below):

1. both images are resampled onto the fixed image's network grid (`common.prepare_pair`) and
   normalised to [0, 1];
2. an affine stage (`affine_stage.fit_affine`, global Parzen normalised MI) aligns the moving image;
3. the student U-Net (or the teacher, option ``network``) predicts a dense displacement field
   (DDF, section 2.1: ``u = F(I_f, I_m)``, ``phi = id + u``) from the fixed image and the affinely
   warped moving image;
4. test-time optimisation (section 2.3): a copy of the network is fine-tuned on this one pair with
   ``L_TTO = MultiAxisMI + NCC + lambda_smooth ||grad u||^2 + alpha_div ||div u||^2``, Adam,
   ``options.iterations`` steps (default 100 on a GPU, 0 on the CPU: see "Defaults"); then the
   fine-tuned network predicts the field (``options.extra['tto'] = False``: the network as shipped
   predicts it);
5. refinement (ours, option ``refine``): the field ``w`` of the mapping ``T(x) = A (x + w(x))`` is
   optimised directly on the fixed image's grid, coarse to fine (`refinement.refine`: 4 then 2 mm
   on the CPU, 4, 2, 1 mm on a GPU), from the network's field, with local NCC for images of one
   contrast and MI for different contrasts (``refine_similarity = "auto"``:
   `refinement.choose_similarity`), a diffusion regulariser and Adam;
6. the whole mapping goes back to the fixed image's grid as a physical field
   (`common.result_from_field`; without refinement ``compose(affine, u)`` through
   `common.result_from_network_field`).

Stages switch off for the ablation: ``network = "none"`` (affine, then refinement from zero),
``tto = False``, ``refine = False``; ``affine = "none"``.

Choices where the paper is silent (ours, recorded here):

- network grid: isotropic ``spacing`` (option ``spacing``; default 3 mm on the CPU, 2 mm on a
  GPU, see "Defaults" below) with each size the multiple of 16 NEAREST to the field of view /
  spacing (section 2.3.1: "resampled to the nearest resolution of 2^4"); where that rounds down,
  the spacing grows just enough for the grid to cover the fixed image's whole field of view
  (160 x 192 x 224 at 1 mm -> 80 x 96 x 112 at 2.013 mm, or 48 x 64 x 80 at 3.38 mm for 3 mm);
- network input ``cat([moving, fixed])`` (`nets.unet`), output a displacement (not a velocity) in
  voxels of the network grid, as in training (`training.tto`);
- the affine stage is ours (the paper registers roughly aligned images); option ``affine``:
  ``"nmi"`` (default, Parzen normalised MI), ``"mi"``, ``"ncc"`` or ``"none"``;
  ``affine_iterations`` per pyramid level (4, 2, 1);
- TTO loss weights: ``lambda_sim = 1``; ``lambda_smooth`` and ``alpha_div`` (see "Defaults");
  gradient and divergence in network voxels (`losses.gradient_l2`, `losses.divergence_l2`); NCC
  is the global NCC of appendix B (eq. 4);
- MultiAxisMI during TTO (and training) is evaluated on a sub-lattice of every ``mi_stride``-th
  voxel along each axis with a random offset per iteration (a Mattes-style sampling of the
  slices and of the voxels in each slice): the slice-wise Parzen MI costs voxels x bins x 3 axes,
  about 7 s per evaluation at 80 x 96 x 112 on two CPU cores, against a 60 s budget. ``mi_stride
  = 1`` is the paper's full loss. The warped image is sampled from the full-resolution moving
  image, so the loss sees full-resolution detail; NCC and the regularisers use every voxel;
- TTO optimiser: Adam, learning rate ``lr`` (see "Defaults"), all network parameters trainable,
  one pair per step (the paper's "epoch" over one test pair is one step);
- time budget: none by default, so the result depends only on the inputs, the weights, the
  options and ``options.seed``. With ``options.time_budget`` the optimisation stages (test-time
  optimisation and refinement) stop before a step that would end past the budget (estimated by
  the previous step's duration; a budget of 0 does no step); affine, inference and resampling are
  not counted (``details['timings']``). A cut is reported in ``result.messages`` and
  ``details['stopped_by']``, since the result then depends on how busy the machine was;
- ``options.extra['tto'] = False`` skips the fine-tuning whatever ``iterations`` says;
- determinism: on the CPU the sub-lattice offsets and the affine sampling draw from seeded
  generators and each stage runs on a thread count fixed by its sizes (`device.threads_for`), so
  the same command gives the same field however busy the machine is.

Defaults, measured on the benchmark pair (../shared/data/pair, 160 x 192 x 224 at 1 mm, mean Dice
over the 30 evaluation labels at 1 mm; a 2-core CPU shared with other jobs; docs/results/tto.md):

- ``spacing`` 3 mm on the CPU: a TTO step of the student costs about 2 s at 48 x 64 x 80 on an idle
  core (7 s at load 8), 4.5 s at 2.5 mm and 10 s at 2 mm. On a GPU the paper's 2 mm-class grids
  are cheap;
- ``iterations`` 0 on the CPU: five TTO steps (37 s at load 8) raised the network's Dice from
  0.515 to 0.538 and left the refined result at 0.782 with or without them, so on the CPU the
  seconds go to the refinement; ``--iterations N`` turns the fine-tuning on;
- ``lr`` 1e-3: 3e-3 oscillates (Dice 0.39-0.62 from step to step), 1e-2 diverges, 5e-4 gains less
  in 30 steps (0.60 against 0.63 on the network grid);
- ``lambda_smooth`` 0.3 and ``alpha_div`` 0.03: Dice 0.67 against 0.66 (1 and 0.1), 0.64 (3 and
  0.3) and 0.65 (0.1 and 0.01), all without folding (26 TTO steps, before the refinement);
- refinement 40 steps at 4 mm, then 20 at 2 mm, regulariser weight 1 (`refinement.Settings`):
  Dice 0.786, folding 0.06 % (from the same affine and network field: weight 2 0.781 and 0.02 %,
  1.5 0.784; 60 steps at 4 mm alone 0.740; 12 steps at 2 mm 0.781; 4 and 3 mm 0.769; learning
  rate 0.2 0.790 but folding 0.23 %; smoothing window 3 0.773 and 0.19 %). The 2 mm level costs
  0.5-0.8 s a step, the 4 mm one under 0.1 s.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch

from ..device import resolve_device
from ..errors import InputError
from ..imageio.geometry import Geometry
from ..imageio.network_grid import RAS_DIRECTION, corner_points
from ..losses import divergence_l2, gradient_l2, multi_axis_mi_loss, ncc_loss
from ..nets import RegistrationUNet, student_unet, teacher_unet
from ..nets.layout import fast_layout
from ..spatial import affine_to_displacement, compose, index_affine_to_physical, warp
from ..timing import Stopwatch
from ..weights import load_into
from . import refinement
from .adam import Adam
from .affine_stage import affine_or_identity, expected_seconds
from .base import Inputs, Options, ProgressCallback, Result
from .catalogue import method_info
from .common import prepare_pair, result_from_field, result_from_network_field
from .options import REFINE_LEVELS, validate_options

NETWORKS = {"teacher": teacher_unet, "student": student_unet}
NETWORK_CHOICES = (*NETWORKS, "none")
WEIGHT_NAMES = {"teacher": "tto_teacher", "student": "tto_student"}
DEFAULT_ITERATIONS = {"cpu": 0, "cuda": 100}
DEFAULT_SPACING = {"cpu": 3.0, "cuda": 2.0}
GRID_MULTIPLE = 16

# Rough costs (seconds, one busy CPU core) used to give each stage a share of the progress bar
# proportional to its expected duration, so a time-left estimate from the bar's rate holds:
# the affine stage (`affine_stage.expected_seconds`), a TTO step per network voxel, resampling per fixed voxel,
# a refinement step per voxel of its level before the crop to the foreground (measured on one CPU core beside a
# training run: a TTO step 2.1 s at 48 x 64 x 48, the sample pair's refinement 7.6 s; on the benchmark pair
# 13-16 s for 40 steps at 4 mm and 20 at 2 mm at load 8).
_COST_STEP_PER_VOXEL = {"cpu": 1.4e-5, "cuda": 2e-7}
_COST_RESAMPLING_PER_VOXEL = 5e-7
_COST_REFINE_STEP_PER_VOXEL = {"cpu": 4.5e-7, "cuda": 2e-8}
_STAGE_ORDER = ("preparing", "affine", "test-time optimisation", "inference", "refinement", "resampling")


def network_grid_shape(geometry: Geometry, spacing: float) -> tuple[float, tuple[int, int, int]]:
    """Spacing and shape of the network grid: sizes the nearest multiples of 16, covering the field of view.

    For each axis the number of voxels spanning the fixed image's extent at ``spacing`` is rounded to
    the nearest multiple of 16 (at least 16); the spacing is then raised, if needed, so the grid
    still spans the whole extent.
    """
    if not spacing > 0:
        raise InputError(f"the tto network spacing must be a positive number of mm; got {spacing}")
    corners = corner_points(geometry) @ RAS_DIRECTION
    extent = corners.max(axis=0) - corners.min(axis=0)
    shape = tuple(max(GRID_MULTIPLE, GRID_MULTIPLE * round((e / spacing + 1.0) / GRID_MULTIPLE)) for e in extent)
    fit = max(e / (n - 1) for e, n in zip(extent, shape))
    return max(float(spacing), float(fit)), shape


def build_network(kind: str) -> RegistrationUNet:
    """A fresh teacher or student U-Net (seed 004 section 2.1.1, appendix H)."""
    if kind not in NETWORKS:
        raise InputError(f"the tto network must be one of {sorted(NETWORKS)}; got {kind!r}")
    return NETWORKS[kind]()


def predict(net: torch.nn.Module, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Displacement ``(B, 3, I, J, K)`` (network voxels) registering ``moving`` to ``fixed``: input ``cat([moving, fixed])``."""
    return net(torch.cat([moving, fixed], dim=1))


def sublattice(x: torch.Tensor, stride: int, offset: tuple[int, int, int]) -> torch.Tensor:
    """Every ``stride``-th voxel of ``x (B, C, I, J, K)`` along each axis, starting at ``offset``."""
    if stride == 1:
        return x
    return x[:, :, offset[0]::stride, offset[1]::stride, offset[2]::stride]


def random_offset(stride: int, generator: torch.Generator) -> tuple[int, int, int]:
    """A random sub-lattice offset in ``[0, stride)^3``."""
    return tuple(int(v) for v in torch.randint(stride, (3,), generator=generator))


def multi_axis_mi(fixed: torch.Tensor, warped: torch.Tensor, bins: int, stride: int, generator: torch.Generator) -> torch.Tensor:
    """Negative MultiAxisMI (appendix A, eq. 3) on a random ``stride`` sub-lattice (``stride = 1``: every voxel)."""
    offset = random_offset(stride, generator) if stride > 1 else (0, 0, 0)
    return multi_axis_mi_loss(sublattice(fixed, stride, offset), sublattice(warped, stride, offset), bins=bins)


def tto_loss(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    disp: torch.Tensor,
    lambda_smooth: float,
    alpha_div: float,
    bins: int,
    stride: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_TTO`` of section 2.3 (lambda_sim = 1) and its terms."""
    warped = warp(moving, disp)
    mami = multi_axis_mi(fixed, warped, bins, stride, generator)
    ncc = ncc_loss(fixed, warped)  # appendix B, eq. 4
    smooth = gradient_l2(disp)
    div = divergence_l2(disp)
    loss = mami + ncc + lambda_smooth * smooth + alpha_div * div  # section 2.3, L_TTO
    terms = {"multi_axis_mi": mami.item(), "ncc": ncc.item(), "smooth": smooth.item(), "divergence": div.item()}
    return loss, terms


def _settings(options: Options, device: str) -> dict[str, Any]:
    """The method's settings: its declared options (`options.OPTIONS['tto']`) checked, device defaults where
    "auto", and the run's iteration count and time budget (none by default: the result does not depend on the clock)."""
    s = validate_options("tto", options.extra)
    levels = REFINE_LEVELS.get(device, REFINE_LEVELS["cuda"])
    for key in ("spacings", "iterations"):
        if s[f"refine_{key}"] is None:
            s[f"refine_{key}"] = levels[key]
    s["refine_spacings"], s["refine_iterations"] = tuple(s["refine_spacings"]), tuple(s["refine_iterations"])
    iterations = DEFAULT_ITERATIONS.get(device, DEFAULT_ITERATIONS["cuda"]) if options.iterations is None else options.iterations
    if int(iterations) < 0 or (options.time_budget is not None and not float(options.time_budget) >= 0):
        raise InputError(f"iterations and time budget must be >= 0; got {iterations} and {options.time_budget}")
    s["iterations"] = int(iterations)
    s["time_budget"] = None if options.time_budget is None else float(options.time_budget)
    return s


def refinement_settings(s: dict[str, Any]) -> refinement.Settings:
    """The refinement stage's settings from the method's (``refine_*`` options)."""
    settings = refinement.Settings(
        spacings=s["refine_spacings"],
        iterations=s["refine_iterations"],
        similarity=s["refine_similarity"],
        window_mm=s["refine_window_mm"],
        regulariser=s["refine_regulariser"],
        weight=s["refine_weight"],
        lr=s["refine_lr"],
        smoothing=s["refine_smoothing"],
        field=s["refine_field"],
        mi_bins=s["mi_bins"],
        mi_stride=s["mi_stride"],
    )
    settings.check()
    return settings


class Deadline:
    """The user's time budget for the optimisation stages (test-time optimisation and refinement); None: no budget.

    `allows` says whether a step expected to last ``step_s`` seconds still ends within the budget.
    """

    def __init__(self, budget_s: float | None) -> None:
        self.budget_s = budget_s
        self.end = None if budget_s is None else time.perf_counter() + budget_s
        self.cut: list[str] = []

    def allows(self, step_s: float) -> bool:
        return self.end is None or time.perf_counter() + step_s <= self.end


class _Progress:
    """Maps each stage's own [0, 1] onto its share of the overall bar, never going backwards.

    Shares are proportional to the stages' expected durations (`plan`); until `plan` is called
    only "preparing" is reported, on the first 2 % of the bar.
    """

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.last = 0.0
        self.spans: dict[str, tuple[float, float]] = {"preparing": (0.0, 0.02)}

    def plan(self, seconds: dict[str, float]) -> None:
        """Give the stages after "preparing" shares of the remaining bar proportional to ``seconds``."""
        low = self.spans["preparing"][1]
        total = sum(seconds.values()) or 1.0
        for stage in _STAGE_ORDER[1:]:
            high = low + (1.0 - self.spans["preparing"][1]) * seconds.get(stage, 0.0) / total
            self.spans[stage] = (low, high)
            low = high
        self.spans["resampling"] = (self.spans["resampling"][0], 1.0)

    def __call__(self, fraction: float, stage: str) -> None:
        low, high = self.spans[stage]
        self.last = max(self.last, low + (high - low) * min(1.0, max(0.0, float(fraction))))
        if self.callback is not None:
            self.callback(self.last, stage)


def _refinement_cost(inputs: Inputs, settings: refinement.Settings | None, device: str) -> float:
    """Rough seconds of the refinement stage: steps x voxels of each level (for the progress bar's shares)."""
    if settings is None:
        return 0.0
    voxel_mm3 = float(np.prod(inputs.fixed.geometry.spacing))
    voxels = float(np.prod(inputs.fixed.geometry.shape))
    per_voxel = _COST_REFINE_STEP_PER_VOXEL.get(device, _COST_REFINE_STEP_PER_VOXEL["cuda"])
    return sum(n * per_voxel * voxels * voxel_mm3 / s**3 for s, n in zip(settings.spacings, settings.iterations))


class TTOMethod:
    """The tto method (see the module docstring)."""

    info = method_info("tto")

    def register(self, inputs: Inputs, options: Options, progress: ProgressCallback | None = None) -> Result:
        """Register ``inputs.moving`` onto ``inputs.fixed`` (see the module docstring)."""
        device = resolve_device(options.device)
        s = _settings(options, device.type)
        refine_settings = refinement_settings(s) if s["refine"] else None
        if s["spacing"] is None:
            s["spacing"] = DEFAULT_SPACING.get(device.type, DEFAULT_SPACING["cuda"])
        use_network = s["network"] != "none"
        report = _Progress(progress)
        watch = Stopwatch()
        generator = torch.Generator().manual_seed(int(options.seed))
        torch.manual_seed(int(options.seed))
        deadline = Deadline(s["time_budget"])

        report(0.0, "preparing")
        with watch.step("network grid"):
            spacing, shape = network_grid_shape(inputs.fixed.geometry, s["spacing"])
            pair = prepare_pair(inputs, device, spacing=spacing, shape=shape)
        checksum = None
        if use_network:
            with watch.step("weights"):
                net = build_network(s["network"])
                checksum = load_into(net, WEIGHT_NAMES[s["network"]])
                net = fast_layout(net, device).eval()
        report(1.0, "preparing")
        step = _COST_STEP_PER_VOXEL.get(device.type, _COST_STEP_PER_VOXEL["cuda"]) * float(np.prod(shape))
        tto_steps = s["iterations"] if use_network and s["tto"] else 0
        report.plan({
            "affine": 0.0 if s["affine"] == "none" else expected_seconds(shape, s["affine_iterations"]),
            "test-time optimisation": tto_steps * step,
            "inference": step / 2.0 if use_network else 0.0,
            "refinement": _refinement_cost(inputs, refine_settings, device.type),
            "resampling": _COST_RESAMPLING_PER_VOXEL * float(np.prod(inputs.fixed.geometry.shape)) + 0.5,
        })

        with watch.step("affine stage"):
            affine_index = affine_or_identity(
                pair.fixed, pair.moving, s["affine"], s["affine_iterations"], int(options.seed),
                progress=lambda f, _stage: report(f, "affine"),
            )
            affine_disp = affine_to_displacement(torch.as_tensor(affine_index, dtype=torch.float32, device=device), shape)

        details: dict[str, Any] = {
            "network": s["network"],
            "network_grid": {"shape": list(shape), "spacing_mm": spacing},
            "settings": {k: s[k] for k in sorted(s)},
            "stages": ["affine"] if s["affine"] != "none" else [],
            "iterations_done": 0,
        }
        disp = None
        if use_network:
            details["stages"].append("network")
            moved = warp(pair.moving, affine_disp)
            if tto_steps > 0:
                with watch.step("test-time optimisation"):
                    net, history = self._optimise(net, pair.fixed, moved, s, generator, report, deadline)
                details["stages"].append("test-time optimisation")
                details["iterations_done"] = len(history)
                details["loss_history"] = [h["loss"] for h in history]
                if len(history) < s["iterations"]:
                    deadline.cut.append(f"test-time optimisation after {len(history)} of {s['iterations']} steps")
                if history:
                    details["initial_loss"] = history[0]["loss"]
                    details["initial_terms"] = {k: v for k, v in history[0].items() if k != "loss"}
            with watch.step("network"), torch.no_grad():
                disp = predict(net.eval(), pair.fixed, moved)
                if tto_steps > 0:
                    loss, terms = tto_loss(
                        pair.fixed, moved, disp, s["lambda_smooth"], s["alpha_div"], s["mi_bins"], s["mi_stride"], generator
                    )
                    details["final_loss"], details["final_terms"] = loss.item(), terms
            report(1.0, "inference")

        if refine_settings is not None:
            affine = index_affine_to_physical(affine_index, pair.grid, pair.grid)
            with watch.step("refinement"):
                refined = refinement.refine(
                    inputs.fixed, inputs.moving, affine, None if disp is None else (disp, pair.grid), refine_settings, device,
                    seed=int(options.seed), progress=lambda f: report(f, "refinement"), allows=deadline.allows,
                )
            report(1.0, "refinement")
            details["stages"].append("refinement")
            details["refinement"] = {"similarity": refined.similarity, "levels": refined.levels}
            done, planned = sum(level["iterations"] for level in refined.levels), sum(refine_settings.iterations)
            if done < planned:
                deadline.cut.append(f"refinement after {done} of {planned} steps")

        report(0.0, "resampling")
        if refine_settings is not None:
            with watch.step("field to fixed grid"):
                whole = refined.whole_field(inputs.fixed.geometry)
            result = result_from_field(inputs, whole, affine, watch, device)
        else:
            total = affine_disp if disp is None else compose(affine_disp, disp.detach())
            result = result_from_network_field(inputs, pair.grid, total, affine_index, watch)
        report(1.0, "resampling")
        details["timings"], details["cpu_timings"] = watch.seconds, watch.cpu_seconds
        details["stopped_by"] = "time budget" if deadline.cut else "iterations"
        if deadline.cut:
            result.messages.append(
                f"the time budget of {s['time_budget']:g} s cut the optimisation short ({'; '.join(deadline.cut)}): "
                "the result depends on how busy the machine was; run without a time budget for a reproducible result"
            )
        result.weights = {WEIGHT_NAMES[s["network"]]: checksum} if use_network else {}
        result.details = details
        return result

    @staticmethod
    def _optimise(
        net: torch.nn.Module,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        s: dict[str, Any],
        generator: torch.Generator,
        report: _Progress,
        deadline: Deadline,
    ) -> tuple[torch.nn.Module, list[dict[str, float]]]:
        """Fine-tune a copy of ``net`` on the pair (section 2.3, eq. 2); returns it and the loss history."""
        tuned = copy.deepcopy(net).train()
        for parameter in tuned.parameters():
            parameter.requires_grad_(True)
        optimiser = Adam(list(tuned.parameters()), lr=s["lr"])
        history: list[dict[str, float]] = []
        last_step = 0.0
        while len(history) < s["iterations"] and deadline.allows(last_step):
            step_start = time.perf_counter()
            optimiser.zero_grad()
            disp = predict(tuned, fixed, moving)
            loss, terms = tto_loss(
                fixed, moving, disp, s["lambda_smooth"], s["alpha_div"], s["mi_bins"], s["mi_stride"], generator
            )
            loss.backward()
            optimiser.step()
            history.append({"loss": loss.item(), **terms})
            last_step = time.perf_counter() - step_start
            report(len(history) / s["iterations"], "test-time optimisation")
        report(1.0, "test-time optimisation")
        return tuned, history


METHOD = TTOMethod()

__all__ = ["METHOD", "TTOMethod", "build_network", "network_grid_shape", "predict", "tto_loss"]
