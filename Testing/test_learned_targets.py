"""The issue-17 target scores (experiments.learned_targets) of a worker output folder, against scipy."""

from __future__ import annotations

import json
import shutil

import numpy as np
from scipy import ndimage

from JointRegSegLib.evaluation import EVALUATION_LABELS
from JointRegSegLib.experiments.learned_targets import score
from JointRegSegLib.imageio import read_labels
from JointRegSegLib.imageio.geometry import Volume
from JointRegSegLib.metrics import dice_per_label
from JointRegSegLib.spatial.field_io import write_displacement_field
from JointRegSegLib.worker.outputs import write_affine


def test_affine_only_dice_is_the_label_map_moved_by_the_affine_alone(sample_pair, tmp_path) -> None:
    """Truth: one label map as fixed and moving. Result: a zero field, an affine that shifts by two voxels
    along i. ``dice`` and ``dice_initial`` are 1; ``dice_affine`` is the Dice of the map against itself
    shifted by scipy (nearest neighbour), averaged over the evaluation structures present."""
    truth = tmp_path / "truth"
    truth.mkdir()
    for side in ("fixed", "moving"):
        shutil.copy(sample_pair["fixed_seg"], truth / f"{side}_seg.nii.gz")
    labels = read_labels(sample_pair["fixed_seg"])
    geometry = labels.geometry
    result = tmp_path / "result"
    result.mkdir()
    (result / "provenance.json").write_text(json.dumps({"method": "tto"}))
    write_displacement_field(Volume(np.zeros((*geometry.shape, 3), np.float32), geometry), result / "displacement.nii.gz")
    matrix = np.eye(4)
    matrix[:3, 3] = 2.0 * geometry.spacing[0] * np.asarray(geometry.direction)[:, 0]  # fixed point -> moving point
    write_affine(matrix, result / "affine.tfm")

    row = score(result, truth)

    shifted = ndimage.shift(labels.array, (-2, 0, 0), order=0, mode="constant", cval=0)  # warped[i] = moving[i + 2]
    present = [c for c in EVALUATION_LABELS if (labels.array == c).any()]
    expected = dice_per_label(labels.array, shifted, labels=present)
    assert row["dice"] == row["dice_initial"] == 1.0
    assert row["dice_affine"] == np.mean([expected.get(c, 0.0) for c in present])
    assert row["gain"] == 1.0 - row["dice_affine"] > 0.05
