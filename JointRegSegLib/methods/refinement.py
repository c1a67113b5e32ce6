"""Refinement: a deformable field optimised directly on the fixed image's grid, coarse to fine.

Any method with an affine and (optionally) a deformable field can hand them to `refine`, which
improves the field by instance optimisation and returns the whole mapping on the fixed grid.

The mapping of a fixed point ``x`` (LPS mm) is ``T(x) = A (x + w(x))``: a deformable displacement
``w`` (mm, in the fixed image's space) followed by the affine ``A`` (4x4, fixed point -> moving
point). The affine stays as given; ``w`` starts from the initial field (e.g. a network's
prediction) and is optimised level by level.

Per level (coarse to fine, ``Settings.spacings``):

1. grid: the fixed image's own grid average-pooled by a whole factor per axis (the factor nearest
   ``spacing / voxel size``, at least 1; so anisotropic images get near-isotropic levels), cropped
   to the box of the fixed image's foreground (normalised intensity above ``FOREGROUND``) widened
   by ``margin_mm``. Beyond the box the field keeps its edge values;
2. images: both normalised to [0, 1] (0.5 and 99.5 percentiles), each average-pooled on its own
   grid by the level's factors. The moving image is sampled at ``T(x)`` (trilinear, zero outside),
   so it is never resampled onto another grid before the end;
3. field: ``w = w_0 + S r`` (displacement, default) or ``w = w_0 o exp(S r)`` (``field =
   "velocity"``: a stationary velocity integrated by scaling and squaring,
   `spatial.integrate_velocity`, composed with ``w_0`` so that the update is diffeomorphic), where
   ``w_0`` is the previous level's field (or the initial one) regridded onto this level, ``r`` is
   the optimised parameter (level voxels, zero at the start of every level, so each level starts
   exactly where the last ended), and ``S`` averages each voxel's ``smoothing``^3 neighbourhood
   (within the grid; a Gaussian-like smoothing of the update, as the instance optimisation of
   ConvexAdam, Siebert et al. 2021: Adam's per-voxel step normalisation otherwise lets weakly
   constrained voxels wander);
4. loss: ``similarity(F, M o T) + weight * R``, with ``R`` the diffusion regulariser
   (`losses.gradient_l2`, dimensionless: voxels per voxel) or the bending energy
   (`losses.bending_energy`, multiplied by the level's spacing / finest spacing squared... see
   ``_regulariser``) of ``w`` (displacement) or of ``S r`` (velocity: the velocity is regularised,
   as in VoxelMorph);
5. Adam with learning rate ``lr`` (level voxels), ``iterations[level]`` steps, no stopping rule:
   the result depends only on the inputs, the settings and the seed.

Similarities: ``"lncc"`` (local squared NCC, `losses.LocalNCC`, window ``window_mm`` rounded to an
odd number of level voxels, at least 3) for images of one contrast; ``"mi"`` (global Parzen MI,
`losses.mi_loss`) and ``"mami"`` (the paper's MultiAxisMI, `losses.multi_axis_mi_loss`) for
different contrasts, both on a sub-lattice of every ``mi_stride``-th voxel with an offset drawn
from ``seed`` at every step (a Mattes-style sampling: the Parzen window costs voxels x bins).
`choose_similarity` picks one from the images (see there).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..device import threads_for
from ..errors import InputError
from ..imageio.geometry import Geometry, Volume
from ..imageio.intensity import normalise_intensity
from ..losses import LocalNCC, bending_energy, box_sum, gradient_l2, mi_loss, multi_axis_mi_loss
from ..spatial import compose, identity_grid, integrate_velocity, regrid_voxel_field
from ..spatial.sampling import grid_sample_3d
from .adam import Adam
from .options import REFINE_DEFAULTS, REFINE_FIELDS, REFINE_LEVELS, REFINE_REGULARISERS, REFINE_SIMILARITIES

SIMILARITIES = REFINE_SIMILARITIES
"""Similarities `refine` optimises; ``"auto"`` lets `choose_similarity` pick lncc or mi."""
REGULARISERS = REFINE_REGULARISERS
FIELDS = REFINE_FIELDS
FOREGROUND = 0.05
"""Normalised intensity above which a fixed voxel counts as foreground (the box the levels are cropped to)."""


@dataclass(frozen=True)
class Settings:
    """What `refine` optimises and how (see the module docstring)."""

    spacings: tuple[float, ...] = REFINE_LEVELS["cpu"]["spacings"]
    iterations: tuple[int, ...] = REFINE_LEVELS["cpu"]["iterations"]
    similarity: str = "lncc"
    window_mm: float = REFINE_DEFAULTS["window_mm"]
    regulariser: str = REFINE_DEFAULTS["regulariser"]
    weight: float = REFINE_DEFAULTS["weight"]
    lr: float = REFINE_DEFAULTS["lr"]
    smoothing: int = REFINE_DEFAULTS["smoothing"]
    field: str = REFINE_DEFAULTS["field"]
    integration_steps: int = 6
    margin_mm: float = 8.0
    mi_bins: int = 32
    mi_stride: int = 2

    def check(self) -> None:
        """Raise `InputError` for settings that cannot run."""
        if not self.spacings or len(self.spacings) != len(self.iterations):
            raise InputError(
                f"give one iteration count per refinement level; got spacings {list(self.spacings)} and "
                f"iterations {list(self.iterations)}"
            )
        if any(not s > 0 for s in self.spacings) or any(int(n) < 0 for n in self.iterations):
            raise InputError("refinement spacings must be positive (mm) and iteration counts zero or positive")
        for name, value, choices in (
            ("similarity", self.similarity, ("auto", *SIMILARITIES)),
            ("regulariser", self.regulariser, REGULARISERS),
            ("field", self.field, FIELDS),
        ):
            if value not in choices:
                raise InputError(f"refinement {name} must be one of {', '.join(choices)}; got {value!r}")
        if self.smoothing < 1 or self.smoothing % 2 == 0:
            raise InputError(f"refinement smoothing must be an odd number of voxels (1: none); got {self.smoothing}")


@dataclass
class Level:
    """One level's grid and images (tensors ``(1, 1, I, J, K)``) and where its fixed grid lies."""

    spacing: float
    grid: Geometry
    fixed: torch.Tensor
    moving: torch.Tensor
    moving_grid: Geometry


@dataclass
class Refined:
    """The refined mapping ``T(x) = A (x + w(x))``: ``w`` as a voxel field on ``grid``, and what each level did."""

    affine: np.ndarray
    deformable: torch.Tensor
    grid: Geometry
    similarity: str
    levels: list[dict[str, float]] = field(default_factory=list)

    def whole_field(self, target: Geometry) -> Volume:
        """The whole mapping on ``target`` as a physical LPS mm displacement field: ``u(x) = A (x + w(x)) - x``."""
        w_index = regrid_voxel_field(self.deformable, self.grid, target)[0]
        device = w_index.device
        # u(p) = (A - I) x(p) + A_lin linear w(p) with x(p) = origin + linear p: an affine function of the index p
        # (summed over axes by broadcasting) plus a linear map of w.
        affine_part = torch.as_tensor((self.affine - np.eye(4)) @ target.index_to_physical_matrix, dtype=torch.float32, device=device)
        i, j, k = (torch.arange(n, dtype=torch.float32, device=device) for n in target.shape)
        u = (
            affine_part[:3, 3]
            + i[:, None, None, None] * affine_part[:3, 0]
            + j[None, :, None, None] * affine_part[:3, 1]
            + k[None, None, :, None] * affine_part[:3, 2]
        )
        to_mm = torch.as_tensor(self.affine[:3, :3] @ target.direction @ np.diag(target.spacing), dtype=torch.float32, device=device)
        u = u + w_index.permute(1, 2, 3, 0) @ to_mm.T
        return Volume(np.ascontiguousarray(u.cpu().numpy(), dtype=np.float32), target)


def level_factors(geometry: Geometry, spacing: float) -> tuple[int, int, int]:
    """Whole pooling factors per axis bringing ``geometry``'s voxels nearest to ``spacing`` mm (at least 1)."""
    return tuple(max(1, int(round(spacing / s))) for s in geometry.spacing)


def pooled_geometry(geometry: Geometry, factors: Sequence[int]) -> Geometry:
    """The grid of ``geometry`` average-pooled by ``factors``: cell ``q`` covers voxels ``f q .. f q + f - 1``."""
    f = np.asarray(factors, dtype=np.float64)
    spacing = np.asarray(geometry.spacing)
    shape = tuple(int(math.ceil(n / k)) for n, k in zip(geometry.shape, factors))
    origin = np.asarray(geometry.origin) + geometry.direction @ (spacing * (f - 1.0) / 2.0)
    return Geometry(shape, tuple(spacing * f), tuple(origin), geometry.direction)


def pool(image: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Average-pool ``image (1, 1, I, J, K)`` by ``factors``, the last partial cell padded with edge values."""
    factors = tuple(int(f) for f in factors)
    if max(factors) == 1:
        return image
    pad: list[int] = []
    for size, factor in zip(reversed(image.shape[2:]), reversed(factors)):
        pad += [0, (-size) % factor]
    if any(pad):
        image = F.pad(image, pad, mode="replicate")
    return F.avg_pool3d(image, factors, factors)


def foreground_box(image: torch.Tensor, margin: int) -> tuple[slice, slice, slice]:
    """Index box of ``image (1, 1, I, J, K)``'s voxels above `FOREGROUND`, widened by ``margin`` voxels (all when empty)."""
    inside = image[0, 0] > FOREGROUND
    if not bool(inside.any()):
        return tuple(slice(0, n) for n in image.shape[2:])
    box = []
    for axis, size in enumerate(image.shape[2:]):
        present = torch.nonzero(inside.any(dim=tuple(a for a in range(3) if a != axis))).flatten()
        box.append(slice(max(0, int(present.min()) - margin), min(size, int(present.max()) + margin + 1)))
    return tuple(box)


def crop_geometry(geometry: Geometry, box: Sequence[slice]) -> Geometry:
    """The sub-grid of ``geometry`` that ``box`` (index slices) selects."""
    start = np.array([s.start for s in box], dtype=np.float64)
    origin = np.asarray(geometry.origin) + geometry.direction @ (np.asarray(geometry.spacing) * start)
    return Geometry(tuple(s.stop - s.start for s in box), geometry.spacing, tuple(origin), geometry.direction)


def _image(volume: Volume, device: torch.device) -> torch.Tensor:
    array = normalise_intensity(volume.array)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def make_levels(fixed: Volume, moving: Volume, settings: Settings, device: torch.device) -> list[Level]:
    """Each level's cropped fixed grid and pooled images (see the module docstring)."""
    fixed_image, moving_image = _image(fixed, device), _image(moving, device)
    levels = []
    for spacing in settings.spacings:
        fixed_factors, moving_factors = level_factors(fixed.geometry, spacing), level_factors(moving.geometry, spacing)
        pooled = pool(fixed_image, fixed_factors)
        margin = int(math.ceil(settings.margin_mm / spacing))
        box = foreground_box(pooled, margin)
        levels.append(
            Level(
                spacing=float(spacing),
                grid=crop_geometry(pooled_geometry(fixed.geometry, fixed_factors), box),
                fixed=pooled[(slice(None), slice(None), *box)].contiguous(),
                moving=pool(moving_image, moving_factors).contiguous(),
                moving_grid=pooled_geometry(moving.geometry, moving_factors),
            )
        )
    return levels


class _Sampler:
    """Samples a level's moving image at ``T(x)`` for a deformable field in level voxels, in grid_sample's coordinates."""

    def __init__(self, level: Level, affine: np.ndarray) -> None:
        matrix = level.moving_grid.physical_to_index_matrix @ affine @ level.grid.index_to_physical_matrix
        normaliser = np.zeros((4, 4))
        normaliser[3, 3] = 1.0
        for row, axis in enumerate((2, 1, 0)):  # grid_sample's (x, y, z) = (k, j, i), align_corners=True
            half = max(level.moving_grid.shape[axis] - 1, 1) / 2.0
            normaliser[row, axis], normaliser[row, 3] = 1.0 / half, -1.0
        full = torch.as_tensor(normaliser @ matrix, dtype=torch.float32, device=level.fixed.device)
        self.linear = full[:3, :3].contiguous()
        self.base = (torch.einsum("rc,cijk->ijkr", self.linear, identity_grid(level.grid.shape, device=level.fixed.device)[0]) + full[:3, 3])[None]
        self.moving = level.moving

    def __call__(self, deformable: torch.Tensor) -> torch.Tensor:
        coordinates = self.base + torch.einsum("rc,bcijk->bijkr", self.linear, deformable)
        return grid_sample_3d(self.moving, coordinates)


def _window(window_mm: float, spacing: float) -> int:
    """The odd number of voxels nearest ``window_mm`` at ``spacing``, at least 3."""
    return max(3, 2 * int(round((window_mm / spacing - 1.0) / 2.0)) + 1)


def _sublattice_offset(stride: int, generator: torch.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in torch.randint(stride, (3,), generator=generator))


def similarity_function(
    name: str, fixed: torch.Tensor, settings: Settings, spacing: float, generator: torch.Generator
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss ``warped -> value`` (to minimise) of similarity ``name`` against the level's ``fixed`` image."""
    if name == "lncc":
        return LocalNCC(fixed, _window(settings.window_mm, spacing))
    stride = int(settings.mi_stride)

    def sampled(warped: torch.Tensor) -> torch.Tensor:
        offset = _sublattice_offset(stride, generator) if stride > 1 else (0, 0, 0)
        index = (slice(None), slice(None), *(slice(o, None, stride) for o in offset))
        if name == "mi":
            return mi_loss(fixed[index], warped[index], bins=settings.mi_bins)
        return multi_axis_mi_loss(fixed[index], warped[index], bins=settings.mi_bins)

    return sampled


def choose_similarity(fixed: torch.Tensor, warped: torch.Tensor, bins: int = 16) -> str:
    """``"lncc"`` when the two images look like one contrast (or one inverted), else ``"mi"``.

    Inside the fixed image's foreground, the squared Pearson correlation ``r^2`` of the intensities
    is compared with the correlation ratios ``eta^2`` (the share of one image's variance that any
    function of the other explains, the other binned in ``bins`` quantiles; the larger of the two
    directions): one contrast, or one contrast inverted, relates the images near-linearly (``r^2``
    close to ``eta^2``), another contrast through a non-monotone map (``r^2`` far below). Same
    contrast when ``r^2 >= eta^2 / 2``. Measured on Testing/test_refinement.py's blob images before
    registration: a one-fold contrast map gives ``r^2`` 0.02 against ``eta^2`` 0.38 (MI); a two-fold
    one, with two rising branches, 0.18 against 0.32 and passes for one contrast (name the
    similarity for such pairs).
    """
    inside = fixed > FOREGROUND
    f, w = fixed[inside].double().clamp(0.0, 1.0), warped[inside].double().clamp(0.0, 1.0)
    if f.numel() < 2 or float(f.var()) <= 0 or float(w.var()) <= 0:
        return "lncc"
    r2 = float(torch.corrcoef(torch.stack([f, w]))[0, 1] ** 2)
    eta2 = max(_correlation_ratio(f, w, bins), _correlation_ratio(w, f, bins))
    return "lncc" if r2 >= 0.5 * eta2 else "mi"


def _correlation_ratio(y: torch.Tensor, x: torch.Tensor, bins: int) -> float:
    """``eta^2``: the share of the variance of ``y`` explained by the mean of ``y`` in each of ``bins`` quantile bins of ``x``."""
    edges = torch.quantile(x[:: max(1, x.numel() // 100_000)], torch.linspace(0.0, 1.0, bins + 1, dtype=x.dtype, device=x.device)[1:-1])
    which = torch.bucketize(x, edges)
    counts = torch.bincount(which, minlength=bins).double()
    means = torch.bincount(which, weights=y, minlength=bins) / counts.clamp_min(1.0)
    return float((counts * (means - y.mean()) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def _regulariser(kind: str, disp: torch.Tensor) -> torch.Tensor:
    return gradient_l2(disp) if kind == "diffusion" else bending_energy(disp)


class _Smoother:
    """``S``: the mean over each voxel's ``window``^3 neighbourhood within the grid (differentiable, exact adjoint)."""

    def __init__(self, shape: Sequence[int], window: int, device: torch.device) -> None:
        self.window = int(window)
        self.count = box_sum(torch.ones(1, 1, *shape, device=device), self.window) if self.window > 1 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.count is None:
            return x
        return box_sum(x, self.window) / self.count


class _Steps:
    """The work over all levels (steps x level voxels), the last step's duration, the time budget's say and the progress callback.

    Progress counts each step by its level's voxels, so that a bar's rate (and a time-left estimate
    from it) holds across levels: a 2 mm step costs about 8 times a 4 mm one.
    """

    def __init__(self, total: float, progress: Callable[[float], None] | None, allows: Callable[[float], bool] | None) -> None:
        self.total, self.done, self.last_s, self.stopped = max(1.0, float(total)), 0.0, 0.0, False
        self.progress, self.allows = progress, allows

    def may_take_one(self) -> bool:
        """Whether another step may start (False for good once the budget said no)."""
        if not self.stopped and self.allows is not None and not self.allows(self.last_s):
            self.stopped = True
        return not self.stopped

    def took_one(self, seconds: float, work: float) -> None:
        self.done, self.last_s = self.done + work, seconds
        if self.progress is not None:
            self.progress(self.done / self.total)


def _field(base: torch.Tensor, update: torch.Tensor, settings: Settings) -> torch.Tensor:
    """``w = w_0 + S r`` or ``w_0 o exp(S r)`` (see the module docstring) from ``update = S r``."""
    if settings.field == "velocity":
        return compose(base, integrate_velocity(update, settings.integration_steps))
    return base + update


def _optimise_level(
    level: Level,
    base: torch.Tensor,
    sample: _Sampler,
    similarity: Callable[[torch.Tensor], torch.Tensor],
    settings: Settings,
    iterations: int,
    steps: _Steps,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One level's Adam steps from the field ``base``; returns the field and what the level did."""
    smooth = _Smoother(level.grid.shape, settings.smoothing, base.device)
    residual = torch.zeros_like(base, requires_grad=True)
    optimiser = Adam([residual], lr=settings.lr)
    first = last = float("nan")
    done = 0
    while done < iterations and steps.may_take_one():
        tick = time.perf_counter()
        optimiser.zero_grad()
        update = smooth(residual)
        disp = _field(base, update, settings)
        value = similarity(sample(disp))
        penalty = _regulariser(settings.regulariser, update if settings.field == "velocity" else disp)
        (value + settings.weight * penalty).backward()
        optimiser.step()
        last = value.item()
        first = last if done == 0 else first
        done += 1
        steps.took_one(time.perf_counter() - tick, float(np.prod(level.grid.shape)))
    with torch.no_grad():
        disp = _field(base, smooth(residual), settings)
    return disp, {"iterations": done, "similarity_first": first, "similarity_last": last}


def refine(
    fixed: Volume,
    moving: Volume,
    affine: np.ndarray,
    initial: tuple[torch.Tensor, Geometry] | None,
    settings: Settings,
    device: torch.device,
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
    allows: Callable[[float], bool] | None = None,
) -> Refined:
    """Optimise the deformable field of ``T(x) = A (x + w(x))`` (see the module docstring).

    ``affine`` is the 4x4 LPS matrix (fixed point -> moving point); ``initial`` is ``w_0`` as a voxel
    field ``(1, 3, I, J, K)`` with its grid (e.g. a network grid), or None for zero.
    ``settings.similarity`` names the similarity, or ``"auto"``: `choose_similarity` picks one from
    the fixed image and the moving image under the initial mapping on the finest level (pooling
    blurs a non-monotone contrast map towards a monotone one on coarse levels).
    ``progress(fraction)`` is called after every step. ``allows(seconds)`` (a time budget) is asked
    before every step whether a step as long as the last one may still run; once it says no, the
    optimisation stops and the field reached so far is returned (``levels`` records the steps done).
    Each level runs on one CPU thread when it is small (`device.threads_for`).
    """
    settings.check()
    affine = np.asarray(affine, dtype=np.float64)
    levels = make_levels(fixed, moving, settings, device)
    generator = torch.Generator().manual_seed(int(seed))
    if initial is None:
        disp, grid = torch.zeros(1, 3, *levels[0].grid.shape, device=device), levels[0].grid
    else:
        disp, grid = initial[0].detach().float().to(device), initial[1]
    steps = _Steps(sum(int(n) * float(np.prod(level.grid.shape)) for level, n in zip(levels, settings.iterations)), progress, allows)
    history: list[dict[str, float]] = []
    name = settings.similarity
    if name == "auto":
        finest = levels[-1]
        with threads_for(int(np.prod(finest.grid.shape)), device), torch.no_grad():
            name = choose_similarity(finest.fixed, _Sampler(finest, affine)(regrid_voxel_field(disp, grid, finest.grid)))
    for level, iterations in zip(levels, settings.iterations):
        start = time.perf_counter()
        with threads_for(int(np.prod(level.grid.shape)), device):
            base = regrid_voxel_field(disp, grid, level.grid).detach()
            sample = _Sampler(level, affine)
            similarity = similarity_function(name, level.fixed, settings, level.spacing, generator)
            disp, record = _optimise_level(level, base, sample, similarity, settings, int(iterations), steps)
        grid = level.grid
        history.append({
            "spacing_mm": level.spacing, "shape": list(level.grid.shape), **record, "seconds": time.perf_counter() - start
        })
    return Refined(affine, disp.detach(), grid, name, history)
