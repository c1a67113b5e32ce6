"""The learned methods against their targets (issue 17): registration beyond the affine stage, own segmentations.

For each worker output folder (a benchmark run of tto, uresnet or hof on ``../shared/data/pair``):

- ``dice``: mean Dice (30 standard structures, `evaluation.label_metrics`) of the moving label map
  warped by the whole mapping (``displacement.nii.gz``);
- ``dice_affine``: the same with the method's own affine stage alone (``affine.tfm``: tto's and hof's
  optimised affine, uresnet's affine head), and ``gain = dice - dice_affine`` (target >= 0.08);
- ``seg_dice_fixed`` / ``seg_dice_moving``: the method's own segmentations against the given label
  maps, averaged over the structures the method predicts (its class table: uresnet's cerebral white
  matter, cortex and lateral ventricles left and right; hof's 28 structures), a structure it misses
  counting 0 (target >= 0.60). `evaluation.segmentation_dice` averages over all 30 structures instead.

``jers`` is affine only and trained for its atlas: `atlas_route` runs it on a labelled scan against the
shipped atlas and scores the atlas tissue labels brought into the scan by its affine (``reg_dice``)
against the same labels placed without registration (``reg_dice_initial``: the atlas grid's centre on
the scan grid's centre), and its brain mask against the scan's reference mask (``dice_ext``, target >= 0.90; `training.jers.reference_brain`).

Usage::

    python -m JointRegSegLib.experiments.learned_targets BENCH_OUT/pair/*/result --truth ../shared/data/pair
    python -m JointRegSegLib.experiments.learned_targets --jers ../shared/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from ..evaluation import label_metrics
from ..imageio import read_image, read_labels, to_sitk
from ..imageio.geometry import Volume
from ..imageio.network_grid import resample
from ..labels import TISSUE_LABELS, tissue_of
from ..metrics import dice_per_label
from ..spatial import read_displacement_field
from ..spatial.physical import warp_volume

# FreeSurfer codes each method's segmentation can produce
PREDICTED_CODES = {
    "uresnet": (2, 41, 3, 42, 4, 43),
    "hof": None,  # methods.hof.HOF_LABELS, read lazily
}


def _codes(method: str) -> tuple[int, ...] | None:
    if method == "hof":
        from ..methods.hof import HOF_LABELS

        return HOF_LABELS
    return PREDICTED_CODES.get(method)


def own_segmentation_dice(truth: Volume, predicted: Volume, codes: tuple[int, ...]) -> float:
    """Mean Dice over the ``codes`` present in ``truth`` (a missed one counts 0), on the truth's grid."""
    if not predicted.geometry.same_as(truth.geometry):
        predicted = resample(predicted, truth.geometry, interpolation="nearest")
    present = [c for c in codes if (truth.array == c).any()]
    scores = dice_per_label(truth.array, predicted.array, labels=present)
    return float(np.mean([scores.get(c, 0.0) for c in present]))


def affine_only(moving_seg: Volume, fixed: Volume, transform_file: Path) -> np.ndarray:
    """``moving_seg`` resampled onto ``fixed``'s grid through the affine of ``transform_file`` (nearest)."""
    transform = sitk.ReadTransform(str(transform_file))
    reference = to_sitk(fixed.with_array(np.zeros(fixed.array.shape, np.uint8)))
    moved = sitk.Resample(to_sitk(moving_seg), reference, transform, sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(moved).transpose(2, 1, 0)


def score(result: Path, truth: Path) -> dict[str, Any]:
    """The numbers of the module docstring for one worker output folder."""
    provenance = json.loads((result / "provenance.json").read_text())
    method = provenance["method"]
    fixed_seg, moving_seg = read_labels(truth / "fixed_seg.nii.gz"), read_labels(truth / "moving_seg.nii.gz")
    initial = resample(moving_seg, fixed_seg.geometry, interpolation="nearest").array
    warped = warp_volume(moving_seg, read_displacement_field(result / "displacement.nii.gz"), interpolation="nearest").array
    row: dict[str, Any] = {"folder": str(result), "method": method, "options": provenance.get("options", {})}
    whole = label_metrics(fixed_seg, warped, initial)
    row["dice"], row["dice_initial"] = whole["dice_mean"], whole["dice_mean_initial"]
    if (result / "affine.tfm").exists():
        row["dice_affine"] = label_metrics(fixed_seg, affine_only(moving_seg, fixed_seg, result / "affine.tfm"), initial)["dice_mean"]
        row["gain"] = row["dice"] - row["dice_affine"]
    codes = _codes(method)
    for side, given in (("fixed", fixed_seg), ("moving", moving_seg)):
        if codes is not None and (result / f"{side}_seg.nii.gz").exists():
            row[f"seg_dice_{side}"] = own_segmentation_dice(given, read_labels(result / f"{side}_seg.nii.gz"), codes)
    return row


def atlas_route(shared: Path) -> dict[str, Any]:
    """jers on labelled scans against the shipped atlas (module docstring)."""
    from ..atlas import load_atlas
    from ..methods import get_method
    from ..methods.base import Inputs, Options
    from ..labels import tissue_codes
    from ..methods.jers import GRID_SHAPE, affine_displacement, physical_affine, to_network_image
    from ..training.jers import REAL_SCANS, reference_brain

    atlas_image, atlas_labels = load_atlas()
    method = get_method("jers")
    report = {}
    for name, (image_file, labels_file, brain_source) in REAL_SCANS.items():
        if labels_file is None:
            continue
        image, labels = read_image(shared / image_file), read_labels(shared / labels_file).array
        truth = tissue_of(labels)
        mask = reference_brain(image.array, labels, brain_source)
        result = method.register(Inputs(atlas_image, image, atlas_labels), Options(extra={"segmentation": "atlas"}))
        raw_grid = to_network_image(image, torch.device("cpu")).grid
        atlas_grid = to_network_image(atlas_image, torch.device("cpu")).grid
        centred = physical_affine(torch.eye(4, dtype=torch.float64)[None], atlas_grid, raw_grid)
        placed = warp_volume(atlas_labels, affine_displacement(np.linalg.inv(centred), image.geometry), interpolation="nearest")
        placed = tissue_codes(placed.array)

        def tissue_dice(predicted: np.ndarray) -> float:
            scores = dice_per_label(truth, predicted, labels=list(TISSUE_LABELS))
            return float(np.mean([scores.get(c, 0.0) for c in TISSUE_LABELS]))

        report[name] = {
            "reg_dice": tissue_dice(result.moving_seg.array),
            "reg_dice_initial": tissue_dice(placed),
            "dice_ext": dice_per_label(mask.astype(np.uint8), result.brain_mask.array, labels=[1])[1],
            "grid": list(GRID_SHAPE),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path, help="worker output folders (benchmark runs)")
    parser.add_argument("--truth", type=Path, help="the folder of the pair's label maps (fixed_seg, moving_seg)")
    parser.add_argument("--jers", type=Path, metavar="SHARED_DATA", help="run jers's atlas route on the labelled scans of this folder")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {}
    if args.results:
        out["results"] = [score(r, args.truth) for r in args.results]
    if args.jers:
        out["jers_atlas_route"] = atlas_route(args.jers)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
