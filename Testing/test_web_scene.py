"""The scene work behind the web page's overlay chooser (`JointRegSegLib.web.scene`), on slicer-core's scene.

The checkerboard volume is `report.slices.checkerboard` of the two images (each scaled to [0, 1]
over its robust window) on the first image's geometry; outlines show only the chosen
segmentations, without fill; legends show only in the views given.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (trame-slicer[standalone]) is not installed")

import vtk  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

from JointRegSegLib import mrml  # noqa: E402
from JointRegSegLib.colour_scales import robust_window  # noqa: E402
from JointRegSegLib.mrml.core import core_scene  # noqa: E402
from JointRegSegLib.report.slices import checkerboard  # noqa: E402
from JointRegSegLib.web import scene as nodes  # noqa: E402


def _array(node) -> np.ndarray:
    image = node.GetImageData()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1]).astype(np.float64)


def _matrix(node) -> list[float]:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return [matrix.GetElement(r, c) for r in range(4) for c in range(4)]


def test_checkerboard_volume_is_the_reports_checkerboard_on_the_fixed_grid(sample_pair):
    core = core_scene()
    fixed = mrml.read_volume(core.scene, sample_pair["fixed"], "fixed")
    moving = mrml.read_volume(core.scene, sample_pair["moving"], "moving")
    board = nodes.add_checkerboard(core.scene, fixed, moving, "board", tiles=4)
    scaled = []
    for node in (fixed, moving):
        low, high = robust_window(_array(node))
        scaled.append(np.clip((_array(node) - low) / (high - low), 0, 1))
    np.testing.assert_allclose(_array(board), checkerboard(scaled[0], scaled[1], 4), atol=1e-6)
    assert _matrix(board) == _matrix(fixed)
    assert board.GetDisplayNode().GetWindowLevelMin() == 0.0 and board.GetDisplayNode().GetWindowLevelMax() == 1.0


def test_outlines_and_legends_show_only_what_was_chosen(sample_pair, tmp_path):
    core = core_scene()
    fixed = mrml.read_volume(core.scene, sample_pair["fixed"], "fixed")
    segmentations = []
    for key in ("fixed_seg", "moving_seg"):
        labels = mrml.read_volume(core.scene, sample_pair[key], key, labels=True)
        segmentation = core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", key)
        segmentation.CreateDefaultDisplayNodes()
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, segmentation)
        segmentations.append(segmentation)
    ids = [s.GetID() for s in segmentations]
    nodes.show_outlines(core.scene, ids[:1], ids)
    shown, hidden = (s.GetDisplayNode() for s in segmentations)
    assert shown.GetVisibility() and shown.GetVisibility2DOutline() and not shown.GetVisibility2DFill()
    assert not hidden.GetVisibility()
    names = [name for name, _ in nodes.segment_legend(segmentations[0])]
    assert len(names) == segmentations[0].GetSegmentation().GetNumberOfSegments() > 1

    table = mrml.add_jacobian_table(core.scene)
    fixed.GetDisplayNode().SetAndObserveColorNodeID(table.GetID())
    legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(fixed)
    legend.SetTitleText("det J  <1 stretched, >1 shrunk, green: folding")
    nodes.place_legends(core.scene, ["vtkMRMLViewNode1"], (0.1, 0.5), (0.2, 0.7), 24)
    assert legend.GetViewNodeIDs() == ("vtkMRMLViewNode1",) and legend.GetPosition() == (0.1, 0.5)
    assert legend.GetTitleText() == "det J <1 stretched,\n>1 shrunk,\ngreen: folding"
    assert nodes.wrap_title("PMM patch NMI (higher: better)", 24) == "PMM patch NMI (higher:\nbetter)"
    nodes.show_legends(core.scene, [])
    assert not legend.GetVisibility()
    nodes.show_legends(core.scene, [fixed.GetID()])
    assert legend.GetVisibility()


def test_metrics_view_of_a_comparison_table():
    """The page's table: the columns of slicer-core's metrics table node in order (one per method), per-structure
    rows marked for the 'on request' view, unmeasured numbers as a dash."""
    from JointRegSegLib.web.results import metrics_view, number_text

    core = core_scene()
    first = {"ncc": 0.7, "ncc_initial": 0.5, "dice_mean": 0.61, "dice_mean_initial": 0.3, "time_register_s": 146.92,
             "labels": {"17": {"name": "Left-Hippocampus", "dice": 0.5, "dice_initial": 0.2, "hd95": 3.0}}}
    second = {"ncc": 0.8, "ncc_initial": 0.5}
    view = metrics_view(mrml.table_as_dict(mrml.add_metrics_table(core.scene, {"tto": first, "segreg": second}, "t")))
    assert view["columns"] == ["Metric", "Before", "tto", "segreg"]
    rows = {row["title"]: row for row in view["rows"]}
    assert rows["NCC"]["values"] == ["0.500", "0.700", "0.800"] and rows["NCC"]["main"]
    assert rows["Dice mean"]["values"] == ["0.300", "0.610", "–"]
    assert rows["Time register (s)"]["values"] == ["–", "147", "–"] and rows["Time register (s)"]["main"]
    assert not rows["Dice Left-Hippocampus"]["main"] and rows["Dice Left-Hippocampus"]["values"][1] == "0.500"
    assert [number_text(v) for v in (0.12345, 12.345, 123.45, float("nan"), None)] == ["0.123", "12.35", "123", "–", "–"]
