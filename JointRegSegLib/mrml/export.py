"""Write a user's nodes to files for the worker, without touching the nodes.

Volumes are written in world coordinates: a parent transform is hardened on a temporary copy
(sharing the voxels; hardening a linear transform changes only the copy's geometry, a non-linear
one resamples into new voxels), never on the user's node. Storage nodes made here are not added
to the scene, so the user's own storage node (file name, format) stays as it was.

Segmentations become label maps through a colour table made here from the segment names
(`JointRegSegLib.labels.codes_for_names`: FreeSurfer names keep their FreeSurfer codes), so two
segmentations made separately get the same code for the same structure, and the user's colour
node is never used (Slicer adds entries to the table it is given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import slicer
import vtk

from ..errors import InputError
from ..labels import codes_for_names


def write_volume(scene: slicer.vtkMRMLScene, node: slicer.vtkMRMLVolumeNode, path: Path) -> Path:
    """Write ``node`` (scalar or label map volume) to ``path`` in world coordinates, compressed where ``path`` ends
    in ``.gz``."""
    if node.GetImageData() is None:
        raise InputError(f"'{node.GetName()}' has no voxels; load or select another volume.")
    copy = None
    source = node
    if node.GetParentTransformNode() is not None:
        copy = scene.AddNewNodeByClass(node.GetClassName(), scene.GenerateUniqueName("JointRegSeg export"))
        copy.CopyOrientation(node)
        copy.SetAndObserveImageData(node.GetImageData())
        copy.SetAndObserveTransformNodeID(node.GetParentTransformNode().GetID())
        slicer.vtkSlicerTransformLogic.hardenTransform(copy)
        source = copy
    try:
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(path.name.endswith(".gz"))
        if not storage.WriteData(source):
            raise InputError(f"could not write '{node.GetName()}' to {path}; check the folder's free space and permissions.")
    finally:
        if copy is not None:
            scene.RemoveNode(copy)
    return path


def segment_names(node: slicer.vtkMRMLSegmentationNode) -> list[str]:
    """The names of a segmentation node's segments, in segment order."""
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def write_labels(
    scene: slicer.vtkMRMLScene,
    node: slicer.vtkMRMLNode,
    reference: slicer.vtkMRMLVolumeNode,
    path: Path,
    codes: Optional[dict[str, int]] = None,
) -> Path:
    """Write a label map volume as it is, or a segmentation as a label map on ``reference``'s grid with
    ``codes`` (segment name -> label code; default: `codes_for_names` of its own segments)."""
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return write_volume(scene, node, path)
    names = segment_names(node)
    if not names:
        raise InputError(f"the segmentation '{node.GetName()}' has no segments; select another or add segments.")
    codes = codes_for_names(names) if codes is None else codes
    _check_distinct(node, names, codes)
    table = _segment_table(scene, names, codes)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("JointRegSeg export"))
    try:
        ids = vtk.vtkStringArray()
        node.GetSegmentation().GetSegmentIDs(ids)
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            node, ids, labelmap, reference, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, table
        )
        if not exported:
            raise InputError(f"Slicer could not turn '{node.GetName()}' into a label map on the grid of '{reference.GetName()}'.")
        return write_volume(scene, labelmap, path)
    finally:
        _remove_with_display(scene, labelmap)
        if table.GetScene() is not None:
            scene.RemoveNode(table)


def _check_distinct(node: slicer.vtkMRMLNode, names: list[str], codes: dict[str, int]) -> None:
    seen: dict[int, str] = {}
    for name in names:
        code = codes[name]
        if code in seen and seen[code] != name:
            raise InputError(
                f"segments '{seen[code]}' and '{name}' of '{node.GetName()}' both stand for label {code}; "
                "merge them or rename one."
            )
        seen[code] = name


def _segment_table(scene: slicer.vtkMRMLScene, names: list[str], codes: dict[str, int]) -> slicer.vtkMRMLColorTableNode:
    """A temporary colour table whose entry ``codes[name]`` is called ``name`` (how Slicer picks label values)."""
    table = slicer.vtkMRMLColorTableNode()
    table.SetTypeToUser()
    table.SetName(scene.GenerateUniqueName("JointRegSeg export codes"))
    table.SetNumberOfColors(max(codes[name] for name in names) + 1)
    table.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
    for name in names:
        table.SetColor(codes[name], name, 0.5, 0.5, 0.5, 1.0)
    scene.AddNode(table)
    return table


def _remove_with_display(scene: slicer.vtkMRMLScene, node: slicer.vtkMRMLDisplayableNode) -> None:
    """Remove a temporary label map with its display node and the colour table Slicer made for it."""
    display = node.GetDisplayNode()
    colours = display.GetColorNode() if display is not None else None
    scene.RemoveNode(node)
    if display is not None and display.GetScene() is not None:
        scene.RemoveNode(display)
    if colours is not None and colours.GetScene() is not None and colours.GetType() == slicer.vtkMRMLColorNode.User:
        scene.RemoveNode(colours)
