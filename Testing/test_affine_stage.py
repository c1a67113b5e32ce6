"""The tto affine stage recovers known affines (analytic ground truth), across contrasts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from JointRegSegLib.errors import InputError
from JointRegSegLib.losses.parzen_nmi import NMI_BINS, NMI_SIGMA_RATIO, ParzenNMI
from JointRegSegLib.methods.affine_stage import _Draws, _rows, fit_affine
from JointRegSegLib.spatial import affine_matrix, affine_to_displacement, warp

SHAPE = (48, 48, 48)
CENTRE = [(n - 1) / 2.0 for n in SHAPE]
# The known transform: ~8 degrees of rotation, ~3 voxels of translation, 5 % scaling.
TRUE = affine_matrix(rotation_deg=(8.0, -4.0, 3.0), translation=(3.0, -2.0, 2.5), scale=(1.05, 1.05, 1.05), center=CENTRE)


def blobs(seed: int = 0) -> torch.Tensor:
    """A smooth test volume (1, 1, 48, 48, 48) in [0, 1]: Gaussian blobs of different sizes and heights, zero at the border."""
    rng = np.random.default_rng(seed)
    p = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), axis=-1)
    image = np.zeros(SHAPE)
    for _ in range(9):
        centre = rng.uniform(14, 34, 3)
        sigma = rng.uniform(2.5, 6.0, 3)
        image += rng.uniform(0.3, 1.0) * np.exp(-0.5 * (((p - centre) / sigma) ** 2).sum(axis=-1))
    image /= image.max()
    return torch.as_tensor(image, dtype=torch.float32)[None, None]


def moved(image: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """``image`` pulled through ``matrix``: out(p) = image(matrix p)."""
    return warp(image, affine_to_displacement(torch.as_tensor(matrix, dtype=torch.float32), SHAPE))


def mean_field_error(found: np.ndarray, expected: np.ndarray, margin: int = 10) -> float:
    """Mean |difference| (voxels) of the two affines' displacements in the grid's interior."""
    difference = affine_to_displacement(torch.as_tensor(np.stack([found, expected]), dtype=torch.float64), SHAPE)
    difference = difference[:1] - difference[1:]
    inner = difference[0, :, margin:-margin, margin:-margin, margin:-margin]
    return float(inner.norm(dim=0).mean())


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """fixed, moving with moving(p) = fixed(T p), so the affine registering moving to fixed is T^-1."""
    fixed = blobs()
    return fixed, moved(fixed, TRUE), np.linalg.inv(TRUE)


def test_recovers_known_affine_with_normalised_mutual_information(pair):
    fixed, moving, expected = pair
    found = fit_affine(fixed, moving)  # default: Parzen NMI, pyramid 4, 2, 1
    assert found.shape == (4, 4)
    np.testing.assert_allclose(found[3], [0, 0, 0, 1])
    before = mean_field_error(np.eye(4), expected)
    assert before > 3.0  # the problem is not trivial
    assert mean_field_error(found, expected) < 0.5


def test_contrast_robust_with_inverted_intensities(pair):
    fixed, moving, expected = pair
    found = fit_affine(fixed, 1.0 - moving)
    assert mean_field_error(found, expected) < 0.5


def test_ncc_loss_on_same_contrast(pair):
    fixed, moving, expected = pair
    found = fit_affine(fixed, moving, loss="ncc")
    assert mean_field_error(found, expected) < 0.5


def test_identical_images_give_identity_and_progress_is_monotonic():
    fixed = blobs(seed=3)
    fractions: list[float] = []
    found = fit_affine(fixed, fixed.clone(), progress=lambda f, stage: fractions.append(f))
    assert mean_field_error(found, np.eye(4)) < 0.1
    assert len(fractions) == 240 and fractions[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))


def test_same_seed_same_result(pair):
    fixed, moving, _ = pair
    a = fit_affine(fixed, moving, iterations=(10, 5, 2), seed=4)
    b = fit_affine(fixed, moving, iterations=(10, 5, 2), seed=4)
    np.testing.assert_array_equal(a, b)


def test_rejects_bad_inputs():
    image = torch.rand(1, 1, 32, 32, 32)
    with pytest.raises(InputError, match="shaped"):
        fit_affine(image, torch.rand(1, 1, 32, 32, 30))
    with pytest.raises(InputError, match="loss"):
        fit_affine(image, image, loss="mse")
    with pytest.raises(InputError, match="iteration count"):
        fit_affine(image, image, iterations=(5, 5))
    with pytest.raises(InputError, match="too small"):
        fit_affine(image, image, levels=(16,), iterations=(5,))


def test_windowed_parzen_weights_match_the_whole_gaussian_window() -> None:
    """Each sample's weights over every bin, from scipy's normal density normalised per sample; samples
    at the ends, on bin centres and half-way between them included."""
    values = np.concatenate([np.random.default_rng(1).uniform(0.0, 1.0, 500), [0.0, 1.0, 0.5, 1 / 62, 2 / 31, -0.1, 1.2]])
    centres = np.linspace(0.0, 1.0, NMI_BINS)
    density = norm.pdf(np.clip(values, 0.0, 1.0)[:, None], loc=centres, scale=NMI_SIGMA_RATIO / (NMI_BINS - 1))
    expected = density / density.sum(axis=1, keepdims=True)
    weights = ParzenNMI().weights(torch.as_tensor(values, dtype=torch.float32))
    np.testing.assert_allclose(weights.numpy(), expected, atol=2e-5)


def test_draws_are_subsets_without_repeats_within_a_pass_and_rows_are_the_grid_voxels_at_them() -> None:
    draw = _Draws(100, 30, torch.Generator().manual_seed(0))
    first_pass = [draw() for _ in range(3)]
    assert all(len(set(v.tolist())) == 30 for v in first_pass)
    assert len(set(torch.cat(first_pass).tolist())) == 90  # three calls of one pass share no voxel
    assert len(set(draw().tolist())) == 30  # the next pass: a new permutation
    assert _Draws(20, 30, torch.Generator())() is None  # fewer voxels than samples: every voxel
    shape = (4, 5, 5)
    values = torch.rand(100)
    points, rows = _rows(first_pass[0], values, shape)
    every_point, every_value = _rows(None, values, shape)
    np.testing.assert_array_equal(points.numpy(), np.argwhere(np.ones(shape))[first_pass[0].numpy()])
    assert torch.equal(rows, values[first_pass[0]]) and torch.equal(every_point, points.new_tensor(np.argwhere(np.ones(shape))))
    assert every_value is values


def test_one_learning_rate_per_level_or_one_for_all(pair) -> None:
    fixed, moving, expected = pair
    found = fit_affine(fixed, moving, lr=[0.02, 0.01, 0.004])
    assert mean_field_error(found, expected) < 0.5
    with pytest.raises(InputError, match="learning rate"):
        fit_affine(fixed, moving, lr=[0.02, 0.01])
