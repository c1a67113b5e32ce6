"""Tests of JointRegSegLib.spatial against analytic cases, numpy slicing, scipy, MONAI and SimpleITK."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy.linalg import expm
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from JointRegSegLib.errors import InputError
from JointRegSegLib.imageio.geometry import Geometry, Volume
from JointRegSegLib.imageio.network_grid import network_geometry
from JointRegSegLib.imageio.sitk_bridge import from_sitk, reference_image, to_sitk
from JointRegSegLib.spatial import (
    affine_displacement_at,
    affine_from_radians,
    affine_jacobian,
    affine_matrix,
    affine_to_displacement,
    compose,
    compose_affines,
    identity_grid,
    index_affine_to_normalised,
    index_affine_to_physical,
    integrate_velocity,
    normalised_affine_to_index,
    physical_to_voxel_field,
    regrid_voxel_field,
    read_displacement_field,
    rescale_field,
    sample_at_indices,
    to_sitk_affine,
    to_sitk_transform,
    voxel_to_physical_field,
    warp,
    warp_volume,
    write_displacement_field,
)
from JointRegSegLib.spatial.physical import _index_map, warp_volume_affine
from JointRegSegLib.spatial.sampling import trilinear_with_gradient
from JointRegSegLib.spatial.separable import axis_pairing, sample_separable

SHAPE = (20, 24, 28)


def oblique(shape, spacing, origin, angles_deg) -> Geometry:
    """A grid whose direction is a real rotation (scipy's extrinsic x-y-z Euler angles)."""
    direction = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    return Geometry(shape, spacing, origin, direction)


def all_indices(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)


def smooth_image(shape, seed: int = 0) -> np.ndarray:
    """A smooth random image that is zero on every face of the grid (so border handling cannot matter)."""
    rng = np.random.default_rng(seed)
    p = all_indices(shape)
    n = np.asarray(shape, dtype=np.float64) - 1
    image = np.zeros(shape)
    for _ in range(3):
        freq = rng.uniform(0.5, 2.0, 3) * 2 * np.pi / n
        image += rng.uniform(0.5, 1.0) * np.sin(p @ freq + rng.uniform(0, 2 * np.pi))
    window = np.prod(np.sin(np.pi * p / n), axis=-1)
    return (image * window).astype(np.float32)


def smooth_voxel_field(shape, amplitude: float, seed: int) -> torch.Tensor:
    """A smooth analytic displacement (1, 3, I, J, K) with wavelengths of about the grid size."""
    return torch.as_tensor(smooth_field_at(all_indices(shape), shape, amplitude, seed)).permute(3, 0, 1, 2)[None].float()


def smooth_field_at(points: np.ndarray, shape, amplitude: float, seed: int) -> np.ndarray:
    """The field of `smooth_voxel_field` evaluated at arbitrary continuous indices ``(..., 3)``."""
    rng = np.random.default_rng(seed)
    n = np.asarray(shape, dtype=np.float64)
    out = np.zeros(points.shape)
    for c in range(3):
        freq = rng.uniform(0.6, 1.2, 3) * 2 * np.pi / n
        out[..., c] = amplitude * np.sin(points @ freq + rng.uniform(0, 2 * np.pi))
    return out


def physical_centroid(volume: Volume) -> np.ndarray:
    weights = volume.array.astype(np.float64)
    points = volume.geometry.index_to_physical(all_indices(volume.geometry.shape))
    return (points * weights[..., None]).sum(axis=(0, 1, 2)) / weights.sum()


def interior(array: np.ndarray | torch.Tensor, margin: int):
    return array[..., margin:-margin, margin:-margin, margin:-margin]


# ----------------------------------------------------------------------------------------- warp


def test_identity_grid_holds_indices():
    grid = identity_grid(SHAPE)
    assert grid.shape == (1, 3, *SHAPE)
    np.testing.assert_array_equal(grid[0].permute(1, 2, 3, 0).numpy(), all_indices(SHAPE))


def test_zero_field_is_identity():
    image = torch.rand(2, 3, *SHAPE)
    out = warp(image, torch.zeros(2, 3, *SHAPE))
    torch.testing.assert_close(out, image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [3, -2])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_whole_voxel_shift_matches_numpy_slicing(axis, shift, mode):
    image = torch.rand(1, 1, *SHAPE)
    disp = torch.zeros(1, 3, *SHAPE)
    disp[:, axis] = shift
    out = warp(image, disp, mode=mode)[0, 0].numpy()
    expected = np.zeros(SHAPE, dtype=np.float32)
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    n = SHAPE[axis]
    if shift > 0:  # out[p] = image[p + shift]; the last `shift` slices fall outside (zero)
        dst[axis], src[axis] = slice(0, n - shift), slice(shift, n)
    else:
        dst[axis], src[axis] = slice(-shift, n), slice(0, n + shift)
    expected[tuple(dst)] = image[0, 0].numpy()[tuple(src)]
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("padding, scipy_mode", [("zeros", "grid-constant"), ("border", "nearest")])
def test_warp_of_a_random_field_matches_scipy_inside_and_outside_the_image(padding, scipy_mode):
    """`warp` builds grid_sample's grid from the field in place (`_sampling_grid`); every value must equal scipy's
    trilinear interpolation at ``p + u(p)``, for fields reaching beyond the image, in float64 to rounding; the
    nearest mode the value of the nearest voxel (points off the half-voxel ties)."""
    rng = np.random.default_rng(21)
    shape = (9, 12, 7)
    image = torch.as_tensor(rng.normal(size=(2, 2, *shape)))
    disp = torch.as_tensor(rng.normal(scale=3.0, size=(2, 3, *shape)))
    warped = warp(image, disp, padding_mode=padding).numpy()
    points = all_indices(shape)
    for b in range(2):
        where = np.moveaxis(points + np.moveaxis(disp[b].numpy(), 0, -1), -1, 0)
        for c in range(2):
            expected = map_coordinates(image[b, c].numpy(), where, order=1, mode=scipy_mode, cval=0.0)
            np.testing.assert_allclose(warped[b, c], expected, atol=1e-12)
    nearest = warp(image, disp, mode="nearest", padding_mode="border").numpy()
    rounded = np.clip(np.rint(np.moveaxis(points, -1, 0)[None] + disp.numpy()), 0, np.array(shape)[None, :, None, None, None] - 1).astype(int)
    for b in range(2):
        np.testing.assert_array_equal(nearest[b], image[b].numpy()[:, rounded[b, 0], rounded[b, 1], rounded[b, 2]])


def test_affine_displacement_at_points_equals_sampling_the_affine_field_with_border_padding():
    """What `compose` reads of an affine's displacement field (trilinear, border padding), computed from the matrix:
    points inside the grid and up to 6 voxels beyond it on every side."""
    rng = np.random.default_rng(4)
    shape = (10, 13, 8)
    matrix = np.eye(4)
    matrix[:3, :3] += rng.normal(scale=0.1, size=(3, 3))
    matrix[:3, 3] = (1.5, -2.0, 0.7)
    points = torch.as_tensor(rng.uniform(-6, np.array(shape) + 5, size=(500, 3)))
    field = affine_to_displacement(torch.as_tensor(matrix), shape)
    expected = sample_at_indices(field, points.view(1, -1, 1, 1, 3), padding_mode="border").view(3, -1).T
    computed = affine_displacement_at(matrix, points, shape)
    assert computed.shape == points.shape
    np.testing.assert_allclose(computed.numpy(), expected.numpy(), atol=1e-12)


@pytest.mark.parametrize("shape", [(9, 12, 7), (1, 6, 5), (4, 1, 1)])
def test_trilinear_with_gradient_is_scipy_and_autograd_inside_and_beyond_the_image(shape):
    """Values: scipy's trilinear interpolation with edge values beyond the image (float64, to rounding). Slopes:
    autograd's through `sample_at_indices` (grid_sample, border padding): 0 along an axis beyond the image."""
    rng = np.random.default_rng(8)
    image = torch.as_tensor(rng.normal(size=shape))
    points = torch.as_tensor(rng.uniform(-3, np.array(shape) + 2, size=(400, 3)))
    values, slopes = trilinear_with_gradient(image, points)
    expected = map_coordinates(image.numpy(), points.numpy().T, order=1, mode="nearest")
    np.testing.assert_allclose(values.numpy(), expected, atol=1e-12)
    where = points.clone().requires_grad_(True)
    sample_at_indices(image[None, None], where.view(1, -1, 1, 1, 3), padding_mode="border").sum().backward()
    np.testing.assert_allclose(slopes.numpy(), where.grad.numpy(), atol=1e-9)
    beyond = (points < 0) | (points > torch.tensor(shape) - 1)
    assert beyond.any() and torch.all(slopes[beyond] == 0)


def test_warp_is_differentiable_in_image_and_field():
    image = torch.rand(1, 1, 8, 9, 10, requires_grad=True)
    disp = (0.3 * torch.randn(1, 3, 8, 9, 10)).requires_grad_()
    warp(image, disp).sum().backward()
    assert image.grad is not None and disp.grad is not None and disp.grad.abs().sum() > 0


def test_warp_rejects_mismatched_shapes():
    image = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(InputError, match=r"\(1, 1, 8, 8, 8\).*\(1, 3, 8, 8, 9\)"):
        warp(image, torch.zeros(1, 3, 8, 8, 9))
    with pytest.raises(InputError, match=r"\(1, 2, 8, 8, 8\)"):
        warp(image, torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(InputError, match=r"\(2, 3, 8, 8, 8\)"):
        warp(image, torch.zeros(2, 3, 8, 8, 8))
    with pytest.raises(InputError, match="interpolation mode"):
        warp(image, torch.zeros(1, 3, 8, 8, 8), mode="cubic")


# ------------------------------------------------------------------------------------ physical

FIXED = oblique((32, 36, 28), (1.2, 0.9, 1.5), (10.0, -20.0, 5.0), (20.0, -15.0, 30.0))


def gaussian_blob(grid: Geometry, sigma_mm: float = 2.5) -> Volume:
    centre = grid.index_to_physical((np.asarray(grid.shape) - 1) / 2.0)
    points = grid.index_to_physical(all_indices(grid.shape))
    return Volume(np.exp(-((points - centre) ** 2).sum(-1) / (2 * sigma_mm**2)).astype(np.float32), grid)


def constant_field(grid: Geometry, t) -> Volume:
    return Volume(np.broadcast_to(np.asarray(t, dtype=np.float32), (*grid.shape, 3)).copy(), grid)


TRANSLATIONS = [(3.0, 0.0, 0.0), (0.0, -2.0, 0.0), (0.0, 0.0, 5.0), (3.0, -2.0, 5.0)]


@pytest.mark.parametrize("t", TRANSLATIONS)
def test_physical_translation_moves_content_by_minus_t(t):
    moving = gaussian_blob(FIXED)
    out = warp_volume(moving, constant_field(FIXED, t))
    # Pull convention: out(x) = moving(x + t), so the blob moves by -t (trilinear shifts keep the centroid exactly).
    np.testing.assert_allclose(physical_centroid(out), physical_centroid(moving) - np.asarray(t), atol=1e-3)


def network_grid_around(fixed: Geometry, spacing=(1.0, 1.25, 1.0)) -> Geometry:
    """A hand-built network grid, direction diag(-1, -1, 1), covering the fixed grid with 2 voxels to spare."""
    corners = all_indices((2, 2, 2)).reshape(-1, 3) * (np.asarray(fixed.shape) - 1)
    points = fixed.index_to_physical(corners)
    low, high = points.min(0), points.max(0)
    direction = np.diag([-1.0, -1.0, 1.0])
    origin = np.array([high[0], high[1], low[2]]) - direction @ (2 * np.asarray(spacing))
    shape = np.ceil((high - low) / spacing).astype(int) + 5
    return Geometry(tuple(shape), spacing, tuple(origin), direction)


@pytest.mark.parametrize("t", TRANSLATIONS)
def test_network_voxel_translation_is_physical_translation(t):
    grid = network_grid_around(FIXED)
    t_idx = np.linalg.solve(grid.direction @ np.diag(grid.spacing), np.asarray(t))
    disp = torch.as_tensor(t_idx, dtype=torch.float32).view(3, 1, 1, 1).expand(3, *grid.shape)
    field = voxel_to_physical_field(disp, grid, FIXED)
    assert field.geometry is FIXED and field.array.shape == (*FIXED.shape, 3) and field.array.dtype == np.float32
    np.testing.assert_allclose(field.array, np.broadcast_to(t, field.array.shape), atol=1e-5)

    # The same translation applied on the network grid with `warp` moves the blob by -t as well.
    moving = gaussian_blob(FIXED)
    on_grid = warp_volume(moving, constant_field(grid, (0.0, 0.0, 0.0)))
    warped = warp(torch.as_tensor(on_grid.array)[None, None], disp[None].contiguous())[0, 0].numpy()
    np.testing.assert_allclose(
        physical_centroid(Volume(warped, grid)), physical_centroid(moving) - np.asarray(t), atol=1e-3
    )
    back = physical_to_voxel_field(field, grid)
    np.testing.assert_allclose(back.numpy(), disp.numpy(), atol=1e-5)


NETWORK = oblique((30, 34, 26), (1.3, 1.1, 1.4), (0.0, -25.0, -5.0), (-10.0, 25.0, 5.0))
# A scan stored axis-aligned (LPS direction a flipped permutation, as the benchmark pair's) and its
# network grid: every index axis of one follows one axis of the other, the separable path.
FIXED_ALIGNED = Geometry((32, 36, 28), (1.2, 0.9, 1.5), (10.0, -20.0, 5.0), np.array([[1.0, 0, 0], [0, 0, -1.0], [0, -1.0, 0]]))
NETWORK_ALIGNED = network_geometry(FIXED_ALIGNED, spacing=2.5, multiple=4)
GRID_PAIRS = pytest.mark.parametrize(
    "fixed, network", [(FIXED, NETWORK), (FIXED_ALIGNED, NETWORK_ALIGNED)], ids=["oblique", "axis-aligned"]
)


def test_the_grid_pairs_take_both_sampling_paths():
    assert axis_pairing(_index_map(FIXED, NETWORK), FIXED.shape) is None
    assert axis_pairing(_index_map(FIXED_ALIGNED, NETWORK_ALIGNED), FIXED_ALIGNED.shape) == (0, 2, 1)
    assert axis_pairing(_index_map(NETWORK_ALIGNED, FIXED_ALIGNED), NETWORK_ALIGNED.shape) == (0, 2, 1)


@GRID_PAIRS
def test_voxel_to_physical_matches_scipy_interpolation(fixed, network):
    disp = smooth_voxel_field(network.shape, 2.0, seed=3)[0]
    field = voxel_to_physical_field(disp, network, fixed)
    c = network.physical_to_index(fixed.index_to_physical(all_indices(fixed.shape)))
    u_idx = np.stack(
        [map_coordinates(disp[a].double().numpy(), np.moveaxis(c, -1, 0), order=1, mode="nearest") for a in range(3)],
        axis=-1,
    )
    expected = u_idx @ (network.direction @ np.diag(network.spacing)).T
    np.testing.assert_allclose(field.array, expected, atol=1e-4)


@GRID_PAIRS
def test_physical_to_voxel_matches_scipy_interpolation(fixed, network):
    rng = np.random.default_rng(5)
    field = Volume(rng.normal(size=(*fixed.shape, 3)).astype(np.float32), fixed)
    disp = physical_to_voxel_field(field, network)
    c = fixed.physical_to_index(network.index_to_physical(all_indices(network.shape)))
    u_phys = np.stack(
        [map_coordinates(field.array[..., a].astype(np.float64), np.moveaxis(c, -1, 0), order=1, mode="nearest") for a in range(3)],
        axis=-1,
    )
    expected = u_phys @ np.linalg.inv(network.direction @ np.diag(network.spacing)).T
    np.testing.assert_allclose(disp.permute(1, 2, 3, 0).numpy(), expected, atol=1e-4)


@GRID_PAIRS
def test_regrid_voxel_field_matches_scipy_interpolation_and_the_physical_field(fixed, network):
    disp = smooth_voxel_field(network.shape, 2.0, seed=4)
    on_fixed = regrid_voxel_field(disp.double(), network, fixed)[0]
    c = network.physical_to_index(fixed.index_to_physical(all_indices(fixed.shape)))
    u_idx = np.stack(
        [map_coordinates(disp[0, a].double().numpy(), np.moveaxis(c, -1, 0), order=1, mode="nearest") for a in range(3)],
        axis=-1,
    )
    expected = u_idx @ (np.linalg.inv(fixed.direction @ np.diag(fixed.spacing)) @ network.direction @ np.diag(network.spacing)).T
    np.testing.assert_allclose(on_fixed.permute(1, 2, 3, 0).numpy(), expected, atol=1e-4)
    # the same physical displacement as voxel_to_physical_field gives, in voxels of the fixed grid
    physical = voxel_to_physical_field(disp[0], network, fixed).array
    np.testing.assert_allclose(on_fixed.permute(1, 2, 3, 0).numpy() @ (fixed.direction @ np.diag(fixed.spacing)).T, physical, atol=1e-4)
    assert regrid_voxel_field(disp, network, network) is disp


@pytest.mark.parametrize("padding, scipy_mode", [("zeros", "grid-constant"), ("border", "nearest")])
def test_separable_sampling_matches_scipy_inside_and_outside_the_source(padding, scipy_mode):
    # a flipped, scaled permutation reaching 3 voxels beyond the source on every side
    source = torch.as_tensor(np.random.default_rng(6).normal(size=(2, 3, 9, 11, 7)))
    target_shape = (20, 13, 17)
    matrix = np.array([[0.0, 0, -0.75, 8.0], [0.0, 1.1, 0, -2.9], [0.4, 0, 0, -3.1], [0, 0, 0, 1]])
    sampled = sample_separable(source, matrix, target_shape, padding)
    points = np.moveaxis(all_indices(target_shape) @ matrix[:3, :3].T + matrix[:3, 3], -1, 0)
    expected = np.stack([
        np.stack([map_coordinates(channel, points, order=1, mode=scipy_mode, cval=0.0) for channel in batch]) for batch in source.numpy()
    ])
    np.testing.assert_allclose(sampled.numpy(), expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: sample_separable(v, matrix, (5, 4, 6), padding), source[:1, :1, :4, :5, :3].clone().requires_grad_())
    oblique_matrix = matrix.copy()
    oblique_matrix[0, 1] = 0.05
    assert sample_separable(source, oblique_matrix, target_shape, padding) is None


def test_voxel_physical_round_trip_of_an_affine_field():
    # A displacement that is affine in space is reproduced exactly by trilinear interpolation, so
    # voxel -> physical -> voxel must return it wherever the network voxel lies inside the fixed grid.
    grid = network_grid_around(FIXED)
    centre = (np.asarray(grid.shape) - 1) / 2
    a = affine_matrix(rotation_deg=(4, -3, 6), translation=(1.5, -2, 0.5), scale=(1.03, 0.97, 1.0), center=centre)
    disp = affine_to_displacement(torch.as_tensor(a, dtype=torch.float32), grid.shape)[0]
    back = physical_to_voxel_field(voxel_to_physical_field(disp, grid, FIXED), grid)
    c = FIXED.physical_to_index(grid.index_to_physical(all_indices(grid.shape)))
    inside = np.all((c >= 0) & (c <= np.asarray(FIXED.shape) - 1), axis=-1)
    assert inside.sum() > 1000
    np.testing.assert_allclose(back.permute(1, 2, 3, 0).numpy()[inside], disp.permute(1, 2, 3, 0).numpy()[inside], atol=1e-3)


# ----------------------------------------------------------------------- SimpleITK and field files

MOVING = oblique((30, 28, 26), (1.0, 1.2, 0.8), (12.0, -18.0, 2.0), (-25.0, 10.0, -35.0))


def smooth_physical_field(grid: Geometry, amplitude_mm: float = 3.0, seed: int = 7) -> Volume:
    points = grid.index_to_physical(all_indices(grid.shape))
    rng = np.random.default_rng(seed)
    array = np.zeros((*grid.shape, 3))
    for c in range(3):
        freq = rng.uniform(-1, 1, 3) * 2 * np.pi / 30.0
        array[..., c] = amplitude_mm * np.sin(points @ freq + rng.uniform(0, 2 * np.pi)) + rng.uniform(-2, 2)
    return Volume(array.astype(np.float32), grid)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_field_file_round_trip_and_simpleitk_resample(tmp_path, suffix):
    moving = Volume(smooth_image(MOVING.shape, seed=1), MOVING)
    field = smooth_physical_field(FIXED)
    path = tmp_path / f"field{suffix}"
    write_displacement_field(field, path)

    read = read_displacement_field(path)
    np.testing.assert_array_equal(read.array, field.array)
    assert read.geometry.same_as(field.geometry, atol=1e-4)
    if suffix == ".nii.gz":  # NIfTI displacement vectors (intent 1006, as Slicer writes them): RAS components
        nifti = nib.load(path)
        assert int(nifti.header["intent_code"]) == 1006
        stored = np.asarray(nifti.dataobj).reshape(field.array.shape)
        np.testing.assert_array_equal(stored, field.array * np.float32([-1.0, -1.0, 1.0]))

    # SimpleITK reads the file itself as a displacement field, independently of our reader.
    itk_field = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(itk_field)
    expected = from_sitk(
        sitk.Resample(to_sitk(moving), reference_image(read.geometry), transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ).array
    ours = warp_volume(moving, read)
    assert ours.geometry is read.geometry
    assert np.abs(expected).max() > 0.3  # the warped content is inside the field of view
    # Both are trilinear; only float32 coordinates separate them (values are O(1)).
    np.testing.assert_allclose(ours.array, expected, atol=1e-4)

    # to_sitk_transform gives the same transform as the file.
    from_ours = to_sitk_transform(field)
    point = FIXED.index_to_physical(np.array([7.0, 11.0, 5.0]))
    np.testing.assert_allclose(from_ours.TransformPoint(point.tolist()), transform.TransformPoint(point.tolist()), atol=1e-5)


def _lps_affine() -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("xyz", (8.0, -5.0, 12.0), degrees=True).as_matrix() @ np.diag((1.05, 0.95, 1.1))
    centre = FIXED.index_to_physical((np.asarray(FIXED.shape) - 1) / 2.0)
    matrix[:3, 3] = MOVING.index_to_physical((np.asarray(MOVING.shape) - 1) / 2.0) - matrix[:3, :3] @ centre + (1.0, -2.0, 0.5)
    return matrix


def test_affine_warp_is_exact_for_a_linear_image_and_agrees_with_the_field_warp_for_labels():
    matrix = _lps_affine()
    points = FIXED.index_to_physical(all_indices(FIXED.shape))
    mapped = points @ matrix[:3, :3].T + matrix[:3, 3]
    gradient, offset = np.array([0.3, -0.2, 0.5]), 4.0
    image = Volume((MOVING.index_to_physical(all_indices(MOVING.shape)) @ gradient + offset).astype(np.float32), MOVING)
    warped = warp_volume_affine(image, matrix, FIXED, default=-1.0)
    assert warped.geometry is FIXED and warped.array.dtype == np.float32
    index = MOVING.physical_to_index(mapped)
    inside = np.all((index >= 0) & (index <= np.asarray(MOVING.shape) - 1), axis=-1)
    far_outside = np.any((index < -1) | (index > np.asarray(MOVING.shape)), axis=-1)
    assert inside.mean() > 0.2 and far_outside.mean() > 0.05
    # linear interpolation reproduces a linear function exactly inside the moving grid; outside is the default
    np.testing.assert_allclose(warped.array[inside], (mapped @ gradient + offset)[inside], atol=1e-3)
    assert np.all(warped.array[far_outside] == -1.0)

    labels = Volume(np.random.default_rng(3).integers(0, 5, MOVING.shape).astype(np.int16), MOVING)
    by_affine = warp_volume_affine(labels, matrix, FIXED, "nearest")
    by_field = warp_volume(labels, Volume((mapped - points).astype(np.float32), FIXED), "nearest")
    assert by_affine.array.dtype == np.int16
    assert np.mean(by_affine.array != by_field.array) < 1e-3  # only float ties at voxel boundaries differ
    mask = warp_volume_affine(Volume(labels.array > 2, MOVING), matrix, FIXED, "nearest")
    assert mask.array.dtype == bool and np.array_equal(mask.array, by_affine.array > 2)


def test_warp_volume_nearest_matches_simpleitk_for_labels():
    rng = np.random.default_rng(2)
    labels = Volume(rng.integers(0, 5, MOVING.shape).astype(np.uint8), MOVING)
    field = smooth_physical_field(FIXED, seed=11)
    ours = warp_volume(labels, field, interpolation="nearest")
    assert ours.array.dtype == np.uint8
    expected = from_sitk(
        sitk.Resample(to_sitk(labels), reference_image(FIXED), to_sitk_transform(field), sitk.sitkNearestNeighbor, 0)
    ).array
    # Rounding can differ only where a sample point lies within float32 error of a voxel boundary.
    assert np.mean(ours.array != expected) < 1e-3


def test_field_io_rejects_bad_input(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_displacement_field(tmp_path / "missing.nii.gz")
    scalar = tmp_path / "scalar.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkFloat32), str(scalar))
    with pytest.raises(InputError, match="3 components"):
        read_displacement_field(scalar)
    with pytest.raises(InputError, match=r"\(I, J, K, 3\)"):
        write_displacement_field(Volume(np.zeros((4, 4, 4, 2), np.float32), Geometry((4, 4, 4), (1, 1, 1), (0, 0, 0))), scalar)


# --------------------------------------------------------------------------- composition, velocity


def smooth_image_at(points: np.ndarray, shape) -> np.ndarray:
    """A unit-amplitude analytic image with ~32-voxel wavelengths, evaluated at continuous indices ``(..., 3)``."""
    q = 2 * np.pi * points / np.asarray(shape, dtype=np.float64)
    return np.sin(q[..., 0] + 0.4) * np.cos(q[..., 1] - 0.2) + 0.5 * np.sin(q[..., 2] + q[..., 0])


def test_compose_equals_sequential_warps():
    shape = (32, 32, 32)
    p = all_indices(shape)
    image = torch.as_tensor(smooth_image_at(p, shape), dtype=torch.float32)[None, None]
    u_a = smooth_voxel_field(shape, 1.5, seed=1)
    u_b = smooth_voxel_field(shape, 1.5, seed=2)
    sequential = interior(warp(warp(image, u_a), u_b)[0, 0].numpy(), 6)
    composed = interior(warp(image, compose(u_a, u_b))[0, 0].numpy(), 6)
    swapped = interior(warp(image, compose(u_b, u_a))[0, 0].numpy(), 6)
    b = smooth_field_at(p, shape, 1.5, seed=2)
    truth = interior(smooth_image_at(p + b + smooth_field_at(p + b, shape, 1.5, seed=1), shape), 6)
    # Tolerance 0.03: the trilinear interpolation error bound h^2/8 * sum_a |d2f/dp_a^2| of this image
    # is about 0.03 (unit amplitude, 32-voxel wavelengths); interior voxels only (fields reach 3 voxels).
    assert np.abs(composed - truth).max() < 0.03
    assert np.abs(sequential - truth).max() < 0.03
    assert np.abs(sequential - composed).max() < 0.03
    assert np.abs(sequential - swapped).max() > 0.15  # order matters, so the checks above are meaningful


def test_compose_matches_analytic_composition():
    shape = (32, 32, 32)
    u_a = smooth_voxel_field(shape, 1.5, seed=1)
    u_b = smooth_voxel_field(shape, 1.5, seed=2)
    p = all_indices(shape)
    b = smooth_field_at(p, shape, 1.5, seed=2)
    expected = b + smooth_field_at(p + b, shape, 1.5, seed=1)  # c(p) = u_b(p) + u_a(p + u_b(p))
    got = compose(u_a, u_b)[0].permute(1, 2, 3, 0).numpy()
    # Only the trilinear interpolation of u_a (amplitude 1.5 voxels) separates them.
    np.testing.assert_allclose(got[4:-4, 4:-4, 4:-4], expected[4:-4, 4:-4, 4:-4], atol=0.02)


def test_compose_affines_matches_compose_of_their_fields():
    shape = (24, 28, 20)
    centre = (np.asarray(shape) - 1) / 2
    a = affine_matrix(rotation_deg=(5, -3, 8), translation=(1, -1.5, 0.5), scale=(1.02, 0.98, 1.01), shear=(0.02, 0, -0.01), center=centre)
    b = affine_matrix(rotation_deg=(-4, 6, 2), translation=(-0.5, 1, 2), scale=(0.97, 1.03, 1.0), shear=(0, 0.03, 0), center=centre)

    def field(m: np.ndarray) -> torch.Tensor:
        return affine_to_displacement(torch.as_tensor(m, dtype=torch.float32)[None], shape)

    composed = compose(field(a), field(b))[0].permute(1, 2, 3, 0).numpy()
    p = all_indices(shape)
    bp = p @ b[:3, :3].T + b[:3, 3]
    inside = np.all((bp >= 0) & (bp <= np.asarray(shape) - 1), axis=-1)  # trilinear is exact on affine fields there
    assert inside.mean() > 0.5
    got = field(compose_affines(a, b))[0].permute(1, 2, 3, 0).numpy()
    np.testing.assert_allclose(got[inside], composed[inside], atol=1e-3)
    wrong = field(compose_affines(b, a))[0].permute(1, 2, 3, 0).numpy()
    assert np.abs(wrong[inside] - composed[inside]).max() > 0.1
    batched = compose_affines(torch.as_tensor(a)[None], torch.as_tensor(b)[None, :3])
    np.testing.assert_allclose(batched[0].numpy(), a @ b)


def test_integrate_constant_velocity_is_that_displacement():
    v = torch.tensor([0.7, -1.3, 2.1]).view(1, 3, 1, 1, 1).expand(1, 3, *SHAPE).contiguous()
    torch.testing.assert_close(integrate_velocity(v), v, atol=1e-4, rtol=0)


def test_integrate_linear_velocity_is_matrix_exponential():
    shape = (32, 32, 32)
    centre = (np.asarray(shape) - 1) / 2
    rng = np.random.default_rng(4)
    lin = 0.05 * rng.normal(size=(3, 3))
    p = all_indices(shape)
    v = torch.as_tensor((p - centre) @ lin.T).permute(3, 0, 1, 2)[None].float()
    expected = (p - centre) @ (expm(lin) - np.eye(3)).T  # exp of v(p) = L (p - c) is p -> c + e^L (p - c)
    got = integrate_velocity(v, steps=7)[0].permute(1, 2, 3, 0).numpy()
    np.testing.assert_allclose(got[6:-6, 6:-6, 6:-6], expected[6:-6, 6:-6, 6:-6], atol=2e-3)


def test_integrate_velocity_equals_monai_dvf2ddf_with_border_padding():
    from monai.networks.blocks import DVF2DDF

    v = smooth_voxel_field((24, 24, 24), 2.0, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai_disp = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")(v)
    torch.testing.assert_close(integrate_velocity(v, steps=7), monai_disp, atol=1e-5, rtol=0)


def test_integrated_fields_of_v_and_minus_v_are_inverse():
    shape = (32, 32, 32)
    v = smooth_voxel_field(shape, 1.0, seed=9)
    forward, backward = integrate_velocity(v), integrate_velocity(-v)
    assert interior(forward, 6).abs().max() > 0.8
    # exp(v) o exp(-v) = id up to the trilinear interpolation of 7 squarings: 0.05 voxels.
    assert interior(compose(forward, backward), 6).abs().max() < 0.05
    assert interior(compose(backward, forward), 6).abs().max() < 0.05
    # Whereas negating the displacement is no inverse for a field this large.
    assert interior(compose(forward, -forward), 6).abs().max() > 0.2


def test_rescale_field_of_an_affine_field():
    old, new = (17, 21, 25), (33, 41, 49)
    a = affine_matrix(rotation_deg=(3, 4, -5), translation=(1, 2, -1), scale=(1.05, 1, 0.95), center=(8, 10, 12))
    s = np.diag([*((np.asarray(old) - 1) / (np.asarray(new) - 1)), 1.0])  # new index -> old index
    expected = affine_to_displacement(torch.as_tensor(np.linalg.inv(s) @ a @ s, dtype=torch.float32), new)
    got = rescale_field(affine_to_displacement(torch.as_tensor(a, dtype=torch.float32), old), new)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


# -------------------------------------------------------------------------------------- affine


def test_affine_matrix_rotation_matches_scipy_and_center_is_fixed():
    angles, centre = (10.0, -20.0, 35.0), np.array([3.0, -2.0, 7.0])
    m = affine_matrix(rotation_deg=angles, center=centre)
    np.testing.assert_allclose(m[:3, :3], Rotation.from_euler("xyz", angles, degrees=True).as_matrix(), atol=1e-12)
    np.testing.assert_allclose(m[:3, :3] @ centre + m[:3, 3], centre, atol=1e-12)


def test_affine_jacobian_matches_central_differences_and_radians_match_degrees():
    rng = np.random.default_rng(5)
    angles, translation, scale, shear, centre = rng.normal(0, 0.4, 3), rng.normal(0, 4, 3), rng.uniform(0.8, 1.2, 3), rng.normal(0, 0.1, 3), rng.normal(20, 5, 3)
    np.testing.assert_allclose(
        affine_from_radians(angles, translation, scale, shear, centre),
        affine_matrix(np.rad2deg(angles), translation, scale, shear, centre), atol=1e-12,
    )
    x = np.concatenate([translation, angles, scale, shear])

    def top(values: np.ndarray) -> np.ndarray:
        return affine_from_radians(values[3:6], values[0:3], values[6:9], values[9:12], centre)[:3]

    step = 1e-6
    numeric = np.stack([(top(x + step * e) - top(x - step * e)) / (2 * step) for e in np.eye(12)])
    np.testing.assert_allclose(affine_jacobian(angles, scale, shear, centre), numeric, atol=1e-7)


def test_translation_matrix_gives_constant_displacement():
    t = (2.5, -1.0, 3.25)
    disp = affine_to_displacement(torch.as_tensor(affine_matrix(translation=t), dtype=torch.float32)[None, :3], SHAPE)
    torch.testing.assert_close(disp, torch.tensor(t).view(1, 3, 1, 1, 1).expand(1, 3, *SHAPE), atol=1e-6, rtol=0)


def test_normalised_affine_matches_affine_grid():
    image = torch.rand(2, 2, *SHAPE)
    centre = (np.asarray(SHAPE) - 1) / 2
    a = affine_matrix(rotation_deg=(7, -5, 12), translation=(1.5, -2, 0.7), scale=(1.1, 0.9, 1.05), shear=(0.05, 0, 0), center=centre)
    a_t = torch.as_tensor(a, dtype=torch.float32)[None].expand(2, 4, 4)
    theta = index_affine_to_normalised(a_t, SHAPE)
    assert theta.shape == (2, 3, 4)
    grid = F.affine_grid(theta, list(image.shape), align_corners=True)
    torch_out = F.grid_sample(image, grid, align_corners=True)
    torch.testing.assert_close(torch_out, warp(image, affine_to_displacement(a_t, SHAPE)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(normalised_affine_to_index(index_affine_to_normalised(a, SHAPE), SHAPE), a, atol=1e-12)
    torch.testing.assert_close(normalised_affine_to_index(theta, SHAPE), a_t, atol=1e-5, rtol=0)


def test_index_affine_in_physical_space_matches_simpleitk():
    shape = (24, 28, 20)
    fixed = oblique(shape, (1.1, 0.9, 1.3), (5.0, -10.0, 2.0), (15.0, -10.0, 25.0))
    moving = oblique(shape, (1.0, 1.2, 0.8), (4.0, -12.0, 6.0), (-20.0, 5.0, 10.0))
    image = smooth_image(shape, seed=4)
    centre = (np.asarray(shape) - 1) / 2
    a = affine_matrix(rotation_deg=(6, -4, 9), translation=(1.2, -0.8, 0.6), scale=(1.05, 0.95, 1.02), center=centre)
    ours = warp(torch.as_tensor(image)[None, None], affine_to_displacement(a, shape))[0, 0].numpy()
    transform = to_sitk_affine(index_affine_to_physical(a, fixed, moving))
    expected = from_sitk(
        sitk.Resample(to_sitk(Volume(image, moving)), reference_image(fixed), transform, sitk.sitkLinear, 0.0)
    ).array
    assert np.abs(expected).max() > 0.3
    np.testing.assert_allclose(ours, expected, atol=1e-4)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("mode, padding_mode", [("bilinear", "zeros"), ("bilinear", "border"), ("nearest", "zeros")])
def test_grid_sample_3d_on_every_thread_is_grid_sample(threads: int, mode: str, padding_mode: str) -> None:
    """A single volume cut into batch items along the grid's first axis (an odd 13 planes): the same values and grid
    gradient bit for bit, the image's gradient up to rounding, as torch's one-thread call."""
    from JointRegSegLib.spatial.sampling import grid_sample_3d

    generator = torch.Generator().manual_seed(threads)
    image = torch.rand(1, 3, 11, 9, 10, generator=generator, requires_grad=True)
    grid = (torch.rand(1, 13, 7, 8, 3, generator=generator) * 2.4 - 1.2).requires_grad_(True)  # some points outside
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        ours = grid_sample_3d(image, grid, mode, padding_mode)
        ours.square().sum().backward()
        ours_image, ours_grid = image.grad.clone(), grid.grad.clone()
    finally:
        torch.set_num_threads(previous)
    image.grad, grid.grad = None, None
    theirs = F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    theirs.square().sum().backward()
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    assert torch.equal(ours_grid, grid.grad)
    torch.testing.assert_close(ours_image, image.grad, rtol=1e-6, atol=1e-6)
