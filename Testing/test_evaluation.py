"""The evaluation's segmentation Dice against MONAI's Dice, on a label map's own grid and another one."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from JointRegSegLib.evaluation import segmentation_dice
from JointRegSegLib.imageio import Geometry, Volume, from_sitk, to_sitk
from JointRegSegLib.labels import tissue_of


def _monai_mean_dice(truth: np.ndarray, predicted: np.ndarray, labels: list[int]) -> float:
    remap = np.zeros(max(labels) + 1, np.int64)
    remap[labels] = np.arange(1, len(labels) + 1)

    def onehot(a: np.ndarray) -> torch.Tensor:
        return one_hot(torch.from_numpy(remap[np.where(np.isin(a, labels), a, 0)])[None, None], len(labels) + 1)
    dice = compute_dice(onehot(predicted), onehot(truth), include_background=False, ignore_empty=False)
    return float(torch.nan_to_num(dice, nan=0.0).mean())


def test_segmentation_dice_matches_monai_and_counts_missing_structures_as_zero():
    rng = np.random.default_rng(0)
    truth = np.zeros((30, 30, 30), np.int16)
    truth[2:14, 2:28, 2:28], truth[14:28, 2:28, 2:28], truth[10:20, 10:20, 10:20] = 2, 41, 17  # WM L/R, hippocampus
    truth[3:6, 3:6, 3:6] = 999  # not one of the 30 standard structures: left out of the mean
    predicted = truth.copy()
    predicted[rng.random(truth.shape) < 0.1] = 0
    predicted[predicted == 17] = 0  # a structure the method misses
    geometry = Geometry((30, 30, 30), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    value = segmentation_dice(Volume(truth, geometry), Volume(predicted, geometry))
    assert abs(value - _monai_mean_dice(truth, predicted, [2, 17, 41])) < 1e-6
    assert value < 2 / 3 + 1e-6  # the missed hippocampus counts 0


def test_segmentation_on_another_grid_is_resampled_onto_the_given_labels():
    truth = np.zeros((40, 40, 40), np.int16)
    truth[4:20, 4:36, 4:36], truth[20:36, 4:36, 4:36] = 2, 41
    geometry = Geometry((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    coarse = sitk.Resample(to_sitk(Volume(truth, geometry)), [20, 20, 20], sitk.Transform(), sitk.sitkNearestNeighbor,
                           (0.5, 0.5, 0.5), (2.0, 2.0, 2.0))
    predicted = from_sitk(coarse)
    back = sitk.GetArrayFromImage(sitk.Resample(coarse, to_sitk(Volume(truth, geometry)), sitk.Transform(), sitk.sitkNearestNeighbor)).transpose(2, 1, 0)
    value = segmentation_dice(Volume(truth, geometry), predicted)
    assert abs(value - _monai_mean_dice(truth, back, [2, 41])) < 1e-6 and value > 0.9


def test_tissue_segmentation_is_scored_against_the_labels_mapped_to_tissue():
    truth = np.zeros((30, 30, 30), np.int16)
    truth[2:14, 2:28, 2:28], truth[14:28, 2:28, 2:28] = 2, 42  # left WM, right cortex
    truth[10:20, 10:20, 10:20], truth[5:8, 5:8, 5:8] = 4, 10  # lateral ventricle, thalamus (deep grey)
    predicted = np.zeros_like(truth)
    predicted[2:14, 2:28, 2:28], predicted[14:28, 2:28, 2:28], predicted[10:20, 10:20, 10:20] = 703, 702, 701
    geometry = Geometry((30, 30, 30), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    value = segmentation_dice(Volume(truth, geometry), Volume(predicted, geometry))
    tissue = tissue_of(truth)
    assert set(np.unique(tissue).tolist()) == {0, 701, 702, 703} and (tissue[6, 6, 6], tissue[15, 15, 15]) == (702, 701)
    assert abs(value - _monai_mean_dice(tissue, predicted, [701, 702, 703])) < 1e-6 and 0.8 < value < 1.0


def test_jacobian_map_of_a_pure_affine_shows_no_deformation():
    """A mapping that is only its affine part: the map shown is 1 everywhere (the deformable part),
    the whole mapping's det J (folding, SDlogJ) is the affine's volume ratio."""
    from JointRegSegLib.evaluation import quality_maps

    geometry = Geometry((20, 22, 24), (1.5, 1.2, 1.0), (-10.0, 4.0, 2.0), np.eye(3))
    x = geometry.index_to_physical(np.moveaxis(np.indices(geometry.shape, dtype=np.float64), 0, -1))
    affine = np.diag([1.3, 0.9, 1.1, 1.0])
    affine[:3, 3] = (2.0, -1.0, 0.5)
    field = Volume((x @ affine[:3, :3].T + affine[:3, 3] - x).astype(np.float32), geometry)
    image = Volume(np.random.default_rng(0).random(geometry.shape).astype(np.float32), geometry)
    maps = quality_maps(image, image, field, affine)
    assert maps.jacobian_part == "deformable part"
    np.testing.assert_allclose(maps.jacobian.array, 1.0, rtol=1e-5)
    np.testing.assert_allclose(maps.whole_jacobian.array, np.linalg.det(affine[:3, :3]), rtol=1e-5)
    whole = quality_maps(image, image, field, affine, whole_jacobian=True)
    assert whole.jacobian_part == "whole mapping" and np.allclose(whole.jacobian.array, 1.3 * 0.9 * 1.1, rtol=1e-5)


def test_foreground_mask_equals_scipys_closing_and_hole_filling(sample_pair):
    """The cropped, shifted-copy closing and the one-labelling hole filling give scipy's mask of the whole image:
    on the sample images and on shapes with holes, a hollow shell, and foreground touching the border."""
    from scipy import ndimage

    from JointRegSegLib.imageio import read_image
    from JointRegSegLib.imageio.intensity import normalise_intensity
    from JointRegSegLib.metrics.foreground import FOREGROUND_THRESHOLD, foreground_mask

    geometry = Geometry((40, 36, 30), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    rng = np.random.default_rng(2)
    shell = np.zeros(geometry.shape, np.float32)
    shell[8:30, 6:28, 5:25] = 1.0
    shell[11:27, 9:25, 8:22] = 0.0  # a cavity: a hole to fill
    shell[20:24, 0:4, 10:14] = 1.0  # foreground at the border
    noisy = (rng.random(geometry.shape) > 0.7).astype(np.float32)  # speckle: closing and holes everywhere
    images = [read_image(sample_pair[key]) for key in ("fixed", "moving")]
    images += [Volume(shell, geometry), Volume(noisy, geometry)]
    for image in images:
        normalised = normalise_intensity(image.array)
        expected = ndimage.binary_fill_holes(ndimage.binary_closing(normalised > FOREGROUND_THRESHOLD, iterations=2))
        np.testing.assert_array_equal(foreground_mask(image), expected)
        np.testing.assert_array_equal(foreground_mask(image, normalised), expected)


def test_numbers_before_registration_equal_resampling_and_the_single_pair_functions():
    """The moving image as it lies on the fixed grid: taken as it is when both share one grid, which equals
    SimpleITK's resampling onto that grid (as float), and resampled otherwise; the numbers before registration
    from the evaluation's prepared fixed image equal NCC, MI, NMI and the PMM of the pair computed alone."""
    from scipy.ndimage import gaussian_filter

    from JointRegSegLib.evaluation import Evaluation
    from JointRegSegLib.imageio.intensity import normalise_intensity
    from JointRegSegLib.methods.base import Inputs
    from JointRegSegLib.metrics import arithmetic_normalised_mutual_information, mutual_information, ncc, pmm_map, pmm_mean

    rng = np.random.default_rng(5)
    direction = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]])
    grid = Geometry((34, 30, 32), (1.0, 1.2, 0.9), (-10.0, 20.0, 5.0), direction)
    other = Geometry((30, 28, 30), (1.1, 1.2, 1.0), (-9.5, 20.3, 4.8), direction)  # overlapping most of the fixed grid
    image = lambda: (1000 * gaussian_filter(rng.random(grid.shape), 2.0)).astype(np.int16)  # noqa: E731
    labels = lambda: rng.integers(0, 4, grid.shape).astype(np.int32)  # noqa: E731
    fixed = Volume(image(), grid)
    for moving_grid in (grid, other):
        moving = Volume(image()[: moving_grid.shape[0], : moving_grid.shape[1], : moving_grid.shape[2]], moving_grid)
        moving_seg = Volume(labels()[: moving_grid.shape[0], : moving_grid.shape[1], : moving_grid.shape[2]], moving_grid)
        evaluation = Evaluation(Inputs(fixed, moving, Volume(labels(), grid), moving_seg))
        reference = sitk.ResampleImageFilter()
        reference.SetReferenceImage(to_sitk(fixed))
        reference.SetInterpolator(sitk.sitkLinear)
        expected = from_sitk(reference.Execute(to_sitk(moving.with_array(moving.array.astype(np.float32))))).array
        np.testing.assert_array_equal(evaluation.initial.array, expected)
        assert evaluation.initial.array.dtype == np.float32 and evaluation.initial.geometry == fixed.geometry
        reference.SetInterpolator(sitk.sitkNearestNeighbor)
        np.testing.assert_array_equal(evaluation.initial_seg, from_sitk(reference.Execute(to_sitk(moving_seg))).array)

        f, m, mask = normalise_intensity(fixed.array), normalise_intensity(evaluation.initial.array), evaluation.mask
        assert np.isfinite(list(evaluation.initial_numbers.values())).all()
        assert evaluation.initial_numbers == {
            "ncc_initial": ncc(f, m, mask),
            "mi_initial": mutual_information(f, m, mask=mask),
            "nmi_initial": arithmetic_normalised_mutual_information(f, m, mask=mask),
            "pmm_mean_initial": pmm_mean(pmm_map(f, m, mask), mask),
        }


def test_numbers_before_registration_beside_the_maps_equal_the_numbers_after_an_identity_result():
    """`Evaluation.maps` computes the numbers before registration on a thread beside the PMM and the Jacobian; for a
    result that leaves the moving image as it lies, every number after must equal its number before."""
    from scipy.ndimage import gaussian_filter

    from JointRegSegLib.evaluation import Evaluation
    from JointRegSegLib.methods.base import Inputs, Result

    rng = np.random.default_rng(11)
    grid = Geometry((40, 36, 38), (1.0, 1.1, 0.9), (5.0, -3.0, 2.0), np.eye(3))
    image = lambda: Volume((1000 * gaussian_filter(rng.random(grid.shape), 2.0)).astype(np.float32), grid)  # noqa: E731
    labels = lambda: Volume(rng.integers(0, 4, grid.shape).astype(np.int32), grid)  # noqa: E731
    evaluation = Evaluation(Inputs(image(), image(), labels(), labels()))
    identity = Result(Volume(np.zeros((*grid.shape, 3), np.float32), grid), evaluation.inputs.moving,
                      warped_seg=evaluation.inputs.moving_seg)
    maps = evaluation.maps(identity)
    metrics = evaluation.metrics(identity, maps)
    for key in ("ncc", "mi", "nmi", "pmm_mean", "dice_mean"):
        assert np.isfinite(metrics[key]) and metrics[key] == metrics[f"{key}_initial"], key


def test_evaluation_started_before_the_registration_equals_one_computed_in_turn():
    """The worker starts the fixed image's side and the numbers before registration on a thread before it registers
    (`numbers_before_beside`); checking, mapping and scoring a result then must give the metrics and maps of an
    evaluation that computes everything in turn."""
    from scipy.ndimage import gaussian_filter

    from JointRegSegLib.evaluation import Evaluation
    from JointRegSegLib.methods.base import Inputs, Result

    rng = np.random.default_rng(12)
    grid = Geometry((36, 40, 34), (1.0, 0.9, 1.2), (2.0, 1.0, -4.0), np.eye(3))
    image = lambda: Volume((1000 * gaussian_filter(rng.random(grid.shape), 2.0)).astype(np.float32), grid)  # noqa: E731
    labels = lambda: Volume(rng.integers(0, 5, grid.shape).astype(np.int32), grid)  # noqa: E731
    inputs = Inputs(image(), image(), labels(), labels())
    field = Volume(rng.normal(scale=0.3, size=(*grid.shape, 3)).astype(np.float32), grid)
    result = Result(field, image(), warped_seg=labels())

    in_turn = Evaluation(inputs)
    expected_maps = in_turn.maps(result)
    expected = in_turn.metrics(result, expected_maps)
    early = Evaluation(inputs, workers=2)
    early.numbers_before_beside()
    early.check(result)
    maps = early.maps(result)
    assert early.metrics(result, maps) == expected
    np.testing.assert_array_equal(maps.pmm.array, expected_maps.pmm.array)
    np.testing.assert_array_equal(maps.mask, expected_maps.mask)
