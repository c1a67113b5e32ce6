"""Put a finished worker output folder into an MRML scene (Slicer's ``slicer.mrmlScene`` or slicer-core's).

Everything is added as new nodes; nodes that were in the scene before are only referenced, never
modified or removed (the optional ``apply_to_moving`` is the one exception, and is off by default).
Files are read through Slicer's own storage nodes, so the scene shows exactly what Slicer would load
from the same files, and the nodes keep pointing at them (scene saving copies them as usual).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
from vtk.util.numpy_support import vtk_to_numpy

from ..errors import InputError
from ..colour_scales import DEFORMABLE_PART, PMM_RANGE, jacobian_title
from .colors import JACOBIAN_WINDOW, add_jacobian_table, add_label_table, add_pmm_table
from .table import add_metrics_table

MANIFEST = "result.json"
KIND_ATTRIBUTE = "JointRegSeg.kind"
OUTPUT_ATTRIBUTE = "JointRegSeg.output"
FIXED_ROLE = "fixedVolume"
MOVING_ROLE = "movingVolume"
SEGMENTATION_KINDS: dict[str, str] = {
    "fixed_seg": "fixed segmentation",
    "moving_seg": "moving segmentation",
    "warped_seg": "warped segmentation",
    "brain_mask": "brain mask",
}
MOVING_GRID_KINDS = frozenset({"moving_seg", "brain_mask"})
"""Label maps that lie on the moving image's grid (the others lie on the fixed image's)."""
JACOBIAN_MEANING = (
    "< 1 (blue) = the moving image was locally stretched to fit, 1 (white) = no local change of volume, > 1 (red) = "
    "locally shrunk to fit, <= 0 (green) = folding (the transform is not invertible there)."
)


def jacobian_meaning(part: str) -> str:
    """The Jacobian node's description: what its det J is of (`colour_scales.jacobian_title`) and what its colours mean."""
    return f"{jacobian_title(part)}: {JACOBIAN_MEANING}"


PMM_MEANING = (
    "Patch-wise normalised mutual information of fixed and warped (0 to 1, shown over 0 to 0.5 for every run): "
    "higher = better local alignment."
)


@dataclass
class LoadedResult:
    """IDs of the nodes `load_result` added (None / absent where the output had no such file)."""

    output: str
    method: str
    transform: str
    affine: str | None = None
    warped: str | None = None
    extracted: str | None = None
    jacobian: str | None = None
    pmm: str | None = None
    segmentations: dict[str, str] = field(default_factory=dict)
    table: str | None = None
    color_tables: dict[str, str] = field(default_factory=dict)
    folder_item: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    jacobian_part: str = DEFORMABLE_PART  # what the Jacobian map is of (`colour_scales.jacobian_title`)

    def node_ids(self) -> list[str]:
        """Every node ID added (data, colour tables, table)."""
        ids = [self.transform, self.affine, self.warped, self.extracted, self.jacobian, self.pmm, self.table]
        return [i for i in ids if i] + list(self.segmentations.values()) + list(self.color_tables.values())


def read_manifest(output_folder: str | Path) -> dict[str, Path]:
    """``{kind: absolute path}`` from an output folder's result.json, checking the files exist."""
    folder = Path(output_folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise InputError(f"{folder} is not a finished JointRegSeg output folder: {MANIFEST} is missing. Run the registration again.")
    try:
        files = json.loads(manifest.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{manifest} is not valid JSON ({error.msg}); run the registration again.") from error
    paths = {kind: folder / name for kind, name in files.items()}
    for kind in ("displacement",):
        if kind not in paths:
            raise InputError(f"{manifest} names no '{kind}' file; run the registration again.")
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise InputError(f"files listed in {manifest} are missing: {', '.join(missing)}. Run the registration again.")
    return paths


def load_result(
    scene: slicer.vtkMRMLScene,
    output_folder: str | Path,
    fixed_node: slicer.vtkMRMLScalarVolumeNode | None = None,
    moving_node: slicer.vtkMRMLScalarVolumeNode | None = None,
    name_prefix: str | None = None,
    apply_to_moving: bool = False,
    metrics_table: bool = True,
) -> LoadedResult:
    """Add a worker output folder's results to ``scene`` and return the new nodes' IDs.

    Adds: the warped volume (grey over the moving volume's window, so the two look alike); the transform (a grid transform read from displacement.nii.gz, with
    node references ``fixedVolume``/``movingVolume`` to the given nodes) and, where the method has
    one, its affine part alone (a linear transform from affine.tfm); the Jacobian and PMM maps
    with their colour tables and colour legends; a segmentation node per label map, named and
    coloured from the FreeSurfer lookup table, with the fixed volume (or, without one, the warped
    volume, which lies on the fixed grid) as reference geometry, or the moving volume for the
    label maps on the moving grid (the moving image's own segmentation, the brain mask); the
    skull-stripped image where the method gives one; a metrics table. All go in one
    subject-hierarchy folder next to the fixed volume (in its study, where it has one).
    ``apply_to_moving`` also sets the transform as the moving volume's parent transform.
    """
    paths = read_manifest(output_folder)
    metrics = _read_json(paths.get("metrics"))
    provenance = _read_json(paths.get("provenance"))
    method = str(provenance.get("method", "result"))
    prefix = name_prefix if name_prefix is not None else f"JointRegSeg {method}"
    folder = str(Path(output_folder).resolve())
    added: list[slicer.vtkMRMLNode] = []

    def tag(node: slicer.vtkMRMLNode, kind: str) -> slicer.vtkMRMLNode:
        node.SetAttribute(KIND_ATTRIBUTE, kind)
        node.SetAttribute(OUTPUT_ATTRIBUTE, folder)
        added.append(node)
        return node

    try:
        transform = tag(_read_transform(scene, paths["displacement"], f"{prefix} transform"), "transform")
        if fixed_node is not None:
            transform.SetNodeReferenceID(FIXED_ROLE, fixed_node.GetID())
        if moving_node is not None:
            transform.SetNodeReferenceID(MOVING_ROLE, moving_node.GetID())
        result = LoadedResult(output=folder, method=method, transform=transform.GetID(), metrics=metrics)
        if "affine" in paths:
            affine = tag(_read_transform(scene, paths["affine"], f"{prefix} affine part", linear=True), "affine")
            affine.SetDescription("Affine part alone (the transform above already includes it), fixed -> moving (ITK convention).")
            result.affine = affine.GetID()

        if "warped" in paths:
            warped = tag(read_volume(scene, paths["warped"], f"{prefix} warped", window=_window_of(moving_node)), "warped")
            result.warped = warped.GetID()
        if "extracted" in paths:
            extracted = tag(read_volume(scene, paths["extracted"], f"{prefix} extracted brain"), "extracted")
            extracted.SetDescription("The moving image with everything outside the brain mask set to 0 (moving image's grid).")
            result.extracted = extracted.GetID()
        if "jacobian" in paths:
            colours = tag(add_jacobian_table(scene, f"{prefix} Jacobian colours"), "jacobian_colors")
            jacobian = tag(read_volume(scene, paths["jacobian"], f"{prefix} Jacobian", window=JACOBIAN_WINDOW), "jacobian")
            result.jacobian_part = str(provenance.get("jacobian_part", DEFORMABLE_PART))
            title = f"det J ({result.jacobian_part})"  # a legend title is one short line; the node's description says more
            _show_map(jacobian, colours, title, jacobian_meaning(result.jacobian_part))
            result.jacobian, result.color_tables["jacobian"] = jacobian.GetID(), colours.GetID()
        if "pmm" in paths:
            colours = tag(add_pmm_table(scene, f"{prefix} PMM colours"), "pmm_colors")
            pmm = tag(read_volume(scene, paths["pmm"], f"{prefix} PMM", window=PMM_RANGE), "pmm")
            _show_map(pmm, colours, "PMM patch NMI (higher: better)", PMM_MEANING)
            result.pmm, result.color_tables["pmm"] = pmm.GetID(), colours.GetID()

        on_fixed = fixed_node if fixed_node is not None else scene.GetNodeByID(result.warped) if result.warped else None
        for kind, title in SEGMENTATION_KINDS.items():
            if kind in paths:
                reference = moving_node if kind in MOVING_GRID_KINDS else on_fixed
                segmentation, colours = _read_segmentation(scene, paths[kind], f"{prefix} {title}", reference, kind)
                tag(colours, f"{kind}_colors")
                tag(segmentation, kind)
                result.segmentations[kind] = segmentation.GetID()
                result.color_tables[kind] = colours.GetID()

        if metrics_table and metrics:
            table = tag(add_metrics_table(scene, {method: metrics}, f"{prefix} metrics"), "metrics")
            result.table = table.GetID()

        result.folder_item = _place_in_hierarchy(scene, added, fixed_node, prefix)
        if apply_to_moving and moving_node is not None:
            moving_node.SetAndObserveTransformNodeID(transform.GetID())
        return result
    except BaseException:
        for node in added:
            remove_node(scene, node)
        raise


def _read_json(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path} cannot be read as JSON ({error}); run the registration again.") from error
    return data if isinstance(data, dict) else {}


def _read_transform(
    scene: slicer.vtkMRMLScene, path: Path, name: str, linear: bool = False
) -> slicer.vtkMRMLTransformNode:
    """A transform read by a transform storage node: a grid transform from an ITK displacement-field
    image, or (``linear``) a linear transform from an ITK transform file."""
    node = slicer.vtkMRMLLinearTransformNode() if linear else slicer.vtkMRMLGridTransformNode()
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    storage = slicer.vtkMRMLTransformStorageNode()
    storage.SetFileName(str(path))
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        remove_node(scene, node)
        raise InputError(f"Slicer could not read the transform {path}; run the registration again.")
    node.SetDescription("Whole mapping (affine and deformable) from the fixed image to the moving image (ITK convention).")
    return node


def read_volume(
    scene: slicer.vtkMRMLScene, path: Path, name: str, labels: bool = False, window: tuple[float, float] | None = None
) -> slicer.vtkMRMLScalarVolumeNode:
    """Add a scalar (or label map) volume read by a volume archetype storage node, with a display node: grey over
    ``window`` (min, max) where given, else over the window Slicer computes from the voxels (0.1 s for a 1 mm head)."""
    node = slicer.vtkMRMLLabelMapVolumeNode() if labels else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        remove_node(scene, node)
        raise InputError(f"Slicer could not read {path}; run the registration again.")
    display = slicer.vtkMRMLLabelMapVolumeDisplayNode() if labels else slicer.vtkMRMLScalarVolumeDisplayNode()
    scene.AddNode(display)
    if not labels:
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        if window is None:
            display.AutoWindowLevelOn()
        else:
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(float(window[0]), float(window[1]))
    node.SetAndObserveDisplayNodeID(display.GetID())
    return node


def _window_of(node: slicer.vtkMRMLVolumeNode | None) -> tuple[float, float] | None:
    """The grey window (min, max) ``node`` is shown with, for its warped copy to look the same; None without one."""
    display = node.GetDisplayNode() if node is not None else None
    if display is None or not display.IsA("vtkMRMLScalarVolumeDisplayNode") or display.GetWindow() <= 0:
        return None
    return display.GetWindowLevelMin(), display.GetWindowLevelMax()


def _voxels(node: slicer.vtkMRMLScalarVolumeNode) -> np.ndarray:
    return vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())


def _show_map(node: slicer.vtkMRMLScalarVolumeNode, colours: slicer.vtkMRMLColorTableNode, title: str, meaning: str) -> None:
    """Colour a map (read over its fixed window, `read_volume`) with its table; NaN (no value) is transparent; add a
    colour legend."""
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(colours.GetID())
    # A threshold over all finite values hides only NaN voxels (every comparison with NaN is false).
    display.SetAutoThreshold(False)
    display.SetThreshold(-np.finfo(np.float32).max, np.finfo(np.float32).max)
    display.SetApplyThreshold(True)
    node.SetDescription(meaning)
    # Slicer's Colors module registers the legend node class; a bare scene may not have it.
    if node.GetScene().IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
        legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(node)
        legend.SetTitleText(title)
        legend.SetLabelFormat("%.2f")


def _read_segmentation(
    scene: slicer.vtkMRMLScene,
    path: Path,
    name: str,
    reference: slicer.vtkMRMLVolumeNode | None,
    kind: str,
) -> tuple[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLColorTableNode]:
    """A segmentation node from a label map file: one segment per label, named and coloured from the LUT."""
    labelmap = read_volume(scene, path, f"{name} label map", labels=True)
    try:
        codes = [int(c) for c in np.unique(_voxels(labelmap)) if c != 0]
        names = {1: "Brain mask"} if kind == "brain_mask" else None
        colours = add_label_table(scene, codes, f"{name} colours", names)
        labelmap.GetDisplayNode().SetAndObserveColorNodeID(colours.GetID())
        segmentation = slicer.vtkMRMLSegmentationNode()
        segmentation.SetName(scene.GenerateUniqueName(name))
        scene.AddNode(segmentation)
        segmentation.CreateDefaultDisplayNodes()
        if reference is not None:
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        segmentation.SetLabelmapConversionColorTableNodeID(colours.GetID())
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
            remove_node(scene, segmentation)
            remove_node(scene, colours)
            raise InputError(f"Slicer could not turn the label map {path} into a segmentation; run the registration again.")
        return segmentation, colours
    finally:
        remove_node(scene, labelmap)


def remove_node(scene: slicer.vtkMRMLScene, node: slicer.vtkMRMLNode) -> None:
    """Remove a node this package added, with its own display and storage nodes."""
    if node.GetScene() is None:
        return
    helpers = []
    if isinstance(node, slicer.vtkMRMLDisplayableNode):
        helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if isinstance(node, slicer.vtkMRMLStorableNode):
        helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is not None:
            scene.RemoveNode(helper)


def _place_in_hierarchy(
    scene: slicer.vtkMRMLScene, nodes: list[slicer.vtkMRMLNode], fixed_node: slicer.vtkMRMLNode | None, name: str
) -> int:
    """Put the new nodes in a subject-hierarchy folder beside the fixed volume (in its study, if any)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return 0
    parent = hierarchy.GetSceneItemID()
    if fixed_node is not None:
        fixed_item = hierarchy.GetItemByDataNode(fixed_node)
        if fixed_item:
            parent = hierarchy.GetItemParent(fixed_item)
    folder = hierarchy.CreateFolderItem(parent, scene.GenerateUniqueName(name))
    for node in nodes:
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, folder)
        else:
            hierarchy.CreateItem(folder, node)
    return folder


def move_into_folder(scene: slicer.vtkMRMLScene, node: slicer.vtkMRMLNode, folder_item: int) -> None:
    """Put ``node`` into a subject-hierarchy folder (e.g. the one `load_result` made), if the scene has a hierarchy."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None or not folder_item:
        return
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, folder_item)
    else:
        hierarchy.CreateItem(folder_item, node)
