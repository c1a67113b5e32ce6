"""jers (seed 003): affine composition, inverse warping, method conventions, CLI default atlas."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from JointRegSegLib.atlas import atlas_paths, load_atlas
from JointRegSegLib.errors import InputError
from JointRegSegLib.imageio import read_labels
from JointRegSegLib.imageio.geometry import Geometry, Volume
from JointRegSegLib.imageio.network_grid import RAS_DIRECTION
from JointRegSegLib.imageio.sitk_bridge import from_sitk, reference_image, to_sitk
from JointRegSegLib.methods import get_method
from JointRegSegLib.methods.base import Inputs, Options
from JointRegSegLib.labels import EXTRACEREBRAL_FIRST_CODE, TISSUE_LABELS, label_info, tissue_codes, tissue_of
from JointRegSegLib.methods.jers import affine_displacement
from JointRegSegLib.nets.jers import JERS, affine_warp
from JointRegSegLib.spatial import affine_matrix
from JointRegSegLib.spatial.physical import warp_volume
from conftest import run_worker
from JointRegSegLib.training.jers import brain_mask_of, mask_gradient_l2, reference_brain, synthetic_heads


def _model_with_moving_affine(seed: int = 0) -> JERS:
    """A small JERS whose affine head gives a different, non-identity matrix for each input."""
    torch.manual_seed(seed)
    model = JERS(classes=4, extraction_encoder=(4, 4, 4, 4), affine_channels=(4, 8), segmentation_encoder=(4, 4, 4, 4))
    with torch.no_grad():
        model.registration.fc.weight.normal_(0.0, 0.05)
    return model.eval()


def test_composed_affine_is_product_of_stage_matrices_and_resamples_extracted_image(one_thread) -> None:
    model = _model_with_moving_affine()
    generator = torch.Generator().manual_seed(1)
    extracted = torch.rand(1, 1, 16, 16, 16, generator=generator)
    atlas = torch.rand(1, 1, 16, 16, 16, generator=generator)
    with torch.no_grad():
        stages, composed, warped = model.register(extracted, atlas, stages=4)
    product = stages[0][0].double()
    for step in stages[1:]:
        product = product @ step[0].double()  # A_c^N = A_i^1 A_i^2 ... A_i^N (pull convention)
    assert not torch.allclose(stages[0], stages[1])  # the stages really differ
    assert torch.allclose(composed[0].double(), product, atol=1e-6)
    # W^N is resampled from E^M with the composed matrix (not from W^{N-1})
    assert torch.allclose(warped, affine_warp(extracted, composed), atol=1e-6)
    # and each stage's matrix is what the network gives for the previous warped image
    with torch.no_grad():
        previous = affine_warp(extracted, stages[0] @ stages[1])
        assert torch.allclose(model.registration(previous, atlas), stages[2], atol=1e-6)


def test_stage_composition_matches_sequential_warping_of_a_smooth_image() -> None:
    """Warping E by A_c^2 = A_1 A_2 equals warping (E warped by A_1) by A_2 away from the border; A_2 A_1 does not."""
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 32)] * 3, indexing="ij"))
    image = (torch.exp(-2.0 * (grid**2).sum(0)) * (1.0 + 0.5 * grid[0]))[None, None]
    a1 = torch.as_tensor(affine_matrix(rotation_deg=(20, 0, 0), translation=(0.15, 0.0, 0.0), scale=(1.1, 1.0, 1.0)))[None].float()
    a2 = torch.as_tensor(affine_matrix(rotation_deg=(0, 0, 20), translation=(0.0, 0.15, 0.0)))[None].float()
    sequential = affine_warp(affine_warp(image, a1), a2)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8), slice(8, -8))
    assert float((sequential - affine_warp(image, a1 @ a2))[inner].abs().max()) < 0.015  # interpolation error only
    assert float((sequential - affine_warp(image, a2 @ a1))[inner].abs().max()) > 0.05  # the other order is wrong


def _rotated_grid() -> tuple[Geometry, Geometry]:
    atlas_grid = Geometry((30, 34, 28), (2.0, 2.0, 2.0), (28.0, 30.0, -26.0), RAS_DIRECTION)
    raw_grid = Geometry((36, 32, 30), (1.8, 2.1, 2.0), (-30.0, -35.0, -25.0), np.eye(3))
    return atlas_grid, raw_grid


def test_affine_displacement_matches_simpleitk() -> None:
    _, grid = _rotated_grid()
    matrix = affine_matrix(rotation_deg=(10, -7, 5), translation=(4.0, -3.0, 2.5), scale=(1.1, 0.95, 1.0), center=(1.0, 2.0, 3.0))
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix[:3, :3].flatten().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, *_reference_args(grid))
    expected = sitk.GetArrayFromImage(field).transpose(2, 1, 0, 3)
    assert np.allclose(affine_displacement(matrix, grid).array, expected, atol=1e-4)


def _reference_args(grid: Geometry) -> tuple:
    reference = reference_image(grid)
    return reference.GetSize(), reference.GetOrigin(), reference.GetSpacing(), reference.GetDirection()


def _blob_labels(grid: Geometry) -> Volume:
    """Nested ellipsoids (labels 1, 2, 3) on ``grid``."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    centre = (np.asarray(grid.shape) - 1) / 2.0
    r = np.sqrt((((index - centre) / (np.asarray(grid.shape) / 2.2)) ** 2).sum(-1))
    labels = np.zeros(grid.shape, np.uint8)
    labels[r < 0.9], labels[r < 0.6], labels[r < 0.3] = 1, 2, 3
    return Volume(labels, grid)


def test_atlas_labels_warped_by_inverse_and_back_return_within_a_voxel() -> None:
    atlas_grid, raw_grid = _rotated_grid()
    labels = _blob_labels(atlas_grid)
    matrix = affine_matrix(rotation_deg=(9, -6, 4), translation=(3.0, -2.0, 1.5), scale=(1.08, 0.94, 1.02))  # atlas -> raw
    in_raw = warp_volume(labels, affine_displacement(np.linalg.inv(matrix), raw_grid), interpolation="nearest")
    back = warp_volume(in_raw, affine_displacement(matrix, atlas_grid), interpolation="nearest")
    wrong = back.array != labels.array
    near_boundary = np.zeros_like(wrong)
    for value in np.unique(labels.array):
        region = labels.array == value
        near_boundary |= ndimage.binary_dilation(region, iterations=1) & ~ndimage.binary_erosion(region, iterations=1)
    assert wrong.sum() > 0  # the round trip really resamples
    assert not (wrong & ~near_boundary).any()  # every difference lies within one voxel of a boundary


def test_network_inverse_warp_of_onehot_labels_and_back(one_thread) -> None:
    labels = torch.from_numpy(_blob_labels(Geometry((32, 32, 32), (1, 1, 1), (0, 0, 0))).array.astype(np.int64))
    onehot = torch.nn.functional.one_hot(labels, 4).permute(3, 0, 1, 2)[None].float()
    theta = torch.as_tensor(affine_matrix(rotation_deg=(7, -5, 3), translation=(0.04, -0.02, 0.03), scale=(1.05, 0.96, 1.0)))[None].float()
    inverse = affine_warp(onehot, torch.linalg.inv(theta))  # eq. 7: V = B o (A_c^N)^-1
    back = affine_warp(inverse, theta).argmax(1)[0].numpy()
    wrong = back != labels.numpy()
    boundary = np.zeros_like(wrong)
    for value in range(4):
        region = labels.numpy() == value
        boundary |= ndimage.binary_dilation(region) & ~ndimage.binary_erosion(region)
    assert not (wrong & ~boundary).any()


def test_mask_smoothness_is_the_mean_squared_forward_difference() -> None:
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[:, :, 4:] = 1.0  # one plane of unit jumps along i: 64 of the 7 * 64 i-differences
    assert torch.isclose(mask_gradient_l2(mask), torch.tensor((64.0 / (7 * 64)) / 3.0))


def test_extraction_masks_multiply_and_stay_binary_at_inference(one_thread) -> None:
    model = _model_with_moving_affine()
    raw = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(raw, raw, extraction_stages=3, registration_stages=2, hard=True, segmentation=False)
    product = torch.stack(out.masks).prod(0)
    assert set(torch.unique(product).tolist()) <= {0.0, 1.0}
    assert torch.equal(out.extracted, raw * product)


@pytest.fixture(scope="module")
def atlas_inputs() -> Inputs:
    """The shipped atlas as fixed; as moving, the atlas image on another grid (3 mm, axes permuted and shifted)."""
    atlas, labels = load_atlas()
    moving_grid = Geometry((60, 56, 64), (3.0, 3.0, 3.0), (95.0, -90.0, -100.0), np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]]))
    moving = from_sitk(sitk.Resample(to_sitk(atlas), reference_image(moving_grid), sitk.Transform(), sitk.sitkLinear, 0.0))
    return Inputs(fixed=atlas, moving=moving, fixed_seg=labels)


def test_method_outputs_follow_the_result_conventions(atlas_inputs, one_thread) -> None:
    method = get_method("jers")
    assert method.info.needs_atlas and method.info.gives_brain_mask and method.info.gives_segmentation and method.info.gives_affine
    result = method.register(atlas_inputs, Options(extra={"extraction_stages": 2, "registration_stages": 2}))
    moving, fixed = atlas_inputs.moving.geometry, atlas_inputs.fixed.geometry
    assert result.brain_mask.geometry.same_as(moving) and result.moving_seg.geometry.same_as(moving)
    assert set(np.unique(result.brain_mask.array).tolist()) <= {0, 1}
    assert set(np.unique(result.moving_seg.array).tolist()) <= {0, *TISSUE_LABELS}
    extracted = result.extracted
    assert np.allclose(extracted.array, atlas_inputs.moving.array * result.brain_mask.array)
    # the affine (LPS, atlas point -> raw point) through SimpleITK reproduces the warped extracted image
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(result.affine[:3, :3].flatten().tolist())
    transform.SetTranslation(result.affine[:3, 3].tolist())
    expected = from_sitk(sitk.Resample(to_sitk(extracted), reference_image(fixed), transform, sitk.sitkLinear, 0.0)).array
    assert result.warped.geometry.same_as(fixed)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in fixed.shape], indexing="ij"), -1)
    points = fixed.index_to_physical(index)
    mapped = moving.physical_to_index(points @ result.affine[:3, :3].T + result.affine[:3, 3])
    inside = np.all((mapped > 1) & (mapped < np.asarray(moving.shape) - 2), axis=-1)  # away from the edge handling
    assert inside.mean() > 0.5
    assert np.abs(result.warped.array - expected)[inside].max() < 1e-3
    assert np.allclose(result.displacement.array, affine_displacement(result.affine, fixed).array)


def test_atlas_route_segmentation_is_the_inverse_warped_atlas(atlas_inputs, one_thread) -> None:
    result = get_method("jers").register(
        atlas_inputs, Options(extra={"segmentation": "atlas", "extraction_stages": 1, "registration_stages": 1})
    )
    expected = warp_volume(atlas_inputs.fixed_seg, affine_displacement(np.linalg.inv(result.affine), atlas_inputs.moving.geometry), "nearest")
    assert np.array_equal(result.moving_seg.array, tissue_codes(expected.array))


@pytest.mark.parametrize(
    "extra, message",
    [({"extraction_stages": 0}, "extraction_stages"), ({"segmentation": "both"}, "segmentation"), ({"speed": 1}, "unknown jers option")],
)
def test_bad_options_raise_input_errors(atlas_inputs, extra, message) -> None:
    with pytest.raises(InputError, match=message):
        get_method("jers").register(atlas_inputs, Options(extra=extra))


def test_cli_defaults_to_the_shipped_atlas(tmp_path, one_thread) -> None:
    from JointRegSegLib.cli import main

    atlas_image, _ = atlas_paths()
    out = tmp_path / "out"
    code = main([
        "register", "--method", "jers", "--moving", str(atlas_image), "--out", str(out), "--no-pictures",
        "--option", "extraction_stages=2", "--option", "registration_stages=2",
    ])
    assert code == 0
    for name in ("brain_mask.nii.gz", "moving_seg.nii.gz", "extracted.nii.gz", "warped.nii.gz", "affine.tfm"):
        assert (out / name).exists(), name
    assert main(["register", "--method", "tto", "--moving", str(atlas_image), "--out", str(tmp_path / "tto")]) == 2


def test_reference_brain_of_a_skull_stripped_scan_is_its_filled_support() -> None:
    """A stripped head (zero outside the brain, zero-valued voxels inside it) -> scipy's filled support;
    a label map's reference is its brain codes (1-499), the skull's codes (>= 500) left out."""
    rng = np.random.default_rng(3)
    brain = np.zeros((24, 28, 20), bool)
    brain[4:20, 5:23, 3:17] = True
    image = np.where(brain, rng.uniform(10.0, 100.0, brain.shape), 0.0)
    image[10:13, 12:15, 8:11] = 0.0  # zero-valued voxels inside the brain stay brain
    assert not (image > 0).all(where=brain)
    np.testing.assert_array_equal(reference_brain(image, np.zeros_like(image, np.int32), "support"), ndimage.binary_fill_holes(image > 0))
    labels = np.where(brain, 2, 0).astype(np.int32)
    labels[0:3] = 516  # skull
    np.testing.assert_array_equal(reference_brain(image, labels, "labels"), brain)


def test_training_heads_skull_stripped_keep_the_brain_and_its_csf():
    """``stripped``: a stripped head is the same posed head with every extra-cerebral code set to background."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0) - 15.5] * 3, indexing="ij")).norm(dim=0)
    head = torch.where(grid < 9, 2, torch.where(grid < 11, 24, torch.where(grid < 14, EXTRACEREBRAL_FIRST_CODE + 15, 0)))
    maps = head[None, None].expand(3, 1, -1, -1, -1).contiguous()
    raw_labels, raw = synthetic_heads(maps, [0, 1, 2], seed=7)
    labels, images = synthetic_heads(maps, [0, 1, 2], seed=7, stripped=1.0)
    assert (raw_labels >= EXTRACEREBRAL_FIRST_CODE).any() and not (labels >= EXTRACEREBRAL_FIRST_CODE).any()
    assert torch.equal(labels, raw_labels * brain_mask_of(raw_labels))
    assert (labels == 24).any()  # the CSF around the brain stays
    assert float(images[raw_labels >= EXTRACEREBRAL_FIRST_CODE].mean()) < 0.05 < float(raw[raw_labels >= EXTRACEREBRAL_FIRST_CODE].mean())


def test_the_shipped_atlas_scores_the_moving_labels_by_their_tissue(tmp_path, sample_pair):
    """Registered to the shipped atlas (no fixed image given), the moving label map is scored by its tissue classes
    against the atlas's (FSL FAST's 1 CSF, 2 grey, 3 white matter, read as the tissue codes 701-703, not as FreeSurfer's
    2 left white matter and 3 left cortex): each tissue's Dice is numpy's of the written warped label map's tissue."""
    job = {"method": "jers", "output": str(tmp_path / "out"), "moving": str(sample_pair["moving"]),
           "moving_seg": str(sample_pair["moving_seg"]), "pictures": False}
    code, events, stderr = run_worker(job, tmp_path)
    assert code == 0, stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    atlas = read_labels(atlas_paths()[1]).array
    warped = tissue_of(read_labels(tmp_path / "out" / "warped_seg.nii.gz").array)
    assert set(metrics["labels"]) == {str(code) for code in TISSUE_LABELS}
    for tissue_class, code in enumerate(TISSUE_LABELS, start=1):
        a, b = atlas == tissue_class, warped == code
        scored = metrics["labels"][str(code)]
        assert scored["name"] == label_info(code).name
        assert scored["dice"] == pytest.approx(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))
    assert metrics["dice_mean"] == pytest.approx(np.mean([metrics["labels"][str(code)]["dice"] for code in TISSUE_LABELS]))
