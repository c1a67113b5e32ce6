"""U-ReSNet (seed 002): network parametrisation, eq. 1 composition, affine recovery, label codes, worker outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import run_worker

from JointRegSegLib.imageio.geometry import Geometry, Volume
from JointRegSegLib.imageio.io import read_labels, read_volume
from JointRegSegLib.imageio.sitk_bridge import from_sitk, to_sitk
from JointRegSegLib.methods.uresnet import (
    CLASSES,
    LOSS_WEIGHTS,
    N_CLASSES,
    build_network,
    classes_to_codes,
    forward,
    labels_to_classes,
    segmentation_volume,
    uresnet_loss,
)
from JointRegSegLib.nets import count_parameters
from JointRegSegLib.nets.uresnet import (
    cumulative_coordinates,
    frame,
    index_affine,
    total_displacement,
)
from JointRegSegLib.spatial import (
    affine_matrix,
    affine_to_displacement,
    compose,
    identity_grid,
    warp,
)
from JointRegSegLib.spatial.affine import index_affine_to_physical, to_sitk_affine
from JointRegSegLib.weights import read_manifest


def blobs(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """A smooth, asymmetric test image (B=1, C=1): a sum of anisotropic Gaussian blobs in [0, 1]."""
    rng = np.random.default_rng(seed)
    grid = identity_grid(shape, dtype=torch.float64)[0]
    image = torch.zeros(shape, dtype=torch.float64)
    for _ in range(6):
        centre = torch.as_tensor(rng.uniform(0.3, 0.7, 3) * (np.asarray(shape) - 1)).view(3, 1, 1, 1)
        width = torch.as_tensor(rng.uniform(0.08, 0.2, 3) * np.asarray(shape)).view(3, 1, 1, 1)
        image += rng.uniform(0.4, 1.0) * torch.exp(-(((grid - centre) / width) ** 2).sum(0) / 2)
    return (image / image.max()).float()[None, None]


def test_network_is_small_and_starts_at_the_identity(one_thread):
    net = build_network()
    # light, though wider than the paper's 4, 8, 16 channels (which could not fit one pair: methods.uresnet)
    assert count_parameters(net) < 300_000
    moving, fixed = blobs((16, 20, 24), 1), blobs((16, 20, 24), 2)
    out = forward(net, moving, fixed)
    assert torch.equal(out["gradients"], torch.ones_like(out["gradients"]))
    assert torch.equal(out["coordinates"], identity_grid((16, 20, 24)).expand_as(out["coordinates"]))
    assert torch.equal(out["theta"], torch.eye(3, 4)[None])
    assert out["disp"].abs().max() < 1e-5
    assert torch.allclose(warp(moving, out["disp"]), moving, atol=1e-5)
    assert out["seg"].shape == (1, N_CLASSES, 16, 20, 24)
    assert torch.allclose(out["seg"].sum(1), torch.ones(1, 16, 20, 24), atol=1e-5)


def test_cumulative_sum_of_constant_derivatives_is_a_scaling():
    # g_c = s_c everywhere: Phi_c(p) = s_c (p_c + 1) - 1 (analytic).
    shape = (6, 7, 8)
    scales = torch.tensor([0.5, 1.0, 1.5]).view(1, 3, 1, 1, 1)
    phi = cumulative_coordinates(scales.expand(1, 3, *shape).contiguous())
    expected = scales * (identity_grid(shape) + 1.0) - 1.0
    assert torch.allclose(phi, expected, atol=1e-5)


def test_index_affine_is_the_centred_frame_matrix():
    # A rotation R and translation t in the frame q = (p - c) / s is, on indices, R about c plus s t.
    shape = (20, 24, 28)
    rotation = affine_matrix(rotation_deg=(5.0, -7.0, 3.0))[:3, :3]
    t = np.array([0.05, -0.1, 0.02])
    theta = torch.as_tensor(np.concatenate([rotation, t[:, None]], axis=1))[None]
    s = (max(shape) - 1) / 2.0
    centre = (np.asarray(shape) - 1.0) / 2.0
    expected = affine_matrix(rotation_deg=(5.0, -7.0, 3.0), translation=s * t, center=centre)
    np.testing.assert_allclose(index_affine(theta, shape)[0].numpy(), expected, atol=1e-10)
    np.testing.assert_allclose((frame(shape) @ torch.as_tensor(np.append(centre, 1.0)))[:3].numpy(), 0.0, atol=1e-12)


def test_whole_mapping_is_affine_after_deformable():
    # Eq. 1: the sampling point of p is A Phi(p); spatial.compose(u_A, u_Phi) is the same map
    # (u_A is linear, so its trilinear interpolation is exact inside the grid).
    shape = (12, 14, 16)
    generator = torch.Generator().manual_seed(0)
    g = 1.0 + 0.2 * (torch.rand(1, 3, *shape, generator=generator) - 0.5)
    phi = cumulative_coordinates(g)
    matrix = torch.as_tensor(
        affine_matrix(rotation_deg=(2.0, 1.0, -2.0), translation=(0.3, -0.2, 0.1), center=[(n - 1) / 2 for n in shape]),
        dtype=torch.float32,
    )[None]
    total = total_displacement(matrix, phi)
    reference = compose(affine_to_displacement(matrix, shape), phi - identity_grid(shape))
    inside = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    assert torch.allclose(total[inside], reference[inside], atol=1e-4)


def test_short_training_recovers_a_known_affine(one_thread):
    """The affine head and the coordinate convention: a fresh network, trained for a hundred
    steps on one pair related by a known affine (deformable branch frozen at the identity, eq. 4
    loss with alpha = 0), predicts that affine to within 0.25 voxel everywhere in the inner grid (2 voxels before),
    and its physical (LPS) matrix makes SimpleITK reproduce the fixed image."""
    torch.manual_seed(0)
    shape = (16, 16, 16)
    centre = [(n - 1) / 2 for n in shape]
    truth = affine_matrix(rotation_deg=(6.0, -4.0, 3.0), translation=(1.2, -0.8, 0.6), scale=(1.04, 0.97, 1.0), center=centre)
    moving = blobs(shape, 3)
    fixed = warp(moving, affine_to_displacement(truth, shape))  # fixed(p) = moving(A p)
    net = build_network()
    for parameter in net.registration.parameters():
        parameter.requires_grad_(False)
    optimiser = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=2e-3)
    weights = {**LOSS_WEIGHTS, "alpha": 0.0}
    initial = affine_to_displacement(torch.as_tensor(truth), shape)[:, :, 3:-3, 3:-3, 3:-3].norm(dim=1)
    assert initial.max() > 1.5  # the pair starts two voxels apart
    for _ in range(100):
        # smooth blobs on 16^3: the plain terms (sim_blur=0); a one-voxel Gaussian would blur away much of so small a grid
        loss, _ = uresnet_loss(forward(net, moving, fixed), fixed, moving, weights=weights, lcc_window=5, sim_blur=0.0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        predicted = forward(net, moving, fixed)["affine"][0].double()
    error = affine_to_displacement(predicted, shape) - affine_to_displacement(torch.as_tensor(truth), shape)
    inner = error[:, :, 3:-3, 3:-3, 3:-3].norm(dim=1)
    assert inner.max() < 0.25, f"largest error {inner.max():.3f} voxels"

    # Physical convention: on an oblique LPS grid, SimpleITK resampling the moving image with the
    # LPS matrix (fixed point -> moving point) gives the fixed image.
    direction = affine_matrix(rotation_deg=(10.0, 0.0, 20.0))[:3, :3]
    grid = Geometry(shape=shape, spacing=(1.5, 1.5, 1.5), origin=(10.0, -5.0, 3.0), direction=direction)
    physical = index_affine_to_physical(predicted, grid, grid)
    moving_image = to_sitk(Volume(moving[0, 0].numpy().astype(np.float64), grid))
    resampled = sitk.Resample(moving_image, moving_image, to_sitk_affine(physical), sitk.sitkLinear, 0.0)
    difference = from_sitk(resampled).array - fixed[0, 0].numpy()
    assert np.abs(difference[3:-3, 3:-3, 3:-3]).max() < 0.05


def test_label_codes_round_trip_and_hemisphere_split():
    # Every class's left code maps back to the class; the split uses LPS x (+x = patient's left).
    codes = torch.tensor([c[2] for c in CLASSES] + [c[3] for c in CLASSES])
    classes = labels_to_classes(codes)
    assert classes.tolist() == list(range(N_CLASSES)) * 2
    left = np.array([True] * N_CLASSES + [False] * N_CLASSES)
    np.testing.assert_array_equal(classes_to_codes(classes.numpy(), left), codes.numpy())

    grid = Geometry(shape=(8, 8, 8), spacing=(2.0, 2.0, 2.0), origin=(7.0, 7.0, -7.0), direction=np.diag([-1.0, -1.0, 1.0]))
    probs = torch.zeros(N_CLASSES, 8, 8, 8)
    probs[0] = 1.0
    probs[0, 2:6, 2:6, 2:6], probs[1, 2:6, 2:6, 2:6] = 0.0, 1.0  # a white-matter cube centred at x = 0
    target = Geometry(shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0), origin=(-7.5, -7.5, -7.5), direction=np.eye(3))
    labels = segmentation_volume(probs, grid, target).array
    x = -7.5 + np.arange(16)
    assert set(np.unique(labels[(x > 0.5) & (x < 2.5)][:, 6:10, 6:10]).tolist()) == {2}  # left white matter
    assert set(np.unique(labels[(x < -0.5) & (x > -2.5)][:, 6:10, 6:10]).tolist()) == {41}
    assert labels[0, 0, 0] == 0


def test_segmentation_volume_is_the_argmax_of_simpleitks_linear_resampling():
    # Smooth class probabilities on a RAS network grid, labelled on an oblique finer grid: SimpleITK
    # resamples each class linearly (0 outside), background gets the 1e-6 tie-break, then the argmax.
    from JointRegSegLib.imageio.network_grid import resample

    rng = np.random.default_rng(5)
    grid = Geometry(shape=(12, 14, 10), spacing=(4.0, 4.0, 4.0), origin=(22.0, 26.0, -18.0), direction=np.diag([-1.0, -1.0, 1.0]))
    logits = torch.from_numpy(np.stack([gaussian(rng, grid.shape) for _ in range(N_CLASSES)]))
    probs = torch.softmax(4.0 * logits, dim=0)
    direction = affine_matrix(rotation_deg=(12.0, -7.0, 25.0))[:3, :3]
    shape, spacing = np.array([34, 30, 36]), np.array([1.1, 1.3, 0.9])
    target = Geometry(shape=tuple(shape), spacing=tuple(spacing), origin=-direction @ (spacing * (shape - 1) / 2), direction=direction)
    labels = segmentation_volume(probs, grid, target).array
    sampled = np.stack([resample(Volume(p.numpy().astype(np.float64), grid), target).array for p in probs])
    sampled[0] += 1e-6
    classes = sampled.argmax(axis=0)
    # inside the network grid (ITK returns 0 past the outermost voxel centres, grid_sample blends towards 0 there)
    index = grid.physical_to_index(target.index_to_physical(np.moveaxis(np.indices(target.shape), 0, -1)))
    inside = np.all((index > 0) & (index < np.asarray(grid.shape) - 1), axis=-1)
    ours = labels_to_classes(torch.from_numpy(labels.astype(np.int64))).numpy()
    assert inside.mean() > 0.9 and (ours[inside] == classes[inside]).mean() > 0.9999
    assert len(np.unique(classes[inside])) == N_CLASSES


def gaussian(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.normal(size=shape), 1.5).astype(np.float32)


def test_worker_outputs_on_the_sample_pair(tmp_path, sample_pair, one_thread):
    if "uresnet" not in read_manifest():
        pytest.skip("no shipped uresnet weights: train them with `jointregseg train uresnet`")
    job = {
        "method": "uresnet", "output": str(tmp_path / "out"), **{k: str(v) for k, v in sample_pair.items()},
        "options": {"segment_fixed": True}, "pictures": False,
    }
    code, events, stderr = run_worker(job, tmp_path)
    assert code == 0, stderr
    files = events[-1]["files"]
    for kind in ("warped", "displacement", "affine", "moving_seg", "warped_seg", "fixed_seg", "metrics"):
        assert kind in files, kind
    out = tmp_path / "out"
    moving = read_volume(sample_pair["moving"])
    moving_seg = read_labels(out / "moving_seg.nii.gz")
    assert moving_seg.geometry.same_as(moving.geometry)
    allowed = {c for _, _, left, right in CLASSES for c in (left, right)}
    assert set(np.unique(moving_seg.array).tolist()) <= allowed
    assert {2, 3, 41, 42} <= set(np.unique(moving_seg.array).tolist())

    # The displacement file holds the whole mapping: SimpleITK reproduces the warped image with it.
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    fixed_image = sitk.ReadImage(str(sample_pair["fixed"]), sitk.sitkFloat32)
    moving_image = sitk.ReadImage(str(sample_pair["moving"]), sitk.sitkFloat32)
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving_image, fixed_image, transform, sitk.sitkLinear, 0.0))
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz"), sitk.sitkFloat32))
    assert np.abs(resampled - warped).mean() < 0.01 * np.abs(warped).max()
    affine = sitk.ReadTransform(str(out / "affine.tfm"))
    assert affine.GetDimension() == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["dice_mean"]) and np.isfinite(metrics["folding_percent"])
