"""The segreg defect measurements (experiments.segreg_defects) on analytic cases."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from JointRegSegLib.experiments.segreg_defects import border_distance, implausible, label_ranges, local_ncc, near_brain


def test_border_distance_is_the_distance_to_the_nearest_differently_labelled_face():
    labels = np.zeros((20, 6, 6), np.int32)
    labels[:10] = 1
    labels[10:] = 2  # one plane of border voxels on each side: i = 9 and i = 10
    distance = border_distance(labels, (2.0, 1.0, 1.0))
    expected = 2.0 * np.minimum(np.abs(np.arange(20) - 9), np.abs(np.arange(20) - 10))
    assert np.allclose(distance, expected[:, None, None])


def test_implausible_flags_intensities_outside_the_moving_labels_range():
    rng = np.random.default_rng(0)
    labels = np.zeros((10, 10, 10), np.int32)
    labels[2:8, 2:8, 2:8] = 1
    image = np.where(labels == 1, rng.uniform(0.4, 0.6, labels.shape), 0.0).astype(np.float32)
    ranges = label_ranges(image, labels, near_brain(labels, (1.0, 1.0, 1.0)))
    low, high = ranges[1]
    assert 0.4 <= low < 0.42 and 0.58 < high <= 0.6
    warped = image.copy()
    warped[4, 4, 4] = 0.9  # a white speckle inside the label
    warped[5, 5, 5] = 0.1  # a dark one
    bad, bright = implausible(warped, labels, ranges)
    assert bad[4, 4, 4] and bright[4, 4, 4] and bad[5, 5, 5] and not bright[5, 5, 5]
    inside = labels == 1
    assert bad[inside].mean() < 0.05  # the 1st-99th percentile range leaves about 2 % of the 216 voxels out, plus the two speckles


def test_local_ncc_is_one_for_an_affine_intensity_change_and_minus_one_for_an_inversion():
    image = ndimage.gaussian_filter(np.random.default_rng(1).standard_normal((16, 16, 16)), 1.0)
    assert np.allclose(local_ncc(image, 2.0 * image + 3.0)[4:-4, 4:-4, 4:-4], 1.0, atol=1e-4)
    assert np.allclose(local_ncc(image, -image)[4:-4, 4:-4, 4:-4], -1.0, atol=1e-4)
