"""The bundled sample pair is anatomically oriented: its header puts each structure where it is in a head.

Physical space is LPS (x towards the patient's left, y posterior, z superior). An identity header on
these LIA voxels once showed coronal anatomy in "axial" views; these checks fail for any header that
swaps or flips the axes.
"""

from __future__ import annotations

import numpy as np
import pytest

from JointRegSegLib.imageio.io import read_image, read_labels
from JointRegSegLib.imageio.validate import check_same_grid

LEFT_WM, RIGHT_WM, LEFT_VENTRICLE, RIGHT_VENTRICLE, BRAIN_STEM, LEFT_CEREBELLUM, RIGHT_CEREBELLUM = 2, 41, 4, 43, 16, 8, 47
LEFT_THALAMUS, LEFT_PUTAMEN = 10, 12


def _centroid(labels, codes) -> np.ndarray:
    """Physical (LPS mm) centroid of the voxels holding any of ``codes``."""
    index = np.argwhere(np.isin(labels.array, codes)).mean(axis=0)
    return labels.geometry.index_to_physical(index)


@pytest.mark.parametrize("which", ["fixed", "moving"])
def test_sample_pair_is_anatomically_oriented(sample_pair, which):
    image = read_image(sample_pair[which])
    labels = read_labels(sample_pair[f"{which}_seg"])
    check_same_grid(image, labels, ("image", "label map"))
    left, right = _centroid(labels, [LEFT_WM]), _centroid(labels, [RIGHT_WM])
    assert left[0] - right[0] > 30, "left white matter must lie at the patient's left (+x in LPS)"
    ventricles = _centroid(labels, [LEFT_VENTRICLE, RIGHT_VENTRICLE])
    brainstem = _centroid(labels, [BRAIN_STEM])
    assert ventricles[2] - brainstem[2] > 20, "the brainstem must lie below the lateral ventricles (-z)"
    cerebellum = _centroid(labels, [LEFT_CEREBELLUM, RIGHT_CEREBELLUM])
    assert cerebellum[1] - ventricles[1] > 20, "the cerebellum must lie behind the ventricles (+y, posterior)"
    assert _centroid(labels, [LEFT_PUTAMEN])[0] > _centroid(labels, [LEFT_THALAMUS])[0], "the putamen lies lateral to the thalamus"
