"""The scene-level work behind the page's overlay chooser, through the MRML scene's own API (slicer-core):
a checkerboard volume of two images, segmentations as outlines, a volume's colours, a segmentation's
names and colours, and which colour legends show where."""

from __future__ import annotations

import re
import textwrap
from typing import Any

import numpy as np
import vtk
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

from ..colour_scales import robust_window
from ..errors import InputError

CHECKERBOARD_TILES = 8
OUTLINE_THICKNESS = 2


def _voxels(node: Any) -> np.ndarray:
    """The voxels of a volume as an array in ``[k, j, i]`` order (VTK's memory order)."""
    image = node.GetImageData()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])


def _normalised(array: np.ndarray) -> np.ndarray:
    """Intensities scaled to [0, 1] over the robust window (1st to 99th percentile)."""
    low, high = robust_window(array)
    return np.clip((array.astype(np.float32) - low) / (high - low), 0.0, 1.0)


def add_checkerboard(
    scene: Any,
    first: Any,
    second: Any,
    name: str,
    tiles: int = CHECKERBOARD_TILES,
) -> Any:
    """Add a volume of alternating tiles of ``first`` and ``second`` (same grid), each scaled to [0, 1], on
    ``first``'s geometry (`report.slices.checkerboard`: ``tiles`` tiles per axis, ``first`` in the corner)."""
    from ..report.slices import checkerboard  # loads matplotlib: only when a checkerboard is asked for

    if first.GetImageData() is None or second.GetImageData() is None:
        raise InputError("a checkerboard needs two volumes with voxels.")
    a, b = _voxels(first), _voxels(second)
    if a.shape != b.shape:
        raise InputError(f"'{first.GetName()}' and '{second.GetName()}' lie on different grids; no checkerboard.")
    board = np.ascontiguousarray(checkerboard(_normalised(a), _normalised(b), tiles), dtype=np.float32)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    node.CopyOrientation(first)
    image = vtk.vtkImageData()
    image.SetDimensions(*board.shape[::-1])
    image.GetPointData().SetScalars(numpy_to_vtk(board.ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    node.SetDescription(f"Checkerboard: '{first.GetName()}' and '{second.GetName()}' in alternating tiles ({tiles} per axis).")
    return node


def set_colour_table(node: Any, colour_node_id: str) -> None:
    """Show a volume with another colour table (e.g. ``vtkMRMLColorTableNodeRed`` for an overlay)."""
    node.GetDisplayNode().SetAndObserveColorNodeID(colour_node_id)


def show_outlines(scene: Any, visible_ids: list[str], all_ids: list[str]) -> None:
    """Show the segmentations ``visible_ids`` as outlines (no fill) in the slice views; hide the other ``all_ids``."""
    for node_id in all_ids:
        node = scene.GetNodeByID(node_id)
        display = node.GetDisplayNode() if node is not None else None
        if display is None:
            continue
        shown = node_id in visible_ids
        display.SetVisibility(shown)
        display.SetVisibility2DFill(False)
        display.SetVisibility2DOutline(True)
        display.SetSliceIntersectionThickness(OUTLINE_THICKNESS)
        display.SetVisibility3D(False)


def segment_legend(node: Any) -> list[tuple[str, tuple[float, float, float]]]:
    """``(name, rgb)`` of each segment of a segmentation, in label order where segments carry label values."""
    segmentation = node.GetSegmentation()
    segments = [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]
    segments.sort(key=lambda s: s.GetLabelValue())
    return [(s.GetName(), tuple(float(c) for c in s.GetColor())) for s in segments]


def place_legends(
    scene: Any, view_node_ids: list[str], position: tuple[float, float], size: tuple[float, float], title_width: int
) -> None:
    """Put every colour legend in the views ``view_node_ids`` only, at ``position`` with ``size`` (view fractions),
    its title wrapped into lines of at most ``title_width`` characters (a long title would run off the view)."""
    for legend in nodes_of_class(scene, "vtkMRMLColorLegendDisplayNode"):
        legend.SetViewNodeIDs(view_node_ids)
        legend.SetPosition(*position)
        legend.SetSize(*size)
        legend.SetTitleText(wrap_title(legend.GetTitleText(), title_width))


def wrap_title(title: str, width: int) -> str:
    """``title`` in lines of at most ``width`` characters, broken after commas where it can be, else between words."""
    lines: list[str] = []
    for clause in re.split(r"(?<=,)\s+", " ".join(title.split())):
        if lines and len(lines[-1]) + 1 + len(clause) <= width:
            lines[-1] += " " + clause
        else:
            lines += textwrap.wrap(clause, width) or [clause]
    return "\n".join(lines)


def show_legends(scene: Any, volume_ids: list[str]) -> None:
    """Show the colour legends of ``volume_ids`` only (a legend of another map would be misread as this one's)."""
    for legend in nodes_of_class(scene, "vtkMRMLColorLegendDisplayNode"):
        owner = legend.GetDisplayableNode()
        legend.SetVisibility(owner is not None and owner.GetID() in volume_ids)


def nodes_of_class(scene: Any, class_name: str) -> list[Any]:
    nodes = scene.GetNodesByClass(class_name)
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
