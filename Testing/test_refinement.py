"""The refinement stage (methods.refinement): level grids, the whole mapping, recovery of known deformations.

Ground truths are analytic: affine displacements, constant shifts, and a known smooth deformation
of a blob image whose true field is the one that made the pair.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from JointRegSegLib.errors import InputError
from JointRegSegLib.imageio.geometry import Geometry, Volume
from JointRegSegLib.methods import refinement
from JointRegSegLib.methods.adam import Adam
from JointRegSegLib.metrics import folding_percent, jacobian_determinant
from JointRegSegLib.spatial import physical_to_voxel_field, warp_volume

SHAPE = (40, 40, 40)
SPACING = 1.5
DEVICE = torch.device("cpu")
FAST = refinement.Settings(spacings=(6.0, 3.0), iterations=(40, 30), similarity="auto")


def oblique_grid(shape=SHAPE, spacing=(SPACING,) * 3) -> Geometry:
    direction = Rotation.from_euler("xyz", (15.0, -10.0, 25.0), degrees=True).as_matrix()
    return Geometry(shape, spacing, (12.0, -30.0, 4.0), direction)


def blobs(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Smooth structure in [0, 1]: Gaussian blobs inside a sphere, zero outside (a skull-stripped head)."""
    rng = np.random.default_rng(seed)
    p = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    centre = (np.asarray(shape) - 1) / 2.0
    image = np.zeros(shape)
    for _ in range(30):
        image += rng.uniform(0.3, 1.0) * np.exp(
            -0.5 * (((p - centre - rng.uniform(-11, 11, 3)) / rng.uniform(1.5, 3.0, 3)) ** 2).sum(axis=-1)
        )
    image = 0.2 + image / image.max()
    image[((p - centre) ** 2).sum(axis=-1) > 16.0**2] = 0.0
    return (image / image.max()).astype(np.float32)


def sine_field(grid: Geometry, amplitude_mm: float = 2.5) -> Volume:
    """A smooth physical displacement (LPS mm) on ``grid``: one long sine wave per component."""
    points = grid.index_to_physical(np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1))
    centre = grid.index_to_physical((np.asarray(grid.shape) - 1) / 2.0)
    array = np.stack(
        [amplitude_mm * np.sin(2 * np.pi * ((points - centre)[..., (c + 1) % 3] / 50.0 + 0.15 * c)) for c in range(3)], axis=-1
    )
    return Volume(array.astype(np.float32), grid)


def folded_contrast(image: np.ndarray, folds: int = 1) -> np.ndarray:
    """Another contrast of a foreground image: a triangle wave of the intensity's rank (not monotone).

    The intensity's rank ``q`` in [0, 1] among the foreground voxels maps to ``1 - 0.8 |((folds + 1) q
    mod 2) - 1|``: one fold is brightest at the median intensity and dark at both ends, with half the
    voxels on each branch; each further fold adds a branch.
    """
    inside = image > refinement.FOREGROUND
    values = np.interp(image, np.sort(image[inside]), np.linspace(0.0, 1.0, int(inside.sum())))
    wave = np.abs(np.mod((folds + 1) * values, 2.0) - 1.0)
    return np.where(inside, 1.0 - 0.8 * wave, 0.0).astype(np.float32)


def end_point_error(field: Volume, truth: Volume, mask: np.ndarray) -> float:
    return float(np.linalg.norm(field.array - truth.array, axis=-1)[mask].mean())


@pytest.fixture(scope="module")
def deformed(one_thread) -> tuple[Volume, Volume, Volume]:
    """Blobs as the moving image, the fixed image ``fixed(x) = moving(x + truth(x))``, and the known field ``truth``."""
    grid = oblique_grid()
    moving_image = Volume(blobs(), grid)
    truth = sine_field(grid)
    fixed = warp_volume(moving_image, truth)
    return fixed, moving_image, truth


def test_level_grids_are_pooled_fixed_grids_cropped_to_the_foreground():
    grid = oblique_grid(shape=(40, 36, 12), spacing=(1.0, 1.0, 3.0))
    assert refinement.level_factors(grid, 3.0) == (3, 3, 1)
    pooled = refinement.pooled_geometry(grid, (3, 3, 1))
    assert pooled.shape == (14, 12, 12) and pooled.spacing == pytest.approx((3.0, 3.0, 3.0))
    # a pooled cell's centre is the mean of the centres of the voxels it covers
    covered = np.stack(np.meshgrid(np.arange(3, 6), np.arange(6, 9), [4], indexing="ij"), axis=-1).reshape(-1, 3)
    np.testing.assert_allclose(pooled.index_to_physical(np.array([1.0, 2.0, 4.0])), grid.index_to_physical(covered).mean(0), atol=1e-9)
    image = torch.zeros(1, 1, *grid.shape)
    image[0, 0, 10:20, 8:14, 3:5] = 1.0
    pooled_image = refinement.pool(image, (3, 3, 1))
    assert float(pooled_image[0, 0, 4, 3, 3]) == pytest.approx(1.0) and float(pooled_image[0, 0, 3, 2, 3]) == pytest.approx(2 / 9)
    box = refinement.foreground_box(pooled_image, margin=1)
    assert box == (slice(2, 8), slice(1, 6), slice(2, 6))
    cropped = refinement.crop_geometry(pooled, box)
    np.testing.assert_allclose(cropped.index_to_physical(np.zeros(3)), pooled.index_to_physical(np.array([2.0, 1.0, 2.0])))


def test_whole_field_of_an_affine_alone_and_of_a_constant_shift():
    target = oblique_grid(shape=(12, 10, 8))
    level = refinement.pooled_geometry(target, (2, 2, 2))
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", (4.0, -3.0, 6.0), degrees=True).as_matrix() * 1.05
    affine[:3, 3] = (2.0, -1.0, 3.0)
    points = target.index_to_physical(np.stack(np.meshgrid(*[np.arange(n) for n in target.shape], indexing="ij"), axis=-1))
    zero = refinement.Refined(affine, torch.zeros(1, 3, *level.shape), level, "lncc")
    expected = points @ affine[:3, :3].T + affine[:3, 3] - points
    np.testing.assert_allclose(zero.whole_field(target).array, expected, atol=1e-3)
    # w = a constant shift of t level voxels: u(x) = A (x + L t) - x with L the level's voxel steps in mm
    t = np.array([0.5, -1.0, 0.25])
    shift = torch.as_tensor(t, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *level.shape)
    shifted = refinement.Refined(affine, shift, level, "lncc")
    w_mm = level.direction @ np.diag(level.spacing) @ t
    np.testing.assert_allclose(shifted.whole_field(target).array, (points + w_mm) @ affine[:3, :3].T + affine[:3, 3] - points, atol=1e-3)


def test_choose_similarity_tells_same_inverted_and_other_contrasts():
    image = torch.from_numpy(blobs(seed=2))[None, None]
    inside = image > refinement.FOREGROUND
    assert refinement.choose_similarity(image, image) == "lncc"
    assert refinement.choose_similarity(image, torch.where(inside, 1.0 - image, 0.0)) == "lncc"
    assert refinement.choose_similarity(image, torch.from_numpy(folded_contrast(image.numpy()))) == "mi"


def test_refine_recovers_a_known_deformation_without_folding(deformed):
    fixed, moving, truth = deformed
    mask = fixed.array > 0.05
    start = end_point_error(Volume(np.zeros_like(truth.array), fixed.geometry), truth, mask)
    refined = refinement.refine(fixed, moving, np.eye(4), None, FAST, DEVICE)
    field = refined.whole_field(fixed.geometry)
    assert refined.similarity == "lncc" and [level["iterations"] for level in refined.levels] == [40, 30]
    assert end_point_error(field, truth, mask) < 0.4 * start
    assert folding_percent(jacobian_determinant(field).array) == 0.0


def test_refine_starts_from_the_initial_field_and_the_affine(deformed):
    """Handed the true field as the initial one (on another grid) with no step to take, refine returns it."""
    fixed, moving, truth = deformed
    affine = np.eye(4)
    affine[:3, 3] = (1.5, -2.0, 0.5)
    # T(x) = A (x + w(x)) = x + truth(x) when w = truth - t
    grid = oblique_grid(shape=(30, 30, 30), spacing=(2.0, 2.0, 2.0))
    initial = physical_to_voxel_field(Volume(truth.array - affine[:3, 3].astype(np.float32), truth.geometry), grid)[None]
    settings = refinement.Settings(spacings=(SPACING,), iterations=(0,))
    field = refinement.refine(fixed, moving, affine, (initial, grid), settings, DEVICE).whole_field(fixed.geometry)
    inner = (slice(6, -6),) * 3
    np.testing.assert_allclose(field.array[inner], truth.array[inner], atol=0.05)


def test_refine_is_deterministic_and_stops_when_the_budget_says_so(deformed):
    fixed, moving, _ = deformed
    settings = refinement.Settings(spacings=(6.0, 3.0), iterations=(5, 5), similarity="mi")
    a = refinement.refine(fixed, moving, np.eye(4), None, settings, DEVICE, seed=4)
    b = refinement.refine(fixed, moving, np.eye(4), None, settings, DEVICE, seed=4)
    assert torch.equal(a.deformable, b.deformable)
    fractions: list[float] = []
    asked: list[float] = []

    def allows(step_s: float) -> bool:
        asked.append(step_s)
        return len(asked) <= 3

    cut = refinement.refine(fixed, moving, np.eye(4), None, settings, DEVICE, seed=4, progress=fractions.append, allows=allows)
    assert [level["iterations"] for level in cut.levels] == [3, 0] and len(fractions) == 3
    assert asked[0] == 0.0 and all(s > 0 for s in asked[1:])


def test_refine_across_contrasts_chooses_mi_which_recovers_the_field_where_lncc_falls_short(deformed):
    """The moving image in a contrast no monotone map relates to the fixed one (`folded_contrast`).

    One fold: the automatic choice is MI, which recovers the field. Two folds: local NCC sees a
    window's intensities related near-linearly only where the window stays on one branch of the map,
    MI takes any map (regulariser weight 2: the two-fold map leaves MI a flatter optimum). Measured:
    end-point error 0.40 of the initial one (one fold, MI); two folds 0.41 with MI, 0.65 with local NCC.
    """
    fixed, moving, truth = deformed
    mask = fixed.array > 0.05
    start = end_point_error(Volume(np.zeros_like(truth.array), fixed.geometry), truth, mask)
    chosen = refinement.refine(fixed, moving.with_array(folded_contrast(moving.array)), np.eye(4), None, FAST, DEVICE)
    assert chosen.similarity == "mi"
    assert end_point_error(chosen.whole_field(fixed.geometry), truth, mask) < 0.6 * start
    other = moving.with_array(folded_contrast(moving.array, folds=2))
    errors = {
        name: end_point_error(
            refinement.refine(fixed, other, np.eye(4), None, replace(FAST, similarity=name, weight=2.0), DEVICE).whole_field(fixed.geometry),
            truth,
            mask,
        )
        for name in ("mi", "lncc")
    }
    assert errors["mi"] < 0.5 * start
    assert errors["lncc"] > 1.3 * errors["mi"]


def test_velocity_field_is_diffeomorphic_and_registers(deformed):
    fixed, moving, truth = deformed
    mask = fixed.array > 0.05
    settings = refinement.Settings(spacings=(6.0, 3.0), iterations=(40, 30), field="velocity", weight=0.5)
    field = refinement.refine(fixed, moving, np.eye(4), None, settings, DEVICE).whole_field(fixed.geometry)
    start = end_point_error(Volume(np.zeros_like(truth.array), fixed.geometry), truth, mask)
    assert end_point_error(field, truth, mask) < 0.5 * start
    assert float(jacobian_determinant(field).array.min()) > 0.0


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="one iteration count per refinement level"):
        refinement.Settings(spacings=(4.0, 2.0), iterations=(10,)).check()
    with pytest.raises(InputError, match="similarity"):
        refinement.Settings(similarity="ssd").check()
    with pytest.raises(InputError, match="odd"):
        refinement.Settings(smoothing=4).check()


def test_adam_matches_torch_optim_adam_bit_for_bit():
    """`methods.adam.Adam` (torch's functional Adam, no torch._dynamo import) against torch.optim.Adam."""
    target = torch.linspace(-2.0, 3.0, 24).reshape(2, 3, 4)
    ours, theirs = torch.zeros(2, 3, 4, requires_grad=True), torch.zeros(2, 3, 4, requires_grad=True)
    a, b = Adam([ours], lr=0.1), torch.optim.Adam([theirs], lr=0.1)
    for step in range(30):
        a.lr = 0.1 / (1 + step)
        for group in b.param_groups:
            group["lr"] = 0.1 / (1 + step)
        for x, optimiser in ((ours, a), (theirs, b)):
            optimiser.zero_grad()
            ((x - target) ** 4).sum().backward()
            optimiser.step()
    assert torch.equal(ours, theirs)
