"""What the page's Slicer views show: the overlay a viewer chose, its legend, and orientation labels.

Every slice view shows the fixed image (or the atlas) as background; the overlay chooser puts one
of these over it (`OVERLAYS`): the moving image before registration or the warped image (in red
over the grey fixed image), a checkerboard of fixed and warped, the Jacobian determinant or the
PMM map with their colour legends, or the run's segmentations as outlines with their names.
`apply_overlay` sets the scene for a choice (through `JointRegSegLib.mrml` and `scene`) and returns the legend
the page draws beside the views. `annotate_slice_view` writes the view's name and the patient
directions (R/L, A/P, S/I, read off the slice node's orientation) on the edges of a view.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from ..colour_scales import (
    JACOBIAN_FOLDING_RGB,
    JACOBIAN_FOLDING_TEXT,
    JACOBIAN_LEGEND,
    JACOBIAN_RANGE,
    jacobian_control_points,
    jacobian_title,
    pmm_control_points,
)

BEFORE, WARPED, CHECKERBOARD, JACOBIAN, PMM, OUTLINES = (
    "Moving image (before registration)",
    "Warped image",
    "Checkerboard fixed / warped",
    "Jacobian determinant",
    "PMM (local alignment)",
    "Segmentation outlines",
)
OVERLAYS = (BEFORE, WARPED, CHECKERBOARD, JACOBIAN, PMM, OUTLINES)
RESULT_OVERLAYS = frozenset({WARPED, CHECKERBOARD, JACOBIAN, PMM, OUTLINES})
OVERLAY_COLOURS = "vtkMRMLColorTableNodeRed"
DIRECTIONS = (("R", "L"), ("A", "P"), ("S", "I"))
"""The letter of the +/- direction of each RAS axis."""
LABEL_FONT_SIZE = 22
LABEL_COLOUR = (1.0, 0.85, 0.2)
LEGEND_POSITION, LEGEND_SIZE, LEGEND_TITLE_WIDTH = (0.04, 0.45), (0.2, 0.7), 24
"""Colour legends stand in the 3D view, at its left edge (the slice views keep their anatomy and labels clear)."""


@dataclass
class Legend:
    """What the page draws beside the views for an overlay: a title, a CSS gradient with tick labels,
    swatches with names, and a sentence saying how to read it."""

    title: str = ""
    gradient: str = ""
    ticks: list[str] = field(default_factory=list)
    swatches: list[dict[str, str]] = field(default_factory=list)
    text: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def css_colour(rgb: tuple[float, ...]) -> str:
    return "rgb({}, {}, {})".format(*(int(round(255 * float(c))) for c in rgb[:3]))


def css_gradient(points: list[tuple[float, float, float, float]], low: float, high: float) -> str:
    """A left-to-right CSS gradient through ``(value, r, g, b)`` control points placed over [``low``, ``high``]."""
    stops = [f"{css_colour(p[1:])} {100 * (p[0] - low) / (high - low):.1f}%" for p in points]
    return f"linear-gradient(to right, {', '.join(stops)})"


def jacobian_legend(part: str) -> Legend:
    low, high = JACOBIAN_RANGE
    return Legend(
        title=jacobian_title(part),
        gradient=css_gradient(jacobian_control_points(), low, high),
        ticks=["0", "0.5", "1", "1.5", ">= 2"],
        swatches=[{"name": JACOBIAN_FOLDING_TEXT, "colour": css_colour(JACOBIAN_FOLDING_RGB)}],
        text=". ".join(text for _, text in JACOBIAN_LEGEND) + ".",
    )


def pmm_legend(window: tuple[float, float]) -> Legend:
    low, high = window
    return Legend(
        title="PMM: patch-wise normalised mutual information of fixed and warped",
        gradient=css_gradient(pmm_control_points(), 0.0, 1.0),
        ticks=[f"{v:.2f}" for v in np.linspace(low, high, 5)],
        text="Higher (yellow) = better local alignment; one scale for every run.",
    )


BEFORE_LEGEND = Legend(title="Before registration", text="Grey: the fixed image. Red: the moving image as it lies.")
WARPED_LEGEND = Legend(title="Warped image", text="Grey: the fixed image. Red: the moving image warped onto it; where they agree, edges coincide.")
CHECKERBOARD_LEGEND = Legend(
    title="Checkerboard: fixed and warped in alternating tiles",
    text="Edges that run on straight across the tile borders are well aligned; steps at the borders are not.",
)


def apply_overlay(scene: Any, app_logic: Any, run: Any, choice: str, opacity: float, cache: dict[str, str]) -> Legend:
    """Show ``choice`` for ``run`` (a finished `app.Run` with loaded results) in every slice view; returns its legend.

    ``cache`` keeps the checkerboard volumes made so far (run output folder -> node id). With
    ``app_logic`` the slice views are also fitted to the background.
    """
    from .. import mrml
    from . import scene as nodes

    loaded, background = run.loaded, run.background_id
    if choice == BEFORE:
        show_before(scene, app_logic, background, run.moving_id, opacity)
        return BEFORE_LEGEND
    shown_segmentations = [loaded.segmentations[k] for k in ("warped_seg", "fixed_seg") if k in loaded.segmentations] if choice == OUTLINES else []
    _hide_all_but(scene, shown_segmentations, {JACOBIAN: loaded.jacobian, PMM: loaded.pmm}.get(choice))
    if choice == CHECKERBOARD:
        board = cache.get(loaded.output)
        if board is None or scene.GetNodeByID(board) is None:
            fixed, warped = scene.GetNodeByID(background), scene.GetNodeByID(loaded.warped)
            board = cache[loaded.output] = nodes.add_checkerboard(scene, fixed, warped, f"{run.name_prefix} checkerboard").GetID()
        mrml.show_in_slice_views(scene, board, None, 0.0, app_logic)
        return CHECKERBOARD_LEGEND
    if choice == OUTLINES:
        mrml.show_in_slice_views(scene, background, None, 0.0, app_logic)
        swatches = [
            {"name": name, "colour": css_colour(rgb)}
            for node_id in shown_segmentations
            for name, rgb in nodes.segment_legend(scene.GetNodeByID(node_id))
        ]
        if not swatches:
            return Legend(title="Segmentation outlines", text="This run made no segmentation on the fixed image; give label maps to see the warped one.")
        return Legend(title="Segmentation outlines over the fixed image", swatches=swatches, text="Outlines of the warped label map (and the method's own segmentation).")
    foreground = {WARPED: loaded.warped, JACOBIAN: loaded.jacobian, PMM: loaded.pmm}.get(choice) or loaded.warped
    mrml.show_in_slice_views(scene, background, foreground, opacity, app_logic)
    if choice == JACOBIAN and loaded.jacobian:
        return jacobian_legend(loaded.jacobian_part)
    if choice == PMM and loaded.pmm:
        display = scene.GetNodeByID(loaded.pmm).GetDisplayNode()
        return pmm_legend((display.GetWindowLevelMin(), display.GetWindowLevelMax()))
    return WARPED_LEGEND


def show_before(scene: Any, app_logic: Any, fixed_id: Optional[str], moving_id: Optional[str], opacity: float) -> None:
    """The inputs before any registration: the fixed image with the moving image over it."""
    from .. import mrml

    _hide_all_but(scene, [], None)
    mrml.show_in_slice_views(scene, fixed_id or moving_id, moving_id if fixed_id else None, opacity, app_logic)


def _hide_all_but(scene: Any, segmentation_ids: list[str], legend_volume_id: Optional[str]) -> None:
    """Outline only ``segmentation_ids``; show only ``legend_volume_id``'s colour legend."""
    from . import scene as nodes

    every = [node.GetID() for node in nodes.nodes_of_class(scene, "vtkMRMLSegmentationNode")]
    nodes.show_outlines(scene, segmentation_ids, every)
    nodes.show_legends(scene, [legend_volume_id] if legend_volume_id else [])


# Orientation labels


def edge_letters(slice_to_ras: np.ndarray) -> dict[str, str]:
    """The patient direction at the left, right, top and bottom edge of a slice view.

    Columns 0 and 1 of the 4x4 SliceToRAS matrix are the RAS directions of the screen's +x (right)
    and +y (up); each edge is labelled with the RAS axis that direction is closest to.
    """
    matrix = np.asarray(slice_to_ras, dtype=np.float64)

    def letter(vector: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return DIRECTIONS[axis][0 if vector[axis] > 0 else 1]

    right, up = matrix[:3, 0], matrix[:3, 1]
    return {"left": letter(-right), "right": letter(right), "top": letter(up), "bottom": letter(-up)}


def annotate_slice_view(view: Any, title: str) -> None:
    """Write ``title`` in the top-right corner and the patient directions on the edges of a trame-slicer slice
    view; the letters follow the slice node when it is rotated."""
    import vtk

    renderer = view.first_renderer()
    actors: dict[str, Any] = {}
    # edge: (x, y) in the view, horizontal justification (0 left, 1 centre, 2 right), vertical (0 bottom, 1 centre, 2 top)
    positions = {"left": (0.012, 0.5, 0, 1), "right": (0.988, 0.5, 2, 1), "top": (0.5, 0.985, 1, 2), "bottom": (0.5, 0.07, 1, 0)}
    for edge, (x, y, justify, vertical) in positions.items():
        actor = vtk.vtkTextActor()
        actor.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
        actor.GetPositionCoordinate().SetValue(x, y)
        text = actor.GetTextProperty()
        text.SetFontSize(LABEL_FONT_SIZE)
        text.SetBold(True)
        text.SetColor(*LABEL_COLOUR)
        text.SetShadow(True)
        text.SetJustification(justify)
        text.SetVerticalJustification(vertical)
        renderer.AddActor2D(actor)
        actors[edge] = actor
    corner = vtk.vtkCornerAnnotation()
    corner.SetText(3, title)
    corner.GetTextProperty().SetColor(1.0, 1.0, 1.0)
    corner.GetTextProperty().SetShadow(True)
    corner.SetMaximumFontSize(LABEL_FONT_SIZE)
    corner.SetLinearFontScaleFactor(4)
    renderer.AddViewProp(corner)
    node = view.get_view_node()

    def update(*_: Any) -> None:
        matrix = node.GetSliceToRAS()
        letters = edge_letters(np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]))
        for edge, actor in actors.items():
            actor.SetInput(letters[edge])

    node.AddObserver(vtk.vtkCommand.ModifiedEvent, update)
    update()
