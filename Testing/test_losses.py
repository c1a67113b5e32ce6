"""Tests of JointRegSegLib.losses against analytic cases, independent numpy/scipy computations and MONAI."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.losses import BendingEnergyLoss, DiceLoss
from scipy.ndimage import gaussian_filter, uniform_filter
from scipy.spatial import cKDTree

from JointRegSegLib.errors import InputError
from JointRegSegLib.losses import (
    LocalNCC,
    box_sum,
    bending_energy,
    cross_entropy_loss,
    divergence_l2,
    edt_dice_loss,
    edt_loss,
    edt_mask,
    gradient_l2,
    lncc_loss,
    mi_loss,
    multi_axis_mi_loss,
    ncc_loss,
    soft_dice_loss,
)


def smooth_volume(shape: tuple[int, ...], seed: int, sigma: float = 1.5) -> np.ndarray:
    """Smooth random volume min-max normalised to [0, 1] (float64)."""
    x = gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return (x - x.min()) / (x.max() - x.min())


def t5(x: np.ndarray) -> torch.Tensor:
    """(I, J, K) numpy -> (1, 1, I, J, K) float64 tensor."""
    return torch.from_numpy(np.ascontiguousarray(x))[None, None]


def grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index coordinates i, j, k as float64 arrays of ``shape``."""
    return np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")


def field(*components: np.ndarray) -> torch.Tensor:
    """Three (I, J, K) arrays -> a (1, 3, I, J, K) float64 displacement field."""
    return torch.from_numpy(np.stack(components))[None]


# ---------------------------------------------------------------------------------------------
# NCC / LNCC


@pytest.mark.parametrize("window", [5, 9])
def test_lncc_equals_direct_box_window_computation(window: int) -> None:
    a = smooth_volume((18, 16, 14), seed=1)
    b = np.clip(0.6 * a + 0.4 * smooth_volume((18, 16, 14), seed=2), 0, 1)
    n = float(window**3)
    # local sums over a zero-padded box window, computed independently with scipy
    s = {name: uniform_filter(x, size=window, mode="constant", cval=0.0) * n
         for name, x in {"a": a, "b": b, "aa": a * a, "bb": b * b, "ab": a * b}.items()}
    cross = s["ab"] - s["a"] * s["b"] / n
    var_a = np.maximum(s["aa"] - s["a"] ** 2 / n, 1e-5)
    var_b = np.maximum(s["bb"] - s["b"] ** 2 / n, 1e-5)
    expected = -np.mean(cross**2 / (var_a * var_b))
    got = lncc_loss(t5(a), t5(b), window=window).item()
    assert got == pytest.approx(expected, rel=1e-9)
    assert -1.0 < got < 0.0
    assert lncc_loss(t5(a), t5(a), window=window).item() == pytest.approx(-1.0, abs=1e-9)
    assert lncc_loss(t5(a), t5(2.0 * a), window=window).item() == pytest.approx(-1.0, abs=1e-9)


@pytest.mark.parametrize("window", [3, 5, 9])
def test_local_ncc_equals_lncc_loss_in_value_and_gradient(window: int) -> None:
    fixed = t5(smooth_volume((18, 16, 14), seed=1))
    warped = t5(np.clip(0.7 * smooth_volume((18, 16, 14), seed=1) + 0.3 * smooth_volume((18, 16, 14), seed=2), 0, 1))
    warped.requires_grad_(True)
    ours = LocalNCC(fixed, window)(warped)
    (ours_grad,) = torch.autograd.grad(ours, warped)
    reference = lncc_loss(fixed, warped, window=window)
    (reference_grad,) = torch.autograd.grad(reference, warped)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    np.testing.assert_allclose(ours_grad.numpy(), reference_grad.numpy(), rtol=1e-9, atol=1e-15)


def test_box_sum_matches_scipy_and_is_its_own_adjoint() -> None:
    x = smooth_volume((9, 8, 7), seed=3)
    expected = uniform_filter(x, size=5, mode="constant", cval=0.0) * 125.0
    np.testing.assert_allclose(box_sum(t5(x), 5)[0, 0].numpy(), expected, rtol=1e-12)
    a, b = t5(smooth_volume((9, 8, 7), seed=4)), t5(smooth_volume((9, 8, 7), seed=5))
    assert float((box_sum(a, 3) * b).sum()) == pytest.approx(float((a * box_sum(b, 3)).sum()), rel=1e-12)
    a.requires_grad_(True)
    (grad,) = torch.autograd.grad((box_sum(a, 3) * b).sum(), a)
    np.testing.assert_allclose(grad.numpy(), box_sum(b, 3).numpy(), rtol=1e-12)


def test_lncc_rejects_even_window() -> None:
    a = t5(smooth_volume((8, 8, 8), seed=0))
    with pytest.raises(InputError, match="odd"):
        lncc_loss(a, a, window=4)


def test_ncc_affine_invariance_and_numpy_reference() -> None:
    a = smooth_volume((16, 14, 12), seed=3)
    assert ncc_loss(t5(a), t5(a)).item() == pytest.approx(-1.0, abs=1e-6)
    assert ncc_loss(t5(a), t5(3.0 * a + 0.5)).item() == pytest.approx(-1.0, abs=1e-6)
    assert ncc_loss(t5(a), t5(-a)).item() == pytest.approx(1.0, abs=1e-6)
    b = smooth_volume((16, 14, 12), seed=4)
    expected = -np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert ncc_loss(t5(a), t5(b)).item() == pytest.approx(expected, abs=1e-6)


def test_ncc_mask_restricts_the_voxels() -> None:
    a = smooth_volume((16, 16, 16), seed=5)
    b = smooth_volume((16, 16, 16), seed=6)
    mask = np.zeros_like(a)
    mask[4:12, 3:13, 5:11] = 1.0
    b_in = np.where(mask > 0, 2.0 * a + 0.1, b)  # affine copy of a inside the mask, unrelated outside
    assert ncc_loss(t5(a), t5(b_in), mask=t5(mask)).item() == pytest.approx(-1.0, abs=1e-6)
    inside = mask > 0
    expected = -np.corrcoef(a[inside], b[inside])[0, 1]
    assert ncc_loss(t5(a), t5(b), mask=t5(mask)).item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Mutual information


def nearest_centre_histogram_mi(x: np.ndarray, y: np.ndarray, bins: int) -> float:
    """Hard-histogram MI with bins centred at linspace(0, 1, bins) (nearest-centre assignment)."""
    ix = np.rint(np.clip(x, 0, 1) * (bins - 1)).astype(int).ravel()
    iy = np.rint(np.clip(y, 0, 1) * (bins - 1)).astype(int).ravel()
    joint = np.zeros((bins, bins))
    np.add.at(joint, (ix, iy), 1.0)
    p = joint / joint.sum()
    px, py = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / (px @ py)[nz])))


def test_mi_of_image_with_itself_is_its_entropy_for_a_narrow_kernel() -> None:
    bins = 32
    levels = np.array([0, 7, 19, 31]) / (bins - 1)  # intensities on bin centres
    proportions = np.array([0.1, 0.2, 0.3, 0.4])
    labels = np.random.default_rng(7).choice(4, size=(20, 20, 20), p=proportions)
    a = t5(levels[labels])
    counts = np.bincount(labels.ravel(), minlength=4) / labels.size
    entropy = -np.sum(counts * np.log(counts))
    # abs 1e-5: MONAI adds 1e-7 smoothing constants inside the logarithm
    assert mi_loss(a, a, bins=bins, sigma_ratio=0.05).item() == pytest.approx(-entropy, abs=1e-5)


def test_mi_parzen_against_direct_histogram_on_large_sample() -> None:
    rng = np.random.default_rng(8)
    n = 100 * 100 * 10
    x = rng.standard_normal(n)
    y = 0.7 * x + np.sqrt(1 - 0.49) * rng.standard_normal(n)
    xs = np.clip(x / 8 + 0.5, 0, 1).reshape(100, 100, 10)
    ys = np.clip(y / 8 + 0.5, 0, 1).reshape(100, 100, 10)
    reference = nearest_centre_histogram_mi(xs, ys, 32)
    # narrow kernel: the Parzen estimate is the hard histogram estimate (within 1 %)
    narrow = -mi_loss(t5(xs), t5(ys), bins=32, sigma_ratio=0.05).item()
    assert narrow == pytest.approx(reference, rel=0.01)
    # default kernel (sd = half a bin) smooths the joint histogram: lower, within 10 %
    default = -mi_loss(t5(xs), t5(ys), bins=32).item()
    assert 0.9 * reference < default < reference


def test_mi_ordering_and_contrast_invariance() -> None:
    a = smooth_volume((24, 24, 24), seed=9)
    ta = t5(a)
    shuffled = t5(np.random.default_rng(10).permutation(a.ravel()).reshape(a.shape))
    mi_self = -mi_loss(ta, ta).item()
    mi_shuffled = -mi_loss(ta, shuffled).item()
    assert mi_self > 1.0
    assert mi_shuffled < 0.05 * mi_self
    # inverted contrast: the bin centres are symmetric about 0.5, so MI is unchanged
    assert -mi_loss(ta, t5(1.0 - a)).item() == pytest.approx(mi_self, rel=1e-6)
    # a monotonic non-linear remapping keeps nearly all of the information
    assert -mi_loss(ta, t5(a**0.8)).item() == pytest.approx(mi_self, rel=0.03)


def test_mi_mask_equals_mi_of_the_masked_box() -> None:
    a = smooth_volume((20, 20, 20), seed=11)
    b = np.clip(0.5 * a + 0.5 * smooth_volume((20, 20, 20), seed=12), 0, 1)
    mask = np.zeros_like(a)
    mask[3:15, 5:17, 2:12] = 1.0
    expected = mi_loss(t5(a[3:15, 5:17, 2:12]), t5(b[3:15, 5:17, 2:12])).item()
    assert mi_loss(t5(a), t5(b), mask=t5(mask)).item() == pytest.approx(expected, rel=1e-9)


def looped_multi_axis_mi(fixed: torch.Tensor, warped: torch.Tensor, bins: int, min_fraction: float) -> float:
    """Eq. 3 of seed 004 by a plain loop: pooled mean slice MI over valid slices, batch mean."""
    values = []
    for n in range(fixed.shape[0]):
        total, count = 0.0, 0
        for axis in range(3):
            for s in range(fixed.shape[2 + axis]):
                f = fixed[n, 0].select(axis, s)
                w = warped[n, 0].select(axis, s)
                if (f > 0).double().mean().item() < min_fraction:
                    continue
                total += -mi_loss(f[None, None, :, :, None], w[None, None, :, :, None], bins=bins).item()
                count += 1
        values.append(total / count)
    return -float(np.mean(values))


def test_multi_axis_mi_equals_slice_loop() -> None:
    shape = (12, 10, 8)
    fixed = np.stack([smooth_volume(shape, seed=13), smooth_volume(shape, seed=14)])
    fixed[0, :2] = 0.0  # empty slices along i
    fixed[1, :, :, -3:] = 0.0  # empty slices along k
    fixed[1, :, 0, :] = 0.0
    fixed[1, 0, 0, 0] = 0.5  # one voxel of 96 (1.04 %): below min_fraction = 2 %, the j = 0 slice stays empty
    warped = np.clip(0.7 * fixed + 0.3 * np.stack([smooth_volume(shape, 15), smooth_volume(shape, 16)]), 0, 1)
    f, w = torch.from_numpy(fixed)[:, None], torch.from_numpy(warped)[:, None]
    expected = looped_multi_axis_mi(f, w, bins=16, min_fraction=0.02)
    assert multi_axis_mi_loss(f, w, bins=16, min_fraction=0.02).item() == pytest.approx(expected, rel=1e-9)


def test_multi_axis_mi_prefers_alignment_and_has_gradients() -> None:
    fixed = smooth_volume((24, 24, 24), seed=17, sigma=2.0)
    moving = 1.0 - fixed  # another "contrast" of the same anatomy
    shifted = np.roll(moving, 3, axis=1)
    f = t5(fixed).float()
    aligned_loss = multi_axis_mi_loss(f, t5(moving).float()).item()
    shifted_loss = multi_axis_mi_loss(f, t5(shifted).float()).item()
    assert aligned_loss < shifted_loss < 0.0
    warped = t5(shifted).float().requires_grad_(True)
    multi_axis_mi_loss(f, warped).backward()
    assert warped.grad is not None
    assert torch.isfinite(warped.grad).all()
    assert warped.grad.abs().max() > 0


def test_multi_axis_mi_all_slices_empty_gives_zero() -> None:
    f = torch.zeros(1, 1, 6, 6, 6)
    w = torch.rand(1, 1, 6, 6, 6, requires_grad=True)
    loss = multi_axis_mi_loss(f, w)
    loss.backward()
    assert loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Segmentation losses


def one_hot(labels: np.ndarray, n: int) -> torch.Tensor:
    """(B, I, J, K) integer labels -> (B, n, I, J, K) float64 one-hot."""
    return torch.nn.functional.one_hot(torch.from_numpy(labels), n).permute(0, 4, 1, 2, 3).double()


def test_soft_dice_perfect_and_disjoint() -> None:
    labels = np.random.default_rng(18).integers(0, 4, size=(2, 10, 10, 10))
    target = one_hot(labels, 4)
    assert soft_dice_loss(target, target).item() == pytest.approx(0.0, abs=1e-9)
    shifted = one_hot((labels + 1) % 4, 4)  # every voxel predicted as another label
    assert soft_dice_loss(shifted, target, include_background=True).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("include_background", [True, False])
def test_soft_dice_matches_monai(include_background: bool) -> None:
    rng = np.random.default_rng(19)
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((2, 3, 8, 9, 10))), dim=1)
    target = one_hot(rng.integers(0, 3, size=(2, 8, 9, 10)), 3)
    reference = DiceLoss(include_background=include_background, smooth_nr=1e-5, smooth_dr=1e-5)(probs, target)
    got = soft_dice_loss(probs, target, eps=1e-5, include_background=include_background)
    assert got.item() == pytest.approx(reference.item(), rel=1e-9)


def test_cross_entropy_matches_numpy_log_softmax() -> None:
    rng = np.random.default_rng(20)
    logits = rng.standard_normal((2, 4, 5, 6, 7))
    labels = rng.integers(0, 4, size=(2, 5, 6, 7))
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -np.mean(np.take_along_axis(log_p, labels[:, None], axis=1))
    got = cross_entropy_loss(torch.from_numpy(logits), torch.from_numpy(labels)[:, None])
    assert got.item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(InputError, match="0..3"):
        cross_entropy_loss(torch.from_numpy(logits), torch.from_numpy(labels + 1))


def test_edt_mask_of_a_cube_is_the_analytic_distance() -> None:
    shape, lo, hi = (17, 17, 17), 5, 11  # cube of side 7
    mask = np.zeros(shape)
    mask[lo : hi + 1, lo : hi + 1, lo : hi + 1] = 1.0
    i, j, k = grid(shape)
    # distance to the nearest voxel outside a box: straight across the nearest face
    dist = np.minimum.reduce([np.minimum(c - lo + 1, hi + 1 - c) for c in (i, j, k)])
    expected = np.where(mask > 0, dist / 4.0, 0.0)  # the centre is 4 voxels from the outside
    got = edt_mask(t5(mask))[0, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got[8, 8, 8] == pytest.approx(1.0)
    assert got[mask == 0].max() == 0.0


def test_edt_mask_of_a_sphere_matches_brute_force_distances_per_region() -> None:
    shape = (15, 15, 15)
    i, j, k = grid(shape)
    masks = np.stack([(i - 7) ** 2 + (j - 7) ** 2 + (k - 7) ** 2 <= r**2 for r in (5.5, 3.2)]).astype(np.float64)
    got = edt_mask(torch.from_numpy(masks)[:, None])
    for n in range(2):
        inside = masks[n] > 0
        points = np.stack([i, j, k], axis=-1)
        distances, _ = cKDTree(points[~inside]).query(points[inside])
        expected = np.zeros(shape)
        expected[inside] = distances / distances.max()  # normalised per region
        np.testing.assert_allclose(got[n, 0].numpy(), expected, atol=1e-6)


def test_edt_loss_and_edt_dice_loss() -> None:
    rng = np.random.default_rng(21)
    fixed_mask = np.zeros((1, 1, 12, 12, 12))
    fixed_mask[0, 0, 3:9, 2:10, 4:11] = 1.0
    warped_mask = np.clip(fixed_mask + 0.3 * rng.random(fixed_mask.shape), 0, 1)
    fm, wm = torch.from_numpy(fixed_mask), torch.from_numpy(warped_mask)
    fe, we = edt_mask(fm), edt_mask(torch.from_numpy(np.roll(fixed_mask, 1, axis=3)))
    assert edt_loss(fe, fe).item() == 0.0
    mse = np.mean((fe.numpy() - we.numpy()) ** 2)
    assert edt_loss(we, fe).item() == pytest.approx(mse, rel=1e-9)
    dice = DiceLoss(include_background=True)(wm, fm).item()
    assert edt_dice_loss(wm, fm, we, fe).item() == pytest.approx((dice + 100 * mse) / 2, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Regularisers


def test_gradient_l2_of_linear_and_constant_fields() -> None:
    shape = (9, 8, 7)
    i, j, k = grid(shape)
    assert gradient_l2(field(0.7 * i, 0 * i, 0 * i)).item() == pytest.approx(0.7**2 / 9, rel=1e-12)
    a = np.random.default_rng(22).standard_normal((3, 3))
    u = field(*[a[c, 0] * i + a[c, 1] * j + a[c, 2] * k for c in range(3)])
    # forward differences of component c along axis d are a[c, d] everywhere
    assert gradient_l2(u).item() == pytest.approx(np.sum(a**2) / 9, rel=1e-12)
    assert gradient_l2(field(0 * i + 2.0, 0 * i - 1.0, 0 * i + 0.3)).item() == 0.0


def test_divergence_l2_analytic_cases() -> None:
    shape = (10, 9, 8)
    i, j, k = grid(shape)
    s = 0.3
    assert divergence_l2(field(s * i, s * j, s * k)).item() == pytest.approx(9 * s**2, rel=1e-12)
    assert divergence_l2(field(-s * j, s * i, 0 * k)).item() == pytest.approx(0.0, abs=1e-12)  # rotation
    # u = (i^2, 0, 0): the central difference of i^2 is exactly 2 i, interior i = 1..I-2
    interior_i = np.arange(1, shape[0] - 1)
    assert divergence_l2(field(i**2, 0 * i, 0 * i)).item() == pytest.approx(np.mean(4 * interior_i**2), rel=1e-12)


def test_bending_energy_analytic_cases() -> None:
    shape = (9, 8, 7)
    i, j, k = grid(shape)
    a = np.random.default_rng(23).standard_normal((3, 4))
    affine = field(*[a[c, 0] * i + a[c, 1] * j + a[c, 2] * k + a[c, 3] for c in range(3)])
    assert bending_energy(affine).item() == pytest.approx(0.0, abs=1e-20)
    q = 0.2
    zero = 0 * i
    # d_ii (q i^2) = 2 q: energy 4 q^2 for one of three components
    assert bending_energy(field(q * i**2, zero, zero)).item() == pytest.approx(4 * q**2 / 3, rel=1e-12)
    # d_ij (q i j) = q, counted twice
    assert bending_energy(field(zero, q * i * j, zero)).item() == pytest.approx(2 * q**2 / 3, rel=1e-12)


def test_bending_energy_matches_monai_on_a_random_field() -> None:
    disp = torch.from_numpy(np.random.default_rng(26).standard_normal((2, 3, 7, 6, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MONAI 1.6.1 indexes with a list of slices
        reference = BendingEnergyLoss(normalize=False)(disp).item()
    assert bending_energy(disp).item() == pytest.approx(reference, rel=1e-12)


def test_regularisers_reject_bad_fields() -> None:
    with pytest.raises(InputError, match=r"\(B, 3, I, J, K\)"):
        gradient_l2(torch.zeros(1, 2, 5, 5, 5))
    with pytest.raises(InputError, match="at least 3"):
        bending_energy(torch.zeros(1, 3, 2, 5, 5))


# ---------------------------------------------------------------------------------------------
# Devices


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_all_losses_are_differentiable_on_device(device: str) -> None:
    fixed = t5(smooth_volume((16, 16, 16), seed=24)).float().to(device)
    warped = t5(smooth_volume((16, 16, 16), seed=25)).float().to(device).requires_grad_(True)
    disp = (0.5 * torch.randn(1, 3, 16, 16, 16, generator=torch.Generator().manual_seed(0))).to(device)
    disp.requires_grad_(True)
    scale = torch.tensor([1.0, 2.0, 3.0], device=device)[:, None, None, None]
    probs = torch.softmax(warped.repeat(1, 3, 1, 1, 1) * scale, dim=1)
    labels = (fixed * 2.99).long()
    target = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 4, 1, 2, 3).float()
    mask_edt = edt_mask((fixed > 0.5).float())
    assert mask_edt.device.type == device
    total = (
        ncc_loss(fixed, warped)
        + lncc_loss(fixed, warped)
        + mi_loss(fixed, warped)
        + multi_axis_mi_loss(fixed, warped)
        + soft_dice_loss(probs, target)
        + cross_entropy_loss(torch.log(probs), labels)
        + edt_dice_loss(warped, (fixed > 0.5).float(), warped * mask_edt, mask_edt)
        + gradient_l2(disp)
        + divergence_l2(disp)
        + bending_energy(disp)
    )
    assert total.ndim == 0
    total.backward()
    for grad in (warped.grad, disp.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0
