"""A run's PNG pictures: what they show, cut from the run's volumes (`report.rows`), and their drawing
(`report.figures`, matplotlib), which the run hands to a child process (`beside.ForkedChild`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..evaluation import Evaluation, Maps
    from ..imageio.geometry import Volume
    from ..methods.base import Inputs, Result
    from ..report.rows import Picture

FOLDER = "pictures"


def warm_up() -> None:
    """Import what drawing needs (matplotlib, about half a second), ahead of the work (`beside.ForkedChild`)."""
    from ..report import figures  # noqa: F401


def picture_plan(evaluation: Evaluation, result: Result, maps: Maps | None, method: str) -> dict[str, Picture]:
    """The run's pictures as slices (`report.rows.individual_pictures`): the images, checkerboard and maps on the
    fixed grid, and the outlines of `segmentation_pictures`."""
    from ..report.rows import Windows, individual_pictures

    inputs = evaluation.inputs
    windows = Windows()
    for image in (inputs.fixed, evaluation.initial, result.warped):  # partitioned once for the metrics and the pictures
        windows.remember(image.array, evaluation.windows(image.array)[1])
    return individual_pictures(
        inputs.fixed, evaluation.initial, result.warped,
        maps.jacobian if maps is not None else None, maps.pmm if maps is not None else None,
        jacobian_part=maps.jacobian_part if maps is not None else "whole mapping",
        segmentations=segmentation_pictures(inputs, result, method), mask=maps.mask if maps is not None else None,
        windows=windows,
    )


def draw(folder: Path, pictures: dict[str, Picture]) -> dict[str, str]:
    """Draw ``pictures`` into ``folder/pictures``; returns {``picture_<name>``: path relative to ``folder``}."""
    from ..report.figures import draw_pictures

    written = draw_pictures(pictures, Path(folder) / FOLDER)
    return {f"picture_{name}": str(Path(FOLDER) / path.name) for name, path in written.items()}


def segmentation_pictures(inputs: Inputs, result: Result, method: str) -> dict[str, tuple[Volume, Volume, str, dict[int, str] | None]]:
    """Outline pictures: the warped label map over the fixed image, and the method's own segmentations
    (and brain mask, its label 1 named "brain") over the image each lies on."""
    candidates: dict[str, tuple[Any, Any, str, dict[int, str] | None]] = {
        "warped_seg": (inputs.fixed, result.warped_seg, "warped moving labels over fixed", None),
        "fixed_seg": (inputs.fixed, result.fixed_seg, f"{method}'s segmentation of fixed", None),
        "moving_seg": (inputs.moving, result.moving_seg, f"{method}'s segmentation of moving", None),
        "brain_mask": (inputs.moving, result.brain_mask, f"{method}'s brain mask over moving", {1: "brain"}),
    }
    return {name: entry for name, entry in candidates.items() if entry[1] is not None}
