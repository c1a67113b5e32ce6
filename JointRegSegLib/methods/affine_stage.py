"""A fast multi-resolution affine registration on the network grid (the tto method's first stage).

`fit_affine` optimises a 12-parameter affine with Adam on average-pooled copies of the images,
coarse to fine, and returns the 4x4 matrix on voxel indices of the network grid (fixed index ->
moving index, pull convention, see `JointRegSegLib.spatial.affine`).

Choices (the tto paper registers images that are already roughly aligned and says nothing about
an affine stage; these are ours):

- parameters: translation t (3), rotation angles (3, radians, ``R = R_2 R_1 R_0`` as
  `spatial.affine_matrix`), log-scales (3) and shears (3, upper triangle), composed as
  ``p -> R Sh diag(exp(s)) (p - c) + c + t0 + t``. The centre ``c`` is the fixed image's intensity
  centre of mass ("the image centre" of the object rather than of the grid: rotations then barely
  move the anatomy's centre, which decouples rotation from translation). ``t0`` is the
  centre-of-mass initialisation (moving centre of mass minus fixed centre of mass); the optimised
  parameters start at zero (identity after ``t0``);
- units: the translation is optimised in units of the radius ``r`` (half the mean grid size, in
  voxels) so that one unit of every parameter moves the image border by about ``r`` voxels;
  Adam's per-parameter step (about the learning rate) then means the same displacement for every
  parameter;
- pyramid: ``levels`` average-pooling factors, coarse to fine (default 4, 2, 1); on a pooled grid
  cell ``q`` covers the full-grid voxels ``f q .. f q + f - 1``, centre ``f q + (f - 1) / 2``, which
  is how the matrix is carried to the pooled grid. On the benchmark pair at 2 mm, finishing at the
  full network resolution beat stopping at 4 mm (mean Dice about 0.61 against 0.58);
- loss: global Parzen normalised mutual information (``"nmi"``, the contrast-robust default),
  Studholme's ``(H(F) + H(W)) / H(F, W)`` from a 32-bin joint histogram with a Gaussian Parzen
  window (bin centres ``linspace(0, 1, 32)``, weights normalised per sample as MONAI's kernel, sd
  0.35 of a bin); or plain Parzen MI (``"mi"``, `losses.mi_loss`, sd half a bin); or global NCC
  (``"ncc"``, `losses.ncc_loss`, same-contrast pairs). Why NMI with a narrow kernel: a wide
  Parzen kernel smooths the joint histogram so much that, on volumes with much background, the
  (N)MI rewards zooming into the moving image (on the 48^3 test volume, 85 % background, Parzen
  MI with sd 0.5 bin preferred a solution scaled 8 % too small, NMI with sd 0.5 bin still 1.5 %,
  0.2 voxel; with sd 0.35 the error is 0.04 voxel); narrower kernels (0.25) made the benchmark pair
  noisier (Dice 0.48-0.61 over seeds);
- sampling: each iteration evaluates the loss at ``samples`` voxels of the pooled fixed grid (all
  when there are fewer) drawn afresh without replacement from a seeded generator (deterministic;
  successive slices of one permutation, `_Draws`): the Parzen window costs samples x bins per
  evaluation (only the 5 bins around a sample's own get a weight, the rest are below float32's
  rounding: `losses.parzen_nmi`), and re-drawing every iteration averages the sampling noise out
  (a fixed sample set gave Dice 0.58-0.62 over seeds on the benchmark pair, re-drawing 0.61-0.63;
  ANTs affine: 0.61). The moving image is sampled at the mapped points
  only. Outside the moving image the warped value is the nearest edge value (border padding):
  zero padding adds an intensity class that the moving image's background may not have (e.g. an
  inverted contrast), which biased the fit on the test volume by almost 2 voxels;
- gradient: for NMI written out (`losses.parzen_nmi.ParzenNMI.loss_and_gradient`, the moving image's trilinear
  slope at the mapped points `spatial.sampling.trilinear_with_gradient`, the matrix's derivative by the parameters
  `spatial.affine_jacobian`), the same numbers as autograd's to float32 rounding; autograd's graph of about a hundred
  small operations a step cost more than the arithmetic (hof's stage on the benchmark pair, one thread: 1.59 ->
  1.13 s, median of 16 seeds). MI and NCC take autograd's derivative by the mapped points, then the same chain;
- schedule: per level, Adam with a learning rate decayed by a cosine from the level's rate to a tenth of it;
  the level's rate is ``lr (f / f_0) ** LEVEL_LR_POWER`` (``f_0`` the coarsest pooling): 0.02, 0.0071 and 0.0025
  for the default levels. With ``lr`` at every level, each finer level's first steps (Adam makes a step's size about
  the rate, whatever the gradient) moved the image by up to 0.7 voxels on noisy 8000-sample gradients, and the
  finest level left the affine worse and seed-dependent. On the benchmark pair (hof's 3 mm grid, seeds 0-15,
  `experiments.affine_seeds`), the label maps' mean Dice after the affine alone: 0.51-0.53 after the middle level
  (4 seeds), after the finest 0.518 (sd 0.022, least 0.468) with autograd's gradient and 0.510 (sd 0.044, least
  0.366) with the written-out one, whose rounding differs. Rates 1, 0.5, 0.25 times ``lr``: 0.529 (sd 0.013);
  this power's (1, 0.35, 0.125): 0.531 (sd 0.009, least 0.514); 1, 0.5, 0.1: 0.535 (sd 0.011). hof's Dice on the
  pair over seeds 0-15 became 0.621-0.647 (mean 0.635), from 0.571-0.652 (mean 0.626). The default iteration
  counts (150, 60, 30) converged on the benchmark pair at 2 mm (80 x 96 x 112) in 3-6 s on one busy CPU core;
- threads: every step works on ``samples`` points, so it runs on one CPU thread (`device.threads_for`;
  with two, every small operation waits at a barrier, twice as slow on a busy machine);
- progress: an iteration counts by its expected cost (`step_cost`). Measured per step on one CPU
  core beside two training runs (network grids of the sample and the benchmark pair at 3 and 2 mm,
  pooling 4, 2 and 1: 15-39 ms, without a trend in the grid's size since the windowed Parzen weights
  and the permutation per pass): fitted as 10 ms + 2 us per sample. (Before, a Parzen weight per bin
  and a permutation of the pooled grid per step cost 35-99 ms at pooling 1.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..device import threads_for
from ..errors import InputError
from ..losses import mi_loss, ncc_loss
from ..losses.parzen_nmi import NMI_BINS, ParzenNMI
from ..spatial import affine_from_radians, affine_jacobian, identity_grid, sample_at_indices
from ..spatial.sampling import trilinear_with_gradient
from .adam import Adam
from .base import ProgressCallback
from .options import AFFINE_ITERATIONS

LOSSES = ("nmi", "mi", "ncc")
DEFAULT_ITERATIONS = AFFINE_ITERATIONS
DEFAULT_LEVELS = (4, 2, 1)
DEFAULT_LR = 0.02
LEVEL_LR_POWER = 1.5  # a level's rate: lr x (its pooling / the coarsest's) ** this (module docstring)
DEFAULT_SAMPLES = 8000
STEP_SECONDS = (1.0e-2, 2.0e-6)  # one iteration: fixed, per sample (`step_cost`)


def _matrix(params: np.ndarray, centre: np.ndarray, t0: np.ndarray, radius: float) -> np.ndarray:
    """4x4 index affine of the 12 parameters (see the module docstring)."""
    return affine_from_radians(params[3:6], t0 + params[0:3] * radius, np.exp(params[6:9]), params[9:12], centre)


def _parameter_gradient(
    d_mapped: torch.Tensor, points: torch.Tensor, pooling: tuple[np.ndarray, np.ndarray], params: np.ndarray,
    centre: np.ndarray, radius: float,
) -> np.ndarray:
    """The loss's derivative by the 12 parameters from its derivative by each mapped point ``d_mapped (n, 3)``, the
    pooled grid's ``points (n, 3)`` mapped by ``unpool @ _matrix(params) @ pool`` (``pooling = (pool, unpool)``):
    ``sum_i d_i (p_i, 1)^T`` by that matrix's top rows, carried through the pooling matrices (their last rows 0 0 0 1)
    and `spatial.affine_jacobian` (the translation in units of ``radius``, the scales as logarithms)."""
    pool, unpool = pooling
    d_pooled = d_mapped.double().cpu().T @ torch.cat([points, torch.ones(len(points), 1, dtype=points.dtype)], dim=1)
    d_matrix = unpool[:3, :3].T @ d_pooled.numpy() @ pool.T
    jacobian = affine_jacobian(params[3:6], np.exp(params[6:9]), params[9:12], centre)
    chain = np.concatenate([np.full(3, radius), np.ones(3), np.exp(params[6:9]), np.ones(3)])
    return chain * np.einsum("prc,rc->p", jacobian, d_matrix)


def _centre_of_mass(image: torch.Tensor) -> torch.Tensor:
    """Intensity centre of mass (voxel indices, float64) of ``image (1, 1, I, J, K)``; the grid centre if empty."""
    weights = image[0, 0].double().clamp_min(0.0)
    total = weights.sum()
    shape = weights.shape
    if float(total) <= 0.0:
        return torch.tensor([(n - 1) / 2.0 for n in shape], dtype=torch.float64)
    coms = []
    for axis in range(3):
        profile = weights.sum(dim=tuple(a for a in range(3) if a != axis))
        coms.append((profile * torch.arange(shape[axis], dtype=torch.float64, device=weights.device)).sum() / total)
    return torch.stack(coms).cpu()


def _pool_matrix(factor: int) -> torch.Tensor:
    """4x4 taking a pooled-grid index ``q`` to the full-grid index ``f q + (f - 1) / 2``."""
    s = torch.eye(4, dtype=torch.float64)
    s[:3, :3] *= factor
    s[:3, 3] = (factor - 1) / 2.0
    return s


class _Draws:
    """The flat indices of ``samples`` of a grid's ``voxels`` per call, drawn without replacement; None (every voxel)
    when there are fewer voxels.

    Successive calls take successive slices of one random permutation of the voxels, and a new permutation
    when it runs out: each call's set is a uniform random subset, and the calls of one pass never repeat
    a voxel. One permutation per pass, not per call: a permutation per call cost more than the rest of the step at
    the finest level of a 2 mm grid. The caller reads its tables at the indices (`_rows`): 8192 values and points a
    call cost less than putting whole tables in the permutation's order (``index_select`` of a (voxels, 3) table:
    13 ms for the 409,600 voxels of hof's network grid).
    """

    def __init__(self, voxels: int, samples: int, generator: torch.Generator) -> None:
        self.voxels, self.samples, self.generator = int(voxels), min(int(samples), int(voxels)), generator
        self.order, self.next = torch.arange(0), self.voxels

    def __call__(self) -> torch.Tensor | None:
        if self.samples == self.voxels:
            return None
        if self.next + self.samples > self.voxels:
            self.order, self.next = torch.randperm(self.voxels, generator=self.generator), 0
        self.next += self.samples
        return self.order[self.next - self.samples : self.next]


def _rows(indices: torch.Tensor | None, values: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid points ``(n, 3)`` (float64 voxel indices) and ``values`` of the voxels with flat ``indices`` of a grid
    of ``shape`` (every voxel where None)."""
    if indices is None:
        return identity_grid(shape, dtype=torch.float64).reshape(3, -1).T, values
    j_k = int(shape[1]) * int(shape[2])
    points = torch.stack([indices // j_k, indices // int(shape[2]) % int(shape[1]), indices % int(shape[2])], dim=1)
    return points.double(), values.take(indices.to(values.device))


def _check(fixed: torch.Tensor, moving: torch.Tensor, iterations: Sequence[int], levels: Sequence[int], loss: str) -> None:
    if fixed.ndim != 5 or fixed.shape[:2] != (1, 1) or moving.shape != fixed.shape:
        raise InputError(
            f"fit_affine needs fixed and moving images shaped (1, 1, I, J, K) on one grid; got "
            f"{tuple(fixed.shape)} and {tuple(moving.shape)}"
        )
    if loss not in LOSSES:
        raise InputError(f"affine loss must be one of {LOSSES}; got {loss!r}")
    if not levels or any(int(f) < 1 for f in levels):
        raise InputError(f"affine pyramid levels must be positive pooling factors such as (4, 2); got {tuple(levels)}")
    if len(iterations) != len(levels) or any(int(n) < 0 for n in iterations):
        raise InputError(
            f"give one non-negative iteration count per pyramid level {tuple(levels)}; got {tuple(iterations)}"
        )
    for factor in levels:
        if min(n // int(factor) for n in fixed.shape[2:]) < 4:
            raise InputError(
                f"the image {tuple(fixed.shape[2:])} is too small for pooling by {factor}: use smaller pyramid levels"
            )


def step_cost(shape: Sequence[int], factor: int, samples: int = DEFAULT_SAMPLES) -> float:
    """Expected seconds of one iteration at pooling ``factor`` of a grid of ``shape`` (one CPU core, see the module docstring)."""
    voxels = float(np.prod([n // factor for n in shape]))
    fixed, per_sample = STEP_SECONDS
    return fixed + per_sample * min(float(samples), voxels)


def expected_seconds(
    shape: Sequence[int], iterations: int | Sequence[int] = DEFAULT_ITERATIONS, levels: Sequence[int] = DEFAULT_LEVELS,
    samples: int = DEFAULT_SAMPLES,
) -> float:
    """Expected seconds of `fit_affine` on a grid of ``shape`` (one CPU core; for progress shares, not a promise)."""
    counts = (int(iterations),) * len(levels) if isinstance(iterations, int) else tuple(int(n) for n in iterations)
    return sum(n * step_cost(shape, f, samples) for f, n in zip(levels, counts))


def affine_or_identity(
    fixed: torch.Tensor, moving: torch.Tensor, loss: str, iterations: int | Sequence[int], seed: int,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """`fit_affine` with ``loss``, or the identity when a method's ``affine`` option is ``"none"``."""
    if loss == "none":
        return np.eye(4)
    return fit_affine(fixed, moving, iterations=iterations, loss=loss, seed=seed, progress=progress)


def fit_affine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    iterations: int | Sequence[int] = DEFAULT_ITERATIONS,
    levels: Sequence[int] = DEFAULT_LEVELS,
    loss: str = "nmi",
    lr: float | Sequence[float] = DEFAULT_LR,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Affine 4x4 on network voxel indices (fixed index -> moving index) aligning ``moving`` to ``fixed``.

    ``fixed`` and ``moving`` are ``(1, 1, I, J, K)`` tensors in [0, 1] on one grid. ``iterations`` is
    one count per pyramid level (or one count for every level); ``levels`` are average-pooling
    factors, coarse to fine; ``loss`` is ``"nmi"`` or ``"mi"`` (any contrasts) or ``"ncc"`` (same contrast);
    ``samples`` voxels per level (drawn with ``seed``) enter the loss; ``lr`` is Adam's initial rate at the coarsest
    level (the finer levels' follow, module docstring), or one rate per level.
    ``progress(fraction, "affine")`` is called after every iteration, the fraction of the expected cost done.
    """
    levels = tuple(int(f) for f in levels)
    iterations = (int(iterations),) * len(levels) if isinstance(iterations, int) else tuple(int(n) for n in iterations)
    rates = tuple(float(lr) * (f / levels[0]) ** LEVEL_LR_POWER for f in levels) if np.isscalar(lr) else tuple(map(float, lr))
    _check(fixed, moving, iterations, levels, loss)
    if len(rates) != len(levels) or min(rates) <= 0:
        raise InputError(f"give one positive learning rate, or one per pyramid level {levels}; got {lr}")
    with threads_for(samples, fixed.device):  # each step works on ``samples`` points: one thread is faster
        return _fit(fixed, moving, iterations, levels, loss, rates, samples, seed, progress)


def _fit(
    fixed: torch.Tensor, moving: torch.Tensor, iterations: tuple[int, ...], levels: tuple[int, ...], loss: str,
    rates: tuple[float, ...], samples: int, seed: int, progress: ProgressCallback | None,
) -> np.ndarray:
    """`fit_affine`'s optimisation, its arguments checked."""
    fixed = fixed.detach().float()
    moving = moving.detach().float()
    shape = fixed.shape[2:]
    centre = _centre_of_mass(fixed).numpy()
    t0 = _centre_of_mass(moving).numpy() - centre
    radius = float(np.mean([(n - 1) / 2.0 for n in shape]))
    params = torch.zeros(12, dtype=torch.float64)
    generator = torch.Generator().manual_seed(int(seed))
    total, done = max(expected_seconds(shape, iterations, levels, samples), 1e-9), 0.0
    for factor, count, level_lr in zip(levels, iterations, rates):
        cost = step_cost(shape, factor, samples)
        fixed_l = F.avg_pool3d(fixed, factor) if factor > 1 else fixed
        moving_l = F.avg_pool3d(moving, factor) if factor > 1 else moving
        fixed_values = fixed_l.reshape(-1)
        pool = _pool_matrix(factor).numpy()
        unpool = np.linalg.inv(pool)
        optimiser = Adam([params], lr=level_lr)
        nmi = ParzenNMI() if loss == "nmi" and count > 0 else None
        draw = _Draws(fixed_values.numel(), samples, generator)
        # a grid with fewer voxels than the samples: the same tensors each step, their Parzen weights kept
        every = _rows(None, fixed_values, fixed_l.shape[2:]) if draw.samples == draw.voxels else None
        for step in range(count):
            optimiser.lr = level_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * step / max(count, 1))))
            indices = draw()
            points, values = every if indices is None else _rows(indices, fixed_values, fixed_l.shape[2:])
            matrix = torch.from_numpy(unpool @ _matrix(params.numpy(), centre, t0, radius) @ pool)  # on the pooled grid
            mapped = (points @ matrix[:3, :3].T + matrix[:3, 3]).float().to(fixed.device)
            if nmi is not None:
                d_mapped = _nmi_gradient(nmi.select(values), moving_l, mapped)
            else:
                d_mapped = _autograd_gradient(loss, values, moving_l, mapped)
            params.grad = torch.from_numpy(_parameter_gradient(d_mapped, points, (pool, unpool), params.numpy(), centre, radius))
            optimiser.step()
            done += cost
            if progress is not None:
                progress(min(done / total, 1.0), "affine")
    return _matrix(params.numpy(), centre, t0, radius)


def _nmi_gradient(nmi: ParzenNMI, moving: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
    """d(-NMI)/d(each mapped point) ``(n, 3)``: the loss's derivative by each warped value (`ParzenNMI`) times the
    moving image's trilinear slope there (`trilinear_with_gradient`), the chain rule autograd would apply."""
    warped, slope = trilinear_with_gradient(moving[0, 0], mapped)
    _, d_warped = nmi.loss_and_gradient(warped)
    return d_warped[:, None] * slope


def _autograd_gradient(loss: str, values: torch.Tensor, moving: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
    """d loss/d(each mapped point) ``(n, 3)`` of the MI or NCC loss, by autograd."""
    mapped = mapped.detach().requires_grad_(True)
    warped = sample_at_indices(moving, mapped.view(1, 1, 1, -1, 3), padding_mode="border")
    target = values.view(1, 1, 1, 1, -1)
    value = mi_loss(target, warped, bins=NMI_BINS) if loss == "mi" else ncc_loss(target, warped)
    return torch.autograd.grad(value, mapped)[0]
