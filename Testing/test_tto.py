"""The tto method end to end on small synthetic pairs (its training loop: test_training.py, test_overfit.py).

The networks are randomly initialised and recorded in a weights folder made for the test (so no
shipped weights are needed); ground truths are analytic (known shifts and deformations).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from JointRegSegLib.errors import InputError
from JointRegSegLib.imageio.geometry import Geometry, Volume
from JointRegSegLib.methods import get_method
from JointRegSegLib.methods.base import Inputs, Options
from JointRegSegLib.methods.tto import build_network, network_grid_shape
from JointRegSegLib.metrics import ncc
from JointRegSegLib.spatial import warp
from JointRegSegLib.weights import load_weights, record_weights

SHAPE = (32, 32, 32)
SPACING = 1.5
# The network grid of a 32^3 image at 1.5 mm is 32^3 at 1.5 mm; small affine pyramid for speed.
EXTRA = {"spacing": SPACING, "affine_iterations": [20, 10, 5]}


def blobs(seed: int = 0) -> np.ndarray:
    """Smooth volume in [0, 1]: Gaussian blobs, zero near the border."""
    rng = np.random.default_rng(seed)
    p = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), axis=-1)
    image = np.zeros(SHAPE)
    for _ in range(8):
        image += rng.uniform(0.3, 1.0) * np.exp(
            -0.5 * (((p - rng.uniform(9, 23, 3)) / rng.uniform(2.0, 4.5, 3)) ** 2).sum(axis=-1)
        )
    return (image / image.max()).astype(np.float32)


def oblique_geometry(origin=(10.0, -20.0, 5.0)) -> Geometry:
    """A grid whose direction is a real rotation (not a permutation)."""
    direction = Rotation.from_euler("xyz", (20.0, -10.0, 30.0), degrees=True).as_matrix()
    return Geometry(SHAPE, (SPACING,) * 3, origin, direction)


def permuted_geometry() -> Geometry:
    """A grid with axes permuted and flipped (non-identity direction whose network grid stays 32^3)."""
    return Geometry(SHAPE, (SPACING,) * 3, (-5.0, 12.0, 30.0), np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))


def smooth_deformation(amplitude: float = 2.0) -> torch.Tensor:
    """A smooth analytic voxel displacement (1, 3, 32, 32, 32), one sine per component."""
    p = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in SHAPE], indexing="ij"))
    field = torch.stack(
        [amplitude * torch.sin(2 * np.pi * (p[(c + 1) % 3] / SHAPE[0] + 0.2 * c)) for c in range(3)]
    )
    return field[None]


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """A weights folder with randomly initialised tto networks, used through JRS_WEIGHTS_DIR."""
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.manual_seed(0)
    for kind in ("student", "teacher"):
        path = folder / f"tto_{kind}.pt"
        torch.save(build_network(kind).state_dict(), path)
        record_weights(f"tto_{kind}", path, {"note": "random initialisation for tests"})
    monkeypatch.setenv("JRS_WEIGHTS_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def deformed_pair() -> Inputs:
    """Fixed blobs and the same blobs deformed by a known smooth field, on one oblique grid."""
    fixed = blobs()
    moving = warp(torch.from_numpy(fixed)[None, None], smooth_deformation())[0, 0].numpy()
    geometry = permuted_geometry()
    return Inputs(Volume(fixed, geometry), Volume(moving, geometry))


def test_network_grid_is_nearest_multiple_of_16_covering_the_field_of_view():
    geometry = Geometry((160, 192, 224), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    spacing, shape = network_grid_shape(geometry, 2.0)
    assert shape == (80, 96, 112)
    # 159 mm between the first and last voxel centres must fit in 79 steps.
    assert spacing == pytest.approx(159.0 / 79.0)
    spacing, shape = network_grid_shape(geometry, 1.0)
    assert shape == (160, 192, 224) and spacing == pytest.approx(1.0)


def test_recovers_a_physical_shift_on_an_oblique_grid(weights):
    """moving = fixed moved by t mm: the affine part and the whole field are u(x) = t (ITK convention).

    Same-contrast images: the NCC affine stage, which has no bias towards scaling on mostly-empty volumes.
    """
    fixed = blobs(seed=1)
    geometry = oblique_geometry()
    shift = np.array([4.0, -3.0, 2.0])
    moved_geometry = Geometry(SHAPE, geometry.spacing, np.asarray(geometry.origin) + shift, geometry.direction)
    inputs = Inputs(Volume(fixed, geometry), Volume(fixed.copy(), moved_geometry))
    result = get_method("tto").register(inputs, Options(extra={**EXTRA, "tto": False, "affine": "ncc", "affine_iterations": [40, 20, 10]}), None)
    np.testing.assert_allclose(result.affine[:3, :3], np.eye(3), atol=0.03)
    centre = geometry.index_to_physical(np.array([(n - 1) / 2.0 for n in SHAPE]))
    np.testing.assert_allclose(result.affine[:3, :3] @ centre + result.affine[:3, 3] - centre, shift, atol=0.5)
    inner = result.displacement.array[8:-8, 8:-8, 8:-8].reshape(-1, 3)
    np.testing.assert_allclose(inner.mean(axis=0), shift, atol=0.5)
    assert result.displacement.geometry.same_as(geometry)
    assert ncc(fixed, result.warped.array) > 0.99


def test_registration_improves_similarity_and_reports_progress(weights, deformed_pair):
    stages: list[tuple[float, str]] = []
    options = Options(iterations=4, time_budget=600, extra={**EXTRA, "lr": 3e-3})
    result = get_method("tto").register(deformed_pair, options, lambda f, s: stages.append((f, s)))
    fixed, moving = deformed_pair.fixed.array, deformed_pair.moving.array
    assert ncc(fixed, result.warped.array) > ncc(fixed, moving)
    assert result.details["iterations_done"] == 4
    assert result.details["stopped_by"] == "iterations"
    assert len(result.details["loss_history"]) == 4
    assert result.weights == {"tto_student": load_weights("tto_student")[1]}
    fractions = [f for f, _ in stages]
    assert all(b >= a for a, b in zip(fractions, fractions[1:])) and fractions[-1] == pytest.approx(1.0)
    assert {"affine", "inference", "test-time optimisation"} <= {s for _, s in stages}
    assert sum(s == "test-time optimisation" for _, s in stages) >= 4


def test_time_budget_and_plain_inference_do_no_optimisation(weights, deformed_pair):
    budget = get_method("tto").register(deformed_pair, Options(iterations=50, time_budget=0.0, extra=EXTRA), None)
    assert budget.details["iterations_done"] == 0 and budget.details["stopped_by"] == "time budget"
    plain = get_method("tto").register(deformed_pair, Options(iterations=50, extra={**EXTRA, "tto": False}), None)
    assert plain.details["iterations_done"] == 0 and "loss_history" not in plain.details
    # Without optimisation both runs are the same computation.
    np.testing.assert_array_equal(budget.displacement.array, plain.displacement.array)


def test_same_seed_same_result(weights, deformed_pair):
    options = Options(seed=3, iterations=2, time_budget=600, extra={**EXTRA, "network": "teacher"})
    a = get_method("tto").register(deformed_pair, options, None)
    b = get_method("tto").register(deformed_pair, options, None)
    np.testing.assert_array_equal(a.displacement.array, b.displacement.array)
    assert a.weights.keys() == {"tto_teacher"}


def test_bad_options_raise_input_errors(weights, deformed_pair):
    method = get_method("tto")
    with pytest.raises(InputError, match="unknown tto option"):
        method.register(deformed_pair, Options(extra={"lamda_smooth": 1.0}), None)
    with pytest.raises(InputError, match="network"):
        method.register(deformed_pair, Options(extra={"network": "large"}), None)
    with pytest.raises(InputError, match="spacing"):
        method.register(deformed_pair, Options(extra={"spacing": 0}), None)

