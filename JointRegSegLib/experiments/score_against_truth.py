"""Score a result folder against TRUE label maps, for runs driven by automatic segmentations.

The worker scores Dice against the label maps it was given; when those are another method's
automatic segmentations (seed 001's "automatic segmentation" setting: segreg fed by uresnet's
segmentations), that says only how well the two automatic maps agree. This script warps the TRUE
moving label map with the result's field and compares it with the TRUE fixed label map (30
standard structures, `evaluation.label_metrics`), and scores any segmentation the result holds
(`evaluation.segmentation_dice`).

Usage (the paper-001 experiment, with ``D=../shared/data/pair``)::

    jointregseg register --method uresnet --fixed $D/fixed_img.nii.gz --moving $D/moving_img.nii.gz \\
        --option segment_fixed=true --out auto
    jointregseg register --method segreg --fixed $D/fixed_img.nii.gz --moving $D/moving_img.nii.gz \\
        --fixed-seg auto/fixed_seg.nii.gz --moving-seg auto/moving_seg.nii.gz --out segreg_auto
    python -m JointRegSegLib.experiments.score_against_truth segreg_auto $D/fixed_seg.nii.gz $D/moving_seg.nii.gz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..evaluation import label_metrics, segmentation_dice
from ..imageio import read_labels
from ..imageio.network_grid import resample
from ..metrics import folding_percent, jacobian_determinant
from ..spatial import read_displacement_field
from ..spatial.physical import warp_volume


def score(result: Path, fixed_truth: Path, moving_truth: Path) -> dict[str, Any]:
    """Registration Dice/HD95 of the true label maps under the result's field, folding, and the
    Dice of the result's own segmentations against the truth."""
    fixed_seg, moving_seg = read_labels(fixed_truth), read_labels(moving_truth)
    field = read_displacement_field(result / "displacement.nii.gz")
    warped = warp_volume(moving_seg, field, interpolation="nearest").array
    initial = resample(moving_seg, fixed_seg.geometry, interpolation="nearest").array
    metrics = {k: v for k, v in label_metrics(fixed_seg, warped, initial).items() if k != "labels"}
    metrics["folding_percent"] = folding_percent(jacobian_determinant(field).array)
    for name, truth in (("fixed_seg", fixed_seg), ("moving_seg", moving_seg)):
        if (result / f"{name}.nii.gz").exists():
            metrics[f"seg_dice_{name.split('_')[0]}"] = segmentation_dice(truth, read_labels(result / f"{name}.nii.gz"))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a worker output folder")
    parser.add_argument("fixed_truth", type=Path, help="the fixed image's true label map")
    parser.add_argument("moving_truth", type=Path, help="the moving image's true label map")
    args = parser.parse_args(argv)
    print(json.dumps(score(args.result, args.fixed_truth, args.moving_truth), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
