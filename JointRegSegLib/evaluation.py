"""Quality maps and numbers of one registration result, shared by the worker and the benchmark.

All evaluation happens on the fixed image's grid: the Jacobian-determinant map of the written
physical field (by default of its deformable part: the whole mapping's divided by the affine
part's, so a global scaling does not tint the map; folding and SDlogJ are of the whole mapping),
the patch-wise NMI map (PMM, seed 004 appendix C) inside the fixed image's foreground, image
similarity before and after (NMI as in the PMM, in [0, 1]), and Dice/HD95 per label when label
maps are given.

`Evaluation` holds what every result of one pair shares (the fixed image's normalised
intensities and foreground, the moving image and label map as they lie on the fixed grid, the
numbers before registration), computed once on first use: the worker checks, maps and scores a
result with it, the benchmark every tool's result of a pair, and the pictures reuse its arrays.
Its steps are timed under ``evaluation: ...`` (`timing`). The fixed image's side (foreground, bins, patches) and the
numbers before registration are computed on a thread of their own (`Evaluation.numbers_before_beside`): the worker
starts it before the registration, whose steps leave a core idle (the module's job on the benchmark pair, measured
alone: 0.0-0.2 s shorter, the evaluation's share of uresnet's 37 -> 30 %, of segreg's 21 -> 14 %;
`docs/results/call_profile.md`, eighteenth run), else `Evaluation.maps` starts it beside the PMM and the Jacobian
(numpy's passes there run on one core; on 2 cores the evaluation of uresnet's result took 2.96-3.39 s in a row,
2.66-2.67 s so); it is joined where the metrics need its numbers. Scoring the labels on a thread beside the maps too
made every job slower (uresnet 4.3-4.9 -> 4.6-5.2 s, hof 6.3-6.5 -> 7.1 s): the cores are busy then (the maps, the
background writing, the pictures' child).
"""

from __future__ import annotations

import threading
from contextlib import suppress
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .colour_scales import DEFORMABLE_PART, ROBUST_PERCENTILES, WHOLE_MAPPING, display_window
from .errors import InputError
from .imageio.geometry import Volume
from .imageio.intensity import NORMALISATION_PERCENTILES, checked_window, percentiles, scale_to_window
from .imageio.network_grid import resample
from .labels import EVALUATION_LABELS, is_tissue_map, label_info, tissue_of
from .methods.base import Inputs, Result
from .metrics import (
    deformable_jacobian,
    dice_per_label,
    folding_percent,
    hd95_per_label,
    jacobian_determinant,
    labels_in,
    pmm_mean,
    sdlogj,
)
from .metrics.foreground import foreground_mask
from .metrics.pmm import BINS as PMM_BINS, PatchGrid
from .metrics.similarity import MaskedImage, joint_codes, quantise, similarity_scores
from .timing import Stopwatch

MIN_COVERAGE = 0.05


@dataclass
class Maps:
    """Voxel-wise quality maps on the fixed grid."""

    jacobian: Volume  # the det J map written and shown: the deformable part, or the whole mapping
    jacobian_part: str  # which: "deformable part" or "whole mapping"
    whole_jacobian: Volume  # det J of the whole mapping (folding, SDlogJ)
    pmm: Volume
    mask: np.ndarray


class Evaluation:
    """The evaluation of results of one registration problem (see the module docstring).

    ``device`` is where the Jacobian, the PMM's histograms and the HD95 search run (a torch device name), ``workers`` the
    CPU threads of the HD95 search, ``watch`` the stopwatch the steps are timed on.
    """

    def __init__(self, inputs: Inputs, device: str = "cpu", workers: int = 1, watch: Stopwatch | None = None) -> None:
        self.inputs = inputs
        self.device = device
        self.workers = workers
        self.watch = watch or Stopwatch()
        self._last: tuple[np.ndarray, np.ndarray] | None = None
        self._beside: threading.Thread | None = None
        self._prepared: threading.Event | None = None
        self._windows: dict[int, tuple[np.ndarray, tuple[tuple[float, float], tuple[float, float]]]] = {}

    @cached_property
    def fixed_normalised(self) -> np.ndarray:
        """`normalise_intensity` of the fixed image."""
        fixed = self.inputs.fixed.array
        with self.watch.step("evaluation: foreground"):
            return scale_to_window(fixed, *self.windows(fixed)[0])

    def windows(self, array: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
        """An image's `intensity_window` (its normalisation for the metrics) and its `robust_window` (its pictures'
        grey levels), from one partition of its values; kept for each image asked for (fixed, as it lies, warped).
        The image must be finite (the inputs are checked when read, a result by `check`)."""
        known = self._windows.get(id(array))
        if known is None or known[0] is not array:
            values = np.asarray(array)
            p = percentiles(values, [*NORMALISATION_PERCENTILES, *ROBUST_PERCENTILES])
            known = (array, (checked_window(values, p[0], p[1]), display_window(p[2], p[3])))
            self._windows[id(array)] = known
        return known[1]

    @cached_property
    def mask(self) -> np.ndarray:
        """The fixed image's foreground (`foreground_mask`): the PMM's domain, where similarity is measured."""
        normalised = self.fixed_normalised
        with self.watch.step("evaluation: foreground"):
            return foreground_mask(self.inputs.fixed, normalised)

    @cached_property
    def reference(self) -> MaskedImage:
        """The fixed image's normalised intensities inside its foreground, and their bins (`MaskedImage`)."""
        normalised, mask = self.fixed_normalised, self.mask
        with self.watch.step("evaluation: foreground"):
            return MaskedImage(normalised, mask)

    @cached_property
    def patches(self) -> PatchGrid:
        """The PMM's patches over the fixed image's foreground, shared by the maps before and after registration."""
        mask = self.mask
        with self.watch.step("evaluation: foreground"):
            return PatchGrid(mask)

    @cached_property
    def initial(self) -> Volume:
        """The moving image as it lies (identity transform), on the fixed grid."""
        with self.watch.step("evaluation: before registration"):
            return resample(self.inputs.moving, self.inputs.fixed.geometry)

    @cached_property
    def initial_seg(self) -> np.ndarray | None:
        """The moving label map as it lies, on the fixed grid (nearest neighbour); None without one."""
        if self.inputs.moving_seg is None:
            return None
        with self.watch.step("evaluation: before registration"):
            return resample(self.inputs.moving_seg, self.inputs.fixed.geometry, interpolation="nearest").array

    @cached_property
    def initial_numbers(self) -> dict[str, float]:
        """NCC, MI, NMI and PMM mean of the fixed image and the moving image as it lies."""
        reference, initial = self.reference, self.initial
        with self.watch.step("evaluation: before registration"):
            moving = self._normalised_in_mask(initial.array)
            scores = similarity_scores(reference, moving)
            scores["pmm_mean"] = pmm_mean(self._pmm(moving), self.mask)
            return {f"{key}_initial": value for key, value in scores.items()}

    def numbers_before_beside(self) -> None:
        """Start computing the fixed image's side (its foreground, PMM bins and patches) and then `initial_numbers`
        and `initial_seg` on a thread (module docstring), unless they are known or under way; `wait_for_numbers_before`
        joins it. The worker starts it before the registration, whose steps leave a core idle (resampling, the affine
        stages, tto's refinement). The other steps wait for the fixed side where they need it (`_fixed_side`); a
        failure there is raised again where its results are asked for."""
        if self._beside is not None or "initial_numbers" in self.__dict__:
            return
        prepared = threading.Event()

        def numbers() -> None:
            try:
                with suppress(Exception):
                    self.reference.bins(PMM_BINS)  # both threads read them: prepared first (else each bins the image)
                    self.patches
            finally:
                prepared.set()
            with suppress(Exception):
                self.initial_numbers
                self.initial_seg

        self._prepared = prepared
        self._beside = threading.Thread(target=numbers, name="numbers before registration", daemon=True)
        self._beside.start()

    def _fixed_side(self) -> None:
        """Wait until the thread of `numbers_before_beside`, if one runs, has prepared the fixed image's side."""
        if self._prepared is not None and not self._prepared.is_set():
            with self.watch.step("evaluation: waiting for the fixed image's side"):
                self._prepared.wait()

    def wait_for_numbers_before(self) -> None:
        """Join the thread of `numbers_before_beside`, if one runs."""
        beside, self._beside = self._beside, None
        if beside is not None:
            with self.watch.step("evaluation: waiting for the numbers before registration"):
                beside.join()

    def _in_mask(self, warped: Volume) -> np.ndarray:
        """A registered image's normalised intensities inside the fixed foreground (`MaskedImage.of`),
        kept for the last image asked for (the maps and the metrics of one result share them)."""
        if self._last is None or self._last[0] is not warped.array:
            self._last = (warped.array, self._normalised_in_mask(warped.array))
        return self._last[1]

    def _normalised_in_mask(self, array: np.ndarray) -> np.ndarray:
        """``reference.of(normalise_intensity(array))``, the same numbers, with only the foreground's voxels scaled
        (the window still from the whole image)."""
        return scale_to_window(self.reference.of(array), *self.windows(array)[0]).astype(np.float64)

    def _pmm(self, moving: np.ndarray) -> np.ndarray:
        """`pmm_map` of the fixed image and a moving image whose values inside the foreground are ``moving``: its
        histograms and scores on the evaluation's GPU when it has one, else with numpy (`PatchGrid.pmm`)."""
        codes = joint_codes(self.reference.bins(PMM_BINS), quantise(moving, PMM_BINS), PMM_BINS)
        return self.patches.pmm(codes, PMM_BINS, device=None if str(self.device) == "cpu" else self.device)

    def check(self, result: Result, minimum_coverage: float = MIN_COVERAGE) -> None:
        """A result worth writing: a finite field and warped image that covers some of the fixed image's foreground.

        A diverged optimisation (too large a learning rate) or broken weights give NaN or infinite
        values; images that do not overlap after registration give an empty warped image. Both would
        otherwise be written and scored as if they were results.
        """
        self._fixed_side()
        for name, volume in (("displacement field", result.displacement), ("warped image", result.warped)):
            if not np.isfinite(volume.array).all():
                raise InputError(
                    f"the registration diverged: its {name} holds NaN or infinite values. Lower the learning rate "
                    "(option lr) or check the method's weights."
                )
        mask = self.mask
        covered = float(np.mean(result.warped.array[mask] != 0)) if mask.any() else 1.0
        if covered < minimum_coverage:
            raise InputError(
                f"after registration the moving image covers only {covered:.0%} of the fixed image's foreground: the images "
                "do not overlap. Check their origins and orientations, or try option affine=none; nothing was written."
            )

    def maps(self, result: Result, whole_jacobian: bool = False) -> Maps:
        """Jacobian-determinant maps of the result's field (the module docstring) and the PMM of (fixed, warped)
        inside the fixed foreground; ``whole_jacobian`` shows the whole mapping's det J instead."""
        self.numbers_before_beside()
        self._fixed_side()
        mask = self.mask
        with self.watch.step("evaluation: PMM"):
            pmm = self._pmm(self._in_mask(result.warped))
        with self.watch.step("evaluation: Jacobian"):
            whole = jacobian_determinant(result.displacement, self.device)
            separate = not whole_jacobian and result.affine is not None
            deformable = deformable_jacobian(whole, result.affine) if separate else whole
        part = DEFORMABLE_PART if separate else WHOLE_MAPPING
        return Maps(deformable, part, whole, self.inputs.fixed.with_array(pmm), mask)

    def metrics(self, result: Result, maps: Maps) -> dict[str, Any]:
        """Metrics of a result, with the same numbers before registration (moving resampled as it lies)."""
        inputs, mask = self.inputs, maps.mask
        self._fixed_side()
        with self.watch.step("evaluation: similarity"):
            metrics: dict[str, Any] = {
                **similarity_scores(self.reference, self._in_mask(result.warped)),
                "pmm_mean": pmm_mean(maps.pmm.array, mask),
                "folding_percent": folding_percent(maps.whole_jacobian.array),
                "sdlogj": sdlogj(maps.whole_jacobian.array),
                "jacobian_min": float(maps.whole_jacobian.array.min()),
                "jacobian_max": float(maps.whole_jacobian.array.max()),
            }
        self.wait_for_numbers_before()
        metrics.update(self.initial_numbers)
        if result.affine is not None:
            metrics["affine_volume_ratio"] = float(np.linalg.det(np.asarray(result.affine)[:3, :3]))
        if inputs.fixed_seg is not None and result.warped_seg is not None and inputs.moving_seg is not None:
            initial_seg = self.initial_seg
            with self.watch.step("evaluation: Dice and HD95"):
                metrics.update(label_metrics(inputs.fixed_seg, result.warped_seg.array, initial_seg, self.device, self.workers))
        with self.watch.step("evaluation: own segmentations"):
            for side, given, produced in (("fixed", inputs.fixed_seg, result.fixed_seg), ("moving", inputs.moving_seg, result.moving_seg)):
                if given is not None and produced is not None:
                    metrics[f"seg_dice_{side}"] = segmentation_dice(given, produced)
        return metrics


def check_result(inputs: Inputs, result: Result, minimum_coverage: float = MIN_COVERAGE) -> None:
    """`Evaluation.check` of one result."""
    Evaluation(inputs).check(result, minimum_coverage)


UNDEFINED = {
    "ncc": "the fixed or warped image is constant inside the fixed image's foreground (a mask given as an image?)",
    "ncc_initial": "the fixed or moving image is constant inside the fixed image's foreground (a mask given as an image?)",
    "nmi": "an image is constant inside the fixed image's foreground",
    "pmm_mean": "no 16-voxel patch holds enough of the fixed image's foreground",
    "pmm_mean_initial": "no 16-voxel patch holds enough of the fixed image's foreground",
}


def undefined_metrics(metrics: dict[str, Any]) -> dict[str, str]:
    """The similarity numbers that came out undefined (NaN, written as null), each with the reason."""
    return {key: why for key, why in UNDEFINED.items() if key in metrics and not np.isfinite(metrics[key])}


def quality_maps(
    fixed: Volume, warped: Volume, displacement: Volume, affine: np.ndarray | None = None, whole_jacobian: bool = False
) -> Maps:
    """`Evaluation.maps` of a field and warped image against ``fixed`` alone."""
    inputs = Inputs(fixed, fixed)
    return Evaluation(inputs).maps(Result(displacement, warped, affine), whole_jacobian)


def evaluate(inputs: Inputs, result: Result, maps: Maps) -> dict[str, Any]:
    """`Evaluation.metrics` of one result."""
    return Evaluation(inputs).metrics(result, maps)


def segmentation_dice(truth: Volume, predicted: Volume) -> float:
    """Mean Dice of a method's own segmentation against the given label map, on the given map's grid.

    Over the 30 standard structures the given map holds (FreeSurfer codes), else over all its
    labels; a structure the method does not produce counts as Dice 0. A tissue segmentation (codes
    701-703, e.g. jers') is scored against the given labels mapped to tissue classes (`tissue_of`).
    """
    if not predicted.geometry.same_as(truth.geometry):
        predicted = resample(predicted, truth.geometry, interpolation="nearest")
    if is_tissue_map(labels_in(predicted.array)):
        truth = truth.with_array(tissue_of(truth.array))
    present = sorted(set(labels_in(truth.array)) - {0})
    chosen = [label for label in present if label in EVALUATION_LABELS] or present
    dice = dice_per_label(truth.array, predicted.array, labels=chosen)
    return _mean([dice.get(label, 0.0) for label in chosen])


def label_metrics(
    fixed_seg: Volume, warped_seg: np.ndarray, initial_seg: np.ndarray, device: str = "cpu", workers: int = 1
) -> dict[str, Any]:
    """Dice (after and before) and HD95 per label shared by both label maps, and their means
    (``device`` and ``workers``: where the HD95 search runs and on how many CPU threads, `metrics.overlap.hd95_per_label`).

    The mean Dice is over the 30 standard evaluation structures (../shared/data/README.md) where the
    label maps use FreeSurfer codes and share any of them, otherwise over all shared labels. Against a fixed
    tissue map (codes 701-703: the shipped atlas, `labels.is_tissue_map`) the moving label maps are scored by
    their tissue classes (`labels.tissue_of`), as `segmentation_dice` scores a tissue segmentation.
    """
    fixed = fixed_seg.array
    fixed_labels, initial_labels = labels_in(fixed), labels_in(initial_seg)
    if is_tissue_map(fixed_labels) and not is_tissue_map(initial_labels):  # scored as tissue (`tissue_of`)
        warped_seg, initial_seg = tissue_of(warped_seg), tissue_of(initial_seg)
        initial_labels = labels_in(initial_seg)
    shared = sorted(set(fixed_labels) & set(initial_labels) - {0})
    dice = dice_per_label(fixed, warped_seg, labels=shared)
    dice_initial = dice_per_label(fixed, initial_seg, labels=shared)
    hd95 = hd95_per_label(fixed, warped_seg, fixed_seg.geometry.spacing, labels=shared, device=device, workers=workers)
    evaluation = [label for label in shared if label in EVALUATION_LABELS]
    chosen = evaluation or shared
    per_label = {
        str(label): {
            "name": label_info(label).name,
            "dice": dice.get(label, 0.0),
            "dice_initial": dice_initial.get(label, 0.0),
            "hd95": hd95.get(label, float("nan")),
        }
        for label in shared
    }
    return {
        "dice_mean": _mean([dice.get(label, 0.0) for label in chosen]),
        "dice_mean_initial": _mean([dice_initial.get(label, 0.0) for label in chosen]),
        "hd95_mean": _mean([hd95[label] for label in chosen if np.isfinite(hd95.get(label, np.nan))]),
        "dice_label_set": "evaluation-30" if evaluation else "shared",
        "dice_label_count": len(chosen),
        "dice_labels": chosen,
        "labels": per_label,
    }


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
