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
  rounding: `_ParzenNMI._weights`), and re-drawing every iteration averages the sampling noise out
  (a fixed sample set gave Dice 0.58-0.62 over seeds on the benchmark pair, re-drawing 0.61-0.63;
  ANTs affine: 0.61). The moving image is sampled at the mapped points
  only. Outside the moving image the warped value is the nearest edge value (border padding):
  zero padding adds an intensity class that the moving image's background may not have (e.g. an
  inverted contrast), which biased the fit on the test volume by almost 2 voxels;
- schedule: per level, Adam with a learning rate decayed by a cosine from ``lr`` to ``lr / 10``;
  the default iteration counts (150, 60, 30) converged on the benchmark pair at 2 mm (80 x 96 x
  112) in 3-6 s on one busy CPU core;
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
from ..spatial import identity_grid, sample_at_indices
from .adam import Adam
from .base import ProgressCallback
from .options import AFFINE_ITERATIONS

LOSSES = ("nmi", "mi", "ncc")
NMI_BINS = 32
NMI_SIGMA_RATIO = 0.35
PARZEN_REACH = 2  # bins each side of a sample's nearest bin that get a Parzen weight (`_ParzenNMI._weights`)
DEFAULT_ITERATIONS = AFFINE_ITERATIONS
DEFAULT_LEVELS = (4, 2, 1)
DEFAULT_LR = 0.02
DEFAULT_SAMPLES = 8000
CACHED_WEIGHTS = 16_000_000
STEP_SECONDS = (1.0e-2, 2.0e-6)  # one iteration: fixed, per sample (`step_cost`)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """``R = R_2 R_1 R_0`` (radians), the convention of `spatial.affine_matrix`."""
    rotation = torch.eye(3, dtype=angles.dtype)
    for axis in range(3):
        a, b = (axis + 1) % 3, (axis + 2) % 3
        c, s = torch.cos(angles[axis]), torch.sin(angles[axis])
        r = torch.eye(3, dtype=angles.dtype).clone()
        r = r.index_put((torch.tensor([a, b, a, b]), torch.tensor([a, b, b, a])), torch.stack([c, c, -s, s]))
        rotation = r @ rotation
    return rotation


def _matrix(params: torch.Tensor, centre: torch.Tensor, t0: torch.Tensor, radius: float) -> torch.Tensor:
    """4x4 index affine of the 12 parameters (see the module docstring), differentiable."""
    translation, angles, log_scale, shear = params[0:3] * radius, params[3:6], params[6:9], params[9:12]
    shear_m = torch.eye(3, dtype=params.dtype).index_put(
        (torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])), shear
    )
    linear = _rotation(angles) @ shear_m @ torch.diag(torch.exp(log_scale))
    offset = centre + t0 + translation - linear @ centre
    top = torch.cat([linear, offset[:, None]], dim=1)
    return torch.cat([top, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=params.dtype)], dim=0)


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


class _ParzenNMI:
    """Negative Studholme NMI between fixed samples and warped samples, Gaussian Parzen window.

    ``fixed`` holds the values of every fixed voxel; `select` gives the samples the next evaluations
    use. The fixed Parzen weights of all voxels (``all_fixed_weights``) are computed once when they fit in
    `CACHED_WEIGHTS` numbers (they are the same every iteration; `_fit` draws their rows with the samples), else
    for each selection.
    """

    def __init__(self, fixed: torch.Tensor, bins: int = NMI_BINS, sigma_ratio: float = NMI_SIGMA_RATIO) -> None:
        self.centres = torch.linspace(0.0, 1.0, bins, device=fixed.device)
        self.sigma = sigma_ratio / (bins - 1)
        fixed = fixed.reshape(-1)
        self.all_fixed_weights = self._weights(fixed) if fixed.numel() * bins <= CACHED_WEIGHTS else None
        self._selected: torch.Tensor | None = None

    def select(self, values: torch.Tensor, weights: torch.Tensor | None = None) -> "_ParzenNMI":
        """Use the fixed samples ``values`` (and their rows of ``all_fixed_weights``, where it is kept) from now on;
        the same tensor again (every voxel of a small grid, step after step) keeps its weights and entropy."""
        if values is self._selected:
            return self
        self._selected = values
        self.fixed_weights = weights if weights is not None else self._weights(values)
        self.fixed_entropy = self._entropy(self.fixed_weights.mean(dim=0))
        return self

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        """(samples, bins) Parzen weights, each row summing to 1.

        Only the ``2 PARZEN_REACH + 1`` bins around a sample's nearest one get a weight: a sample lies at
        most half a bin from its nearest centre, so every bin left out is at least ``PARZEN_REACH + 0.5``
        bins away, where the kernel is below ``exp(-0.5 (2.5 / 0.35)^2) = 8e-12`` of the nearest bin's
        (float32 rounding); ``2 PARZEN_REACH + 1`` exponentials per sample instead of one per bin.
        """
        bins = self.centres.numel()
        position = x.reshape(-1, 1).clamp(0.0, 1.0) * (bins - 1)  # in bins
        window = position.detach().round().long() + torch.arange(-PARZEN_REACH, PARZEN_REACH + 1, device=x.device)
        inside = (window >= 0) & (window < bins)
        k = torch.exp(-0.5 * ((position - window) / (self.sigma * (bins - 1))) ** 2) * inside
        k = k / k.sum(dim=1, keepdim=True)
        return torch.zeros(k.shape[0], bins, dtype=k.dtype, device=k.device).scatter_add_(1, window.clamp(0, bins - 1), k)

    @staticmethod
    def _entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(1e-12))).sum()

    def __call__(self, _fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        w = self._weights(warped)
        joint = self.fixed_weights.T @ w / w.shape[0]
        return -(self.fixed_entropy + self._entropy(joint.sum(dim=0))) / self._entropy(joint)


class _Draws:
    """The rows of ``tables`` (one row per voxel each: the grid's points, the fixed values, their Parzen weights) of
    ``samples`` voxels per call, drawn without replacement; every row (the tables themselves) when there are fewer
    voxels.

    Successive calls take successive slices of one random permutation of the voxels, and a new permutation
    when it runs out: each call's set is a uniform random subset, and the calls of one pass never repeat
    a voxel. The tables are put in the permutation's order once (``index_select``), so that each call's rows are a
    view of one block of them: one gather per table and permutation, not per call (gathering 8192 rows of 32
    Parzen weights took 0.53 ms a call, a quarter of segreg's affine stage; one permutation serves ``voxels //
    samples`` calls, 13 at segreg's 4 mm level). One permutation per pass, not per call: a permutation per call
    cost more than the rest of the step at the finest level of a 2 mm grid.
    """

    def __init__(self, tables: Sequence[torch.Tensor], samples: int, generator: torch.Generator) -> None:
        self.tables = tuple(tables)
        self.voxels = self.tables[0].shape[0]
        self.samples, self.generator = min(int(samples), self.voxels), generator
        self.shuffled, self.next = self.tables, self.voxels

    def __call__(self) -> tuple[torch.Tensor, ...]:
        if self.samples == self.voxels:
            return self.tables
        if self.next + self.samples > self.voxels:
            order = torch.randperm(self.voxels, generator=self.generator)
            self.shuffled, self.next = tuple(table.index_select(0, order.to(table.device)) for table in self.tables), 0
        self.next += self.samples
        return tuple(table[self.next - self.samples : self.next] for table in self.shuffled)


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
    lr: float = DEFAULT_LR,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Affine 4x4 on network voxel indices (fixed index -> moving index) aligning ``moving`` to ``fixed``.

    ``fixed`` and ``moving`` are ``(1, 1, I, J, K)`` tensors in [0, 1] on one grid. ``iterations`` is
    one count per pyramid level (or one count for every level); ``levels`` are average-pooling
    factors, coarse to fine; ``loss`` is ``"nmi"`` or ``"mi"`` (any contrasts) or ``"ncc"`` (same contrast);
    ``samples`` voxels per level (drawn with ``seed``) enter the loss; ``lr`` is Adam's initial rate.
    ``progress(fraction, "affine")`` is called after every iteration, the fraction of the expected cost done.
    """
    levels = tuple(int(f) for f in levels)
    iterations = (int(iterations),) * len(levels) if isinstance(iterations, int) else tuple(int(n) for n in iterations)
    _check(fixed, moving, iterations, levels, loss)
    with threads_for(samples, fixed.device):  # each step works on ``samples`` points: one thread is faster
        return _fit(fixed, moving, iterations, levels, loss, lr, samples, seed, progress)


def _fit(
    fixed: torch.Tensor, moving: torch.Tensor, iterations: tuple[int, ...], levels: tuple[int, ...], loss: str, lr: float,
    samples: int, seed: int, progress: ProgressCallback | None,
) -> np.ndarray:
    """`fit_affine`'s optimisation, its arguments checked."""
    fixed = fixed.detach().float()
    moving = moving.detach().float()
    shape = fixed.shape[2:]
    centre = _centre_of_mass(fixed)
    t0 = _centre_of_mass(moving) - centre
    radius = float(np.mean([(n - 1) / 2.0 for n in shape]))
    params = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    generator = torch.Generator().manual_seed(int(seed))
    total, done = max(expected_seconds(shape, iterations, levels, samples), 1e-9), 0.0
    for factor, count in zip(levels, iterations):
        cost = step_cost(shape, factor, samples)
        fixed_l = F.avg_pool3d(fixed, factor) if factor > 1 else fixed
        moving_l = F.avg_pool3d(moving, factor) if factor > 1 else moving
        grid_points = identity_grid(fixed_l.shape[2:], dtype=torch.float64).reshape(3, -1).T  # (voxels, 3)
        fixed_values = fixed_l.reshape(-1)
        pool, unpool = _pool_matrix(factor), torch.linalg.inv(_pool_matrix(factor))
        optimiser = Adam([params], lr=lr)
        nmi = _ParzenNMI(fixed_values) if loss == "nmi" and count > 0 else None
        cached = nmi is not None and nmi.all_fixed_weights is not None
        draw = _Draws((grid_points, fixed_values, *([nmi.all_fixed_weights] if cached else [])), samples, generator)
        for step in range(count):
            optimiser.lr = lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * step / max(count, 1))))
            points, values, *weights = draw()
            target = values.view(1, 1, 1, 1, -1)
            similarity = {"nmi": nmi.select(values, *weights) if nmi else None, "mi": lambda a, b: mi_loss(a, b, bins=NMI_BINS), "ncc": ncc_loss}[loss]
            optimiser.zero_grad()
            matrix = unpool @ _matrix(params, centre, t0, radius) @ pool  # the affine on the pooled grid
            mapped = (points @ matrix[:3, :3].T + matrix[:3, 3]).float().to(fixed.device)
            warped = sample_at_indices(moving_l, mapped.view(1, 1, 1, -1, 3), padding_mode="border")
            value = similarity(target, warped)
            value.backward()
            optimiser.step()
            done += cost
            if progress is not None:
                progress(min(done / total, 1.0), "affine")
    with torch.no_grad():
        return _matrix(params, centre, t0, radius).numpy()
