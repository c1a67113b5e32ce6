"""Tests of JointRegSegLib.metrics against MONAI, SimpleITK, numpy histograms and analytic cases."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from scipy.ndimage import gaussian_filter

from JointRegSegLib.errors import InputError
from JointRegSegLib.imageio.geometry import Geometry, Volume
from JointRegSegLib.imageio.sitk_bridge import from_sitk, to_sitk
from JointRegSegLib.metrics import (
    arithmetic_normalised_mutual_information,
    dice_per_label,
    folding_percent,
    hd95_per_label,
    deformable_jacobian,
    jacobian_determinant,
    mean_dice,
    mutual_information,
    ncc,
    pmm_map,
    pmm_mean,
    sdlogj,
)
from JointRegSegLib.metrics.pmm import PatchGrid
from JointRegSegLib.metrics.similarity import MaskedImage, quantise, similarity_scores


def _ball(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def _one_hot(seg: np.ndarray, labels: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.stack([seg == label for label in labels])[None].astype(np.float32))


@pytest.fixture
def label_pair() -> tuple[np.ndarray, np.ndarray]:
    """Offset spheres (1), offset boxes (2), a label only in ``a`` (3) and one only in ``b`` (4)."""
    shape = (40, 36, 32)
    a = np.zeros(shape, dtype=np.int16)
    b = np.zeros(shape, dtype=np.int16)
    a[_ball(shape, (14, 14, 12), 8)] = 1
    b[_ball(shape, (17, 13, 14), 7)] = 1
    a[26:36, 20:30, 4:14] = 2
    b[24:35, 22:33, 6:14] = 2
    a[2:5, 30:34, 25:30] = 3
    b[34:38, 2:5, 26:30] = 4
    return a, b


# ----------------------------------------------------------------------------------- overlap


def test_dice_matches_monai(label_pair):
    a, b = label_pair
    ours = dice_per_label(a, b)
    assert sorted(ours) == [1, 2, 3, 4]
    monai = DiceMetric(include_background=True, reduction="none")(_one_hot(a, [1, 2]), _one_hot(b, [1, 2]))
    np.testing.assert_allclose([ours[1], ours[2]], monai[0].numpy(), rtol=1e-6)
    assert ours[3] == 0.0 and ours[4] == 0.0
    assert mean_dice(a, b) == pytest.approx((ours[1] + ours[2]) / 2)  # labels in both only
    assert dice_per_label(a, b, labels=[1, 7]) == {1: ours[1]}  # absent from both: omitted
    assert dice_per_label(a, a) == {1: 1.0, 2: 1.0, 3: 1.0}


@pytest.mark.parametrize("workers", [1, 3])
def test_hd95_matches_monai_with_anisotropic_spacing(label_pair, workers):
    """On one thread and with the labels shared among three (the worker passes its thread count)."""
    a, b = label_pair
    spacing = (0.8, 1.5, 2.5)
    ours = hd95_per_label(a, b, spacing, workers=workers)
    assert list(ours) == [1, 2, 3, 4]
    metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    monai = metric(_one_hot(a, [1, 2]), _one_hot(b, [1, 2]), spacing=spacing)[0].numpy()
    np.testing.assert_allclose([ours[1], ours[2]], monai, rtol=1e-5)
    assert math.isinf(ours[3]) and math.isinf(ours[4])  # present in one map only, as MONAI
    assert hd95_per_label(a, a, spacing) == {1: 0.0, 2: 0.0, 3: 0.0}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_of_shifted_plates_is_shift_times_spacing(axis):
    # Two one-voxel-thick plates, the second shifted by d voxels normal to itself: every surface
    # voxel of one lies exactly d * spacing[axis] from the other, so every percentile equals it.
    spacing, d = (0.7, 1.3, 2.9), 3
    a = np.zeros((24, 24, 24), dtype=np.uint8)
    b = np.zeros_like(a)
    plate = [slice(4, 20)] * 3
    plate[axis] = slice(8, 9)
    a[tuple(plate)] = 5
    plate[axis] = slice(8 + d, 9 + d)
    b[tuple(plate)] = 5
    assert hd95_per_label(a, b, spacing)[5] == pytest.approx(d * spacing[axis])


@pytest.mark.parametrize("blob", [1, 2, 3, 5, 8])
def test_hd95_with_a_few_far_surface_voxels_equals_all_pairs_distances(blob):
    """A box against the same box shifted by a voxel plus a far blob of ``blob``^3 voxels: as the blob grows, the
    far surface voxels go from under 5 % of the surface (the 95th percentile lies among the near distances and
    the far ones are never searched) to over it (they are); HD95 equals the percentile of all-pairs distances."""
    from scipy.spatial.distance import cdist

    from JointRegSegLib.metrics.overlap import surfaces

    spacing = np.array([0.9, 1.1, 1.4])
    a = np.zeros((40, 30, 34), dtype=np.int16)
    a[4:20, 5:21, 6:22] = 7
    b = np.roll(a, 1, axis=0)
    b[30 : 30 + blob, 24 : 24 + blob, 26 : 26 + blob] = 7

    def directed(x: np.ndarray, y: np.ndarray) -> float:
        points_x, points_y = (np.argwhere(surfaces(m)) * spacing for m in (x, y))
        return float(np.percentile(cdist(points_x, points_y).min(axis=1), 95))

    expected = max(directed(a, b), directed(b, a))
    assert hd95_per_label(a, b, spacing)[7] == pytest.approx(expected, rel=1e-12)


def test_label_counts_table_equals_counting_every_pair_of_values():
    """The overlap table, counted inside the box of the nonzero voxels, equals comparing the whole maps value by
    value: maps with a wide empty margin, negative and widely spread labels, no background at all, booleans, empty."""
    from JointRegSegLib.metrics.overlap import LabelCounts

    rng = np.random.default_rng(8)
    margin = np.zeros((2, 20, 18, 16), np.int32)
    margin[:, 5:11, 7:12, 3:9] = rng.integers(0, 4, (2, 6, 5, 6))
    full = rng.integers(1, 5, (2, 6, 7, 8)).astype(np.int16)
    spread = np.where(margin > 0, margin * 3_000_000 - 7, 0).astype(np.int64)
    negative = margin - 2 * (margin == 3)
    cases = [margin, full, spread, negative, margin.astype(bool), np.zeros((2, 4, 5, 6), np.uint8), margin[:, :, :, :1]]
    for a, b in cases:
        counts = LabelCounts(a, b)
        values = np.union1d(np.unique(a), np.unique(b))
        np.testing.assert_array_equal(counts.values, values)
        expected = [[np.count_nonzero((a == u) & (b == v)) for v in values] for u in values]
        np.testing.assert_array_equal(counts.joint, expected)


def test_surfaces_of_all_labels_equal_scipys_erosion_of_each(sample_pair):
    """One pass over a label map gives, for every label, its mask less scipy's erosion of it (outside = background),
    on the sample pair's brain labels (touching structures) and on random labels reaching the image's border."""
    from scipy.ndimage import binary_erosion

    from JointRegSegLib.metrics.overlap import surfaces

    brain = _sample_label_maps(sample_pair)[0]
    speckle = np.random.default_rng(6).integers(0, 4, (13, 9, 11)).astype(np.int16)
    for labels in (brain, speckle, speckle[:, :1]):
        expected = np.zeros(labels.shape, dtype=bool)
        for label in set(np.unique(labels).tolist()) - {0}:
            mask = labels == label
            expected |= mask & ~binary_erosion(mask)
        np.testing.assert_array_equal(surfaces(labels), expected)


def _sample_label_maps(sample_pair) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """The sample pair's fixed labels and its moving labels resampled onto the fixed grid (many labels, cortex sheets)."""
    from JointRegSegLib.imageio.io import read_labels
    from JointRegSegLib.imageio.network_grid import resample

    fixed = read_labels(sample_pair["fixed_seg"])
    moving = resample(read_labels(sample_pair["moving_seg"]), fixed.geometry, "nearest")
    return fixed.array, moving.array, fixed.geometry.spacing


def test_dice_and_hd95_of_brain_labels_match_monai(sample_pair):
    # Thirty-odd FreeSurfer structures of two subjects: thin cortex sheets, shared and unshared surface voxels.
    a, b, spacing = _sample_label_maps(sample_pair)
    labels = sorted(set(np.unique(a).tolist()) & set(np.unique(b).tolist()) - {0})
    assert len(labels) > 20
    dice, hd95 = dice_per_label(a, b, labels), hd95_per_label(a, b, spacing, labels)
    monai_dice = DiceMetric(include_background=True, reduction="none")(_one_hot(a, labels), _one_hot(b, labels))[0].numpy()
    monai_hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
        _one_hot(a, labels), _one_hot(b, labels), spacing=spacing
    )[0].numpy()
    np.testing.assert_allclose([dice[label] for label in labels], monai_dice, rtol=1e-6)
    np.testing.assert_allclose([hd95[label] for label in labels], monai_hd95, rtol=1e-6)


def test_dice_of_negative_and_widely_spread_labels_counts_each_value():
    # Label values the counting by value cannot index directly are renumbered first.
    rng = np.random.default_rng(3)
    values = np.array([-7, 0, 5, 2**30], dtype=np.int64)
    a, b = values[rng.integers(0, 4, (20, 20, 20))], values[rng.integers(0, 4, (20, 20, 20))]
    expected = {int(v): 2.0 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in (-7, 5, 2**30)}
    assert dice_per_label(a, b) == pytest.approx(expected)
    assert mean_dice(a, b, labels=[5, 2**30, 9]) == pytest.approx((expected[5] + expected[2**30]) / 2)


def test_dice_of_label_groups_equals_the_dice_of_the_merged_masks(label_pair):
    from JointRegSegLib.metrics.overlap import LabelCounts

    a, b = label_pair
    counts = LabelCounts(a, b)
    for group_a, group_b in (([1, 2], None), ([1], [2]), ([2, 3], [2, 4]), ([7], None)):
        in_a, in_b = np.isin(a, group_a), np.isin(b, group_a if group_b is None else group_b)
        total = in_a.sum() + in_b.sum()
        expected = 2.0 * np.sum(in_a & in_b) / total if total else None
        assert counts.group_dice(group_a, group_b) == pytest.approx(expected)


def test_overlap_rejects_bad_input(label_pair):
    a, b = label_pair
    with pytest.raises(InputError, match="shapes"):
        dice_per_label(a, b[:-1])
    with pytest.raises(InputError, match="integers"):
        hd95_per_label(a.astype(np.float32), b, (1, 1, 1))
    with pytest.raises(InputError, match="spacing"):
        hd95_per_label(a, b, (1, 1))


# -------------------------------------------------------------------------------- similarity


def _reference_entropies(a: np.ndarray, b: np.ndarray, bins: int) -> tuple[float, float, float]:
    counts, _, _ = np.histogram2d(a, b, bins=bins, range=[[a.min(), a.max()], [b.min(), b.max()]])
    p = counts / counts.sum()

    def h(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    return h(p.sum(axis=1)), h(p.sum(axis=0)), h(p)


def test_mutual_information_matches_histogram2d():
    rng = np.random.default_rng(1)
    a = rng.gamma(2.0, size=(20, 22, 24))
    b = np.sqrt(a) + 0.3 * rng.normal(size=a.shape)
    mask = rng.random(a.shape) > 0.3
    for m in (None, mask):
        va, vb = (a.ravel(), b.ravel()) if m is None else (a[m], b[m])
        h_a, h_b, h_ab = _reference_entropies(va, vb, 24)
        assert mutual_information(a, b, bins=24, mask=m) == pytest.approx(h_a + h_b - h_ab, rel=1e-12)
        assert arithmetic_normalised_mutual_information(a, b, bins=24, mask=m) == pytest.approx(
            2 * (h_a + h_b - h_ab) / (h_a + h_b), rel=1e-12
        )


def test_mutual_information_extremes_and_invariance():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(16, 16, 16))
    b = a + 0.5 * rng.normal(size=a.shape)
    assert arithmetic_normalised_mutual_information(a, a) == pytest.approx(1.0)
    h_a = _reference_entropies(a.ravel(), a.ravel(), 32)[0]
    assert mutual_information(a, a) == pytest.approx(h_a)
    # equal-width bins over each image's own range: invariant to increasing and decreasing affine maps
    for remapped in (3.0 * b + 7.0, -0.2 * b + 1.0):
        assert mutual_information(a, remapped) == pytest.approx(mutual_information(a, b), rel=1e-12)
    assert arithmetic_normalised_mutual_information(a, b) < arithmetic_normalised_mutual_information(a, a)
    assert mutual_information(a, rng.normal(size=a.shape), bins=8) < 0.05
    with pytest.raises(InputError, match="NaN"):
        mutual_information(a, np.where(b > 2, np.nan, b))


def test_ncc_matches_corrcoef():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(12, 13, 14))
    b = 0.5 * a + rng.normal(size=a.shape)
    mask = a > -0.5
    assert ncc(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], rel=1e-12)
    assert ncc(a, b, mask) == pytest.approx(np.corrcoef(a[mask], b[mask])[0, 1], rel=1e-12)
    assert ncc(a, -2 * a + 1) == pytest.approx(-1.0)
    with pytest.raises(InputError, match="mask is empty"):
        ncc(a, b, np.zeros(a.shape, dtype=bool))


def test_scores_against_one_masked_reference_equal_the_single_pair_functions():
    """`similarity_scores` of several images against one prepared `MaskedImage` (the evaluation's fixed image
    before and after registration) gives the numbers of `ncc`, `mutual_information` and the NMI, whose
    agreement with ``np.corrcoef`` and ``np.histogram2d`` the tests above show."""
    rng = np.random.default_rng(4)
    a = rng.gamma(2.0, size=(20, 22, 24)).astype(np.float32)
    mask = rng.random(a.shape) > 0.3
    for m in (None, mask):
        reference = MaskedImage(a, m)
        for b in (np.sqrt(a) + 0.3 * rng.normal(size=a.shape), rng.normal(size=a.shape).astype(np.float32)):
            for bins in (32, 12):
                scores = similarity_scores(reference, reference.of(b), bins)
                assert scores == {
                    "ncc": ncc(a, b, m),
                    "mi": mutual_information(a, b, bins, m),
                    "nmi": arithmetic_normalised_mutual_information(a, b, bins, m),
                }
    with pytest.raises(InputError, match="mask is empty"):
        MaskedImage(a, np.zeros(a.shape, dtype=bool))
    with pytest.raises(InputError, match="different shapes"):
        MaskedImage(a).of(a[1:])


# ---------------------------------------------------------------------------------- jacobian


def _smooth_field(shape: tuple[int, int, int], amplitude_mm: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = np.stack([gaussian_filter(rng.normal(size=shape), 3.0) for _ in range(3)], axis=-1)
    return u * (amplitude_mm / np.abs(u).max())


def _random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _sitk_jacobian(field: Volume) -> np.ndarray:
    image = to_sitk(field.with_array(field.array.astype(np.float64)))
    assert image.GetPixelID() == sitk.sitkVectorFloat64
    return from_sitk(sitk.DisplacementFieldJacobianDeterminant(image)).array


def test_jacobian_matches_simpleitk_identity_direction():
    geometry = Geometry((20, 22, 24), (1.0, 1.5, 2.5), (-10.0, 4.0, 30.0))
    field = Volume(_smooth_field(geometry.shape, 4.0, seed=4), geometry)
    ours = jacobian_determinant(field)
    assert ours.geometry is geometry
    reference = _sitk_jacobian(field)
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(ours.array[inner], reference[inner], atol=1e-4)
    assert np.ptp(ours.array) > 0.1  # the field is not trivially rigid


def test_jacobian_oblique_direction_matches_simpleitk_on_rotated_vectors():
    # SimpleITK ignores the direction matrix; on an identity-direction grid with the vectors
    # expressed along the grid axes (R^T u) it computes the physical Jacobian of u exactly.
    rotation = _random_rotation(5)
    oblique = Geometry((18, 20, 22), (1.2, 0.9, 2.0), (3.0, -2.0, 1.0), rotation)
    u = _smooth_field(oblique.shape, 3.0, seed=6)
    ours = jacobian_determinant(Volume(u, oblique)).array
    aligned = Geometry(oblique.shape, oblique.spacing, oblique.origin)
    reference = _sitk_jacobian(Volume(u @ rotation, aligned))
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(ours[inner], reference[inner], atol=1e-4)
    ignoring_direction = _sitk_jacobian(Volume(u, oblique))
    assert np.abs(ignoring_direction[inner] - ours[inner]).max() > 1e-3


@pytest.mark.parametrize("dtype, tolerance", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_jacobian_equals_the_dense_numpy_formula_across_slabs(dtype, tolerance):
    # The definition written out with np.gradient and one 3x3 product per voxel, on a field longer
    # than one slab along i (slab seams) on an oblique grid; float32 fields are computed in float32.
    geometry = Geometry((70, 9, 11), (1.1, 0.7, 1.9), (5.0, -3.0, 2.0), _random_rotation(9))
    u = _smooth_field(geometry.shape, 6.0, seed=10).astype(dtype)
    d_index = np.stack(np.gradient(u.astype(np.float64), axis=(0, 1, 2)), axis=-1)
    expected = np.linalg.det(d_index @ np.linalg.inv(geometry.direction @ np.diag(geometry.spacing)) + np.eye(3))
    ours = jacobian_determinant(Volume(u, geometry)).array
    assert ours.dtype == dtype
    np.testing.assert_allclose(ours, expected, atol=tolerance)


@pytest.mark.parametrize("direction", [np.eye(3), _random_rotation(7)])
def test_jacobian_of_uniform_scaling_is_s_cubed(direction):
    geometry = Geometry((9, 10, 11), (0.8, 1.7, 3.1), (12.0, -40.0, 7.5), direction)
    s = 1.15
    x = geometry.index_to_physical(np.moveaxis(np.indices(geometry.shape, dtype=np.float64), 0, -1))
    centre = x.mean(axis=(0, 1, 2))
    jac = jacobian_determinant(Volume((s - 1.0) * (x - centre), geometry)).array
    np.testing.assert_allclose(jac, s**3, rtol=1e-10)  # linear field: exact at the border too



def test_deformable_part_of_a_pure_affine_is_one_and_of_a_composition_is_the_deformation():
    """phi = A o psi: det J_phi / det A is 1 for psi = identity and det J_psi otherwise."""
    geometry = Geometry((12, 13, 14), (1.1, 0.9, 2.0), (-10.0, 20.0, 5.0), _random_rotation(3))
    x = geometry.index_to_physical(np.moveaxis(np.indices(geometry.shape, dtype=np.float64), 0, -1))
    affine = np.eye(4)
    affine[:3, :3] = _random_rotation(5) @ np.diag([1.2, 0.8, 1.1])
    affine[:3, 3] = (4.0, -3.0, 2.5)
    mapped = x @ affine[:3, :3].T + affine[:3, 3]
    whole = jacobian_determinant(Volume(mapped - x, geometry))
    np.testing.assert_allclose(whole.array, np.linalg.det(affine[:3, :3]), rtol=1e-10)
    np.testing.assert_allclose(deformable_jacobian(whole, affine).array, 1.0, rtol=1e-10)
    psi = x + 0.3 * np.sin(x / 7.0)  # a smooth deformation, then the affine
    composed = jacobian_determinant(Volume(psi @ affine[:3, :3].T + affine[:3, 3] - x, geometry))
    alone = jacobian_determinant(Volume(psi - x, geometry))
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(deformable_jacobian(composed, affine).array[inner], alone.array[inner], rtol=1e-10)
    assert deformable_jacobian(whole, None) is whole
    with pytest.raises(InputError, match="singular"):
        deformable_jacobian(whole, np.diag([1.0, 0.0, 1.0, 1.0]))

def test_folding_percent_and_sdlogj():
    geometry = Geometry((20, 8, 8), (1.5, 1.0, 1.0), (0.0, 0.0, 0.0))
    i0, i1 = 6, 11
    u = np.zeros((*geometry.shape, 3))
    # u_x = -2 (x - x0) on the slab i0..i1, constant outside: du_x/dx = -2 inside (det = -1), the
    # central difference straddling each slab face gives -1 (det = 0): i0..i1 all fold
    i = np.arange(geometry.shape[0])
    u[..., 0] = (-2.0 * geometry.spacing[0] * (np.clip(i, i0, i1) - i0))[:, None, None]
    jac = jacobian_determinant(Volume(u, geometry))
    expected = 100.0 * (i1 - i0 + 1) / geometry.shape[0]
    assert folding_percent(jac) == pytest.approx(expected)
    assert folding_percent(jac.array) == pytest.approx(expected)
    slab = np.zeros(geometry.shape, dtype=bool)
    slab[i0 + 1 : i1] = True
    assert folding_percent(jac, mask=slab) == 100.0
    np.testing.assert_allclose(jac.array[slab], -1.0)

    smooth = jacobian_determinant(Volume(_smooth_field((16, 16, 16), 0.5, seed=8), Geometry((16,) * 3, (1,) * 3, (0,) * 3)))
    assert folding_percent(smooth) == 0.0

    identity = jacobian_determinant(Volume(np.zeros((6, 6, 6, 3)), Geometry((6,) * 3, (2.0,) * 3, (0,) * 3)))
    np.testing.assert_allclose(identity.array, 1.0)
    assert sdlogj(identity) == 0.0
    # std of log(det + shift): log values {1, 3} -> population std 1
    assert sdlogj(np.array([math.e - 3.0, math.e**3 - 3.0])) == pytest.approx(1.0)
    assert sdlogj(np.array([math.exp(-1.0), math.e]), shift=0.0) == pytest.approx(1.0)
    assert np.isfinite(sdlogj(jac))  # folded voxels are clipped, not -inf


def test_jacobian_rejects_non_fields():
    with pytest.raises(InputError, match=r"\(I, J, K, 3\)"):
        jacobian_determinant(Volume(np.zeros((4, 4, 4)), Geometry((4,) * 3, (1,) * 3, (0,) * 3)))


# --------------------------------------------------------------------------------------- PMM


def _pmm_reference(
    fixed: np.ndarray, warped: np.ndarray, mask: np.ndarray | None, patch: int, stride: int, bins: int, min_fraction: float
) -> np.ndarray:
    """Appendix C with plain loops: every patch, its in-domain voxels, its NMI, averaged per voxel."""
    domain = np.ones(fixed.shape, dtype=bool) if mask is None else mask
    edges = [np.linspace(x[domain].min(), x[domain].max(), bins + 1) for x in (fixed, warped)]
    total = np.zeros(fixed.shape)
    count = np.zeros(fixed.shape)
    corners = [range(0, max(0, math.ceil((n - patch) / stride) * stride) + 1, stride) for n in fixed.shape]
    for corner in itertools.product(*corners):
        box = tuple(slice(c, c + patch) for c in corner)
        inside = domain[box]
        if inside.sum() < min_fraction * patch**3:
            continue
        joint, _, _ = np.histogram2d(fixed[box][inside], warped[box][inside], bins=edges)
        p = joint / joint.sum()
        h = [float(-(q[q > 0] * np.log(q[q > 0])).sum()) for q in (p.sum(axis=1), p.sum(axis=0), p)]
        if h[0] + h[1] == 0:
            continue
        total[box][inside] += 2 * (h[0] + h[1] - h[2]) / (h[0] + h[1])
        count[box][inside] += 1
    with np.errstate(invalid="ignore"):
        return np.where(domain & (count > 0), total / count, np.nan)


@pytest.mark.parametrize(
    ("shape", "use_mask", "min_fraction"),
    [((30, 33, 36), False, 0.125), ((32, 32, 32), True, 0.125), ((34, 29, 31), True, 0.4), ((10, 20, 13), False, 0.1),
     ((57, 46, 50), "small", 0.125)],
)
def test_pmm_matches_loop_reference(shape, use_mask, min_fraction):
    # "small": a ball away from every border of a larger image, so the map is computed on a window of it
    rng = np.random.default_rng(9)
    fixed = gaussian_filter(rng.normal(size=shape), 2.0)
    warped = fixed**2 + 0.02 * rng.normal(size=shape)
    centre, radius = ((31.0, 21.0, 27.0), 9.5) if use_mask == "small" else (tuple(n / 2 for n in shape), min(shape) / 2.2)
    mask = _ball(shape, centre, radius) if use_mask else None
    ours = pmm_map(fixed, warped, mask, patch=16, stride=4, bins=16, min_fraction=min_fraction)
    reference = _pmm_reference(fixed, warped, mask, 16, 4, 16, min_fraction)
    assert ours.dtype == np.float32 and ours.shape == shape
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert np.isfinite(reference[mask if mask is not None else ...]).mean() > 0.3
    if mask is not None:
        assert np.all(np.isnan(ours[~mask]))
        assert pmm_mean(ours, mask) == pytest.approx(np.nanmean(reference[mask]), rel=1e-5)
    domain = np.ones(shape, dtype=bool) if mask is None else mask
    fixed_bins = MaskedImage(fixed, domain)
    codes = fixed_bins.bins(16) * 16 + quantise(fixed_bins.of(warped), 16)
    grid = PatchGrid(domain)
    np.testing.assert_array_equal(grid.pmm(codes, min_fraction=min_fraction), ours)
    # the device path (torch; here on the CPU): the same map up to the rounding of the entropies' sums
    np.testing.assert_allclose(grid.pmm(codes, min_fraction=min_fraction, device="cpu"), ours, rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pmm_on_the_gpu_matches_numpy():
    rng = np.random.default_rng(4)
    shape = (70, 64, 58)
    fixed = gaussian_filter(rng.normal(size=shape), 2.0)
    domain = _ball(shape, (35.0, 32.0, 29.0), 27.0)
    fixed_bins = MaskedImage(fixed, domain)
    codes = fixed_bins.bins(16) * 16 + quantise(fixed_bins.of(np.abs(fixed) + 0.1 * rng.normal(size=shape)), 16)
    grid = PatchGrid(domain)
    on_gpu = grid.pmm(codes, device="cuda")
    np.testing.assert_allclose(on_gpu, grid.pmm(codes), rtol=1e-6, atol=1e-7, equal_nan=True)
    assert np.isfinite(on_gpu[domain]).mean() > 0.9


def test_pmm_rejects_bad_parameters():
    image = np.zeros((20, 20, 20))
    with pytest.raises(InputError, match="divisor"):
        pmm_map(image, image, patch=16, stride=5)
    with pytest.raises(InputError, match="empty"):
        pmm_map(image, image, np.zeros(image.shape, dtype=bool))
    with pytest.raises(InputError, match="one joint bin code per voxel"):
        PatchGrid(np.ones(image.shape, dtype=bool)).pmm(np.zeros(7, dtype=np.intp))


def test_pmm_on_real_brain_prefers_the_aligned_pair(shared_data_dir: Path):
    fixed = from_sitk(sitk.ReadImage(str(shared_data_dir / "pair" / "fixed_img.nii.gz"), sitk.sitkFloat32)).array
    centre = [n // 2 for n in fixed.shape]
    crop = fixed[tuple(slice(c - 32, c + 32) for c in centre)]
    rng = np.random.default_rng(10)
    aligned = crop + 0.02 * rng.normal(size=crop.shape)
    shifted = np.roll(crop, 3, axis=0) + 0.02 * rng.normal(size=crop.shape)
    mask = gaussian_filter(crop, 1.0) > 0.1
    assert mask.mean() > 0.3

    self_map = pmm_map(crop, crop, mask)
    np.testing.assert_allclose(self_map[np.isfinite(self_map)], 1.0, rtol=1e-6)
    aligned_mean = pmm_mean(pmm_map(crop, aligned, mask), mask)
    shifted_mean = pmm_mean(pmm_map(crop, shifted, mask), mask)
    assert 0.0 < shifted_mean < aligned_mean < 1.0
    assert aligned_mean - shifted_mean > 0.05


def test_pmm_of_a_domain_at_one_end_of_a_wide_image():
    """Chunks of patch rows outside the domain score nothing (a cross-contrast run used to fail here)."""
    rng = np.random.default_rng(0)
    image = rng.random((96, 256, 256)).astype(np.float32)
    domain = np.zeros(image.shape, bool)
    domain[:24] = True
    pmm = pmm_map(image, image, domain)
    assert np.isnan(pmm[24:]).all() and np.isfinite(pmm[:24]).all()
    np.testing.assert_allclose(pmm[:24], 1.0, atol=1e-6)  # an image against itself: NMI 1 in every patch


def test_pmm_patch_grid_serves_several_maps():
    """One `PatchGrid` scores the fixed image against two moving images as two separate calls do."""
    rng = np.random.default_rng(3)
    shape = (40, 36, 44)
    fixed = gaussian_filter(rng.normal(size=shape), 2.0)
    domain = _ball(shape, (20.0, 18.0, 22.0), 15.0)
    grid = PatchGrid(domain)
    fixed_bins = MaskedImage(fixed, domain)
    for moving in (fixed**2, np.roll(fixed, 4, axis=1)):
        codes = fixed_bins.bins(16) * 16 + quantise(fixed_bins.of(moving), 16)
        np.testing.assert_array_equal(grid.pmm(codes), pmm_map(fixed, moving, domain))
    with pytest.raises(InputError, match="one joint bin code per voxel"):
        grid.pmm(codes[:-1])
