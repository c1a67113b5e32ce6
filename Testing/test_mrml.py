"""JointRegSegLib.mrml against slicer-core's real MRML: a worker output of the sample pair in a scene.

Needs ``pip install "trame-slicer[standalone]==2.0.0"`` (slicer-core 5.11); skipped without it.
The references are the worker's own files, read with SimpleITK (a trusted implementation).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'trame-slicer[standalone]==2.0.0')")

from conftest import run_worker  # noqa: E402

from JointRegSegLib.errors import InputError  # noqa: E402
from JointRegSegLib.labels import label_info  # noqa: E402
from JointRegSegLib.mrml import (  # noqa: E402
    FIXED_ROLE,
    JACOBIAN_WINDOW,
    MOVING_ROLE,
    add_metrics_table,
    load_result,
    show_in_slice_views,
    table_as_dict,
)
from JointRegSegLib.mrml.colors import JACOBIAN_STEP, jacobian_table_rgb  # noqa: E402
from JointRegSegLib.mrml.core import core_scene  # noqa: E402
from JointRegSegLib.mrml.table import BEFORE_COLUMN, METRIC_COLUMN  # noqa: E402
from JointRegSegLib.colour_scales import JACOBIAN_FOLDING_RGB, PMM_RANGE, jacobian_control_points  # noqa: E402
import vtk  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402


# A real but quick run: 2 optimisation steps, a short affine stage, a 4 mm network grid.
FAST_OPTIONS = {"affine_iterations": [20, 10, 0], "spacing": 4.0}


@pytest.fixture(scope="module")
def worker_output(tmp_path_factory, sample_pair) -> Path:
    """The worker's output folder for the sample pair (tto, 2 iterations, with label maps)."""
    tmp = tmp_path_factory.mktemp("mrml")
    job = {"method": "tto", "output": str(tmp / "out"), **{k: str(v) for k, v in sample_pair.items()}}
    job.update(iterations=2, time_budget=60, pictures=False, options=FAST_OPTIONS)
    code, events, stderr = run_worker(job, tmp)
    assert code == 0, (events[-3:], stderr[-3000:])
    return tmp / "out"


def _array(node) -> np.ndarray:
    """A volume node's voxels as [k, j, i] (the layout of sitk.GetArrayFromImage)."""
    return _voxels(node.GetImageData())


def _voxels(image) -> np.ndarray:
    """vtkImageData scalars as [k, j, i(, component)]."""
    i, j, k = image.GetDimensions()
    components = image.GetNumberOfScalarComponents()
    shape = (k, j, i) if components == 1 else (k, j, i, components)
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def _sitk_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _node_state(node) -> dict:
    """What must not change on a pre-existing node: modification time, name, references, voxels."""
    state = {"mtime": node.GetMTime(), "name": node.GetName(), "transform": node.GetTransformNodeID()}
    if node.IsA("vtkMRMLVolumeNode"):
        state["voxels"] = _array(node).copy()
        state["display"] = node.GetDisplayNode().GetMTime()
        state["storage"] = node.GetStorageNode().GetFileName()
    return state


@pytest.fixture(scope="module")
def loaded(worker_output, sample_pair):
    """A fresh slicer-core scene with the fixed and moving volumes and an unrelated transform, then the result."""
    core = core_scene()
    fixed = core.volumes_logic.AddArchetypeVolume(str(sample_pair["fixed"]), "fixed")
    moving = core.volumes_logic.AddArchetypeVolume(str(sample_pair["moving"]), "moving")
    unrelated = core.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "unrelated")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(core.scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "subject"), "study")
    for node in (fixed, moving):
        hierarchy.CreateItem(study, node)
    existing = [fixed, moving, unrelated]
    before = {node.GetID(): _node_state(node) for node in existing}
    ids_before = {core.scene.GetNthNode(i).GetID() for i in range(core.scene.GetNumberOfNodes())}
    result = load_result(core.scene, worker_output, fixed, moving)
    return core, result, fixed, moving, existing, before, ids_before


def test_nodes_and_references(loaded, worker_output):
    core, result, fixed, moving, *_ = loaded
    scene = core.scene
    transform = scene.GetNodeByID(result.transform)
    assert transform.IsA("vtkMRMLGridTransformNode")
    assert transform.GetNodeReference(FIXED_ROLE) is fixed and transform.GetNodeReference(MOVING_ROLE) is moving
    assert transform.GetStorageNode().GetFileName() == str((worker_output / "displacement.nii.gz").resolve())
    assert result.method == "tto" and result.warped and result.jacobian and result.pmm and result.table
    assert set(result.segmentations) == {"warped_seg"}
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for node_id in result.node_ids():
        item = hierarchy.GetItemByDataNode(scene.GetNodeByID(node_id))
        assert hierarchy.GetItemParent(item) == result.folder_item, scene.GetNodeByID(node_id).GetName()
    assert hierarchy.GetItemParent(result.folder_item) == hierarchy.GetItemParent(hierarchy.GetItemByDataNode(fixed))
    assert hierarchy.GetItemLevel(hierarchy.GetItemParent(result.folder_item)) == "Study"


def test_grid_transform_is_the_worker_field(loaded, worker_output):
    """The grid holds the file's vectors, turned from LPS into RAS (x and y negated)."""
    core, result, *_ = loaded
    grid = core.scene.GetNodeByID(result.transform).GetTransformFromParent().GetDisplacementGrid()
    field = _sitk_array(worker_output / "displacement.nii.gz")
    assert np.allclose(_voxels(grid), field * np.array([-1.0, -1.0, 1.0]), atol=1e-5)


def test_affine_part_maps_points_like_itk(loaded, worker_output):
    """Slicer's linear transform from affine.tfm maps points (RAS) as SimpleITK maps them (LPS)."""
    core, result, *_ = loaded
    node = core.scene.GetNodeByID(result.affine)
    assert node.IsA("vtkMRMLLinearTransformNode")
    itk = sitk.ReadTransform(str(worker_output / "affine.tfm"))
    to_lps = np.array([-1.0, -1.0, 1.0])
    for point in ([0.0, 0.0, 0.0], [-40.0, 25.0, 60.0], [70.0, -30.0, -10.0]):
        ras = node.GetTransformFromParent().TransformPoint(point)
        assert np.allclose(np.array(ras) * to_lps, itk.TransformPoint(tuple(np.array(point) * to_lps)), atol=1e-4)


def _to_sitk(node) -> sitk.Image:
    """A scalar volume node as a SimpleITK image (RAS geometry turned into LPS)."""
    image = sitk.GetImageFromArray(_array(node).astype(np.float32))
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(matrix)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    direction = ras_to_lps @ np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    image.SetDirection(direction.ravel().tolist())
    image.SetSpacing(node.GetSpacing())
    image.SetOrigin((ras_to_lps @ np.array(node.GetOrigin())).tolist())
    return image


def _on_node_grid(image: sitk.Image, node) -> np.ndarray:
    """``image``'s voxels on ``node``'s grid (as [k, j, i]). Slicer may store a file's voxels in another
    order than the file (it reverses the slice axis of a left-handed grid, e.g. FreeSurfer's LIA), so
    files and nodes are compared where their voxels coincide in space (nearest neighbour, exact)."""
    outside = float("nan") if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64) else 0.0
    resampled = sitk.Resample(image, _to_sitk(node), sitk.Transform(), sitk.sitkNearestNeighbor, outside, image.GetPixelID())
    return sitk.GetArrayFromImage(resampled)


def test_hardened_moving_equals_warped_within_interpolation_error(loaded, worker_output, sample_pair):
    """Slicer's transform logic applies the grid transform to a copy of the moving volume; the result,
    brought back onto the fixed grid, matches the worker's warped image as closely as re-interpolating
    the warped image itself through the same two grids does (two linear interpolations)."""
    core, result, *_ = loaded
    copy = core.volumes_logic.AddArchetypeVolume(str(sample_pair["moving"]), "moving copy")
    copy.SetAndObserveTransformNodeID(result.transform)
    assert slicer.vtkSlicerTransformLogic().hardenTransform(copy)
    assert copy.GetParentTransformNode() is None
    hardened = _to_sitk(copy)
    core.scene.RemoveNode(copy)

    fixed = sitk.ReadImage(str(sample_pair["fixed"]), sitk.sitkFloat32)
    warped = sitk.ReadImage(str(worker_output / "warped.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(sample_pair["moving"]), sitk.sitkFloat32)

    def on_fixed(image):
        return sitk.GetArrayFromImage(sitk.Resample(image, fixed, sitk.Transform(), sitk.sitkLinear, 0.0))

    reference = sitk.GetArrayFromImage(warped)
    slicer_warped = on_fixed(hardened)
    round_trip = on_fixed(sitk.Resample(warped, hardened, sitk.Transform(), sitk.sitkLinear, 0.0))
    inner = (slice(4, -4),) * 3  # away from the border, where padding conventions differ
    error = np.abs(slicer_warped - reference)[inner].mean()
    interpolation_error = np.abs(round_trip - reference)[inner].mean()
    unregistered = np.abs(sitk.GetArrayFromImage(moving) - reference)[inner].mean()
    assert error <= 1.5 * interpolation_error, (error, interpolation_error)
    assert error < 0.25 * unregistered, (error, unregistered)
    assert np.corrcoef(slicer_warped[inner].ravel(), reference[inner].ravel())[0, 1] > 0.99


def test_segmentation_names_colours_and_voxel_counts(loaded, worker_output):
    core, result, fixed, *_ = loaded
    node = core.scene.GetNodeByID(result.segmentations["warped_seg"])
    labels = _sitk_array(worker_output / "warped_seg.nii.gz")
    codes = [int(c) for c in np.unique(labels) if c != 0]
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(codes)
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is fixed
    geometry = segmentation.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert geometry == slicer.vtkSegmentationConverter.SerializeImageGeometry(_oriented(fixed))
    by_value = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        by_value[segment.GetLabelValue()] = segment
    assert sorted(by_value) == codes
    for code, segment in by_value.items():
        info = label_info(code)
        assert segment.GetName() == info.name
        assert np.allclose(segment.GetColor(), np.array(info.rgb) / 255.0, atol=1e-6)
        assert _segment_voxels(segment, code) == int((labels == code).sum()), info.name


def _oriented(volume) -> "slicer.vtkOrientedImageData":
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(volume.GetImageData())
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    image.SetGeometryFromImageToWorldMatrix(matrix)
    return image


def _segment_voxels(segment, code: int) -> int:
    """Voxels of a segment in its (shared) binary labelmap layer."""
    layer = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    values = vtk_to_numpy(layer.GetPointData().GetScalars())
    return int((values == segment.GetLabelValue()).sum())


def test_jacobian_values_and_colours(loaded, worker_output):
    core, result, *_ = loaded
    node = core.scene.GetNodeByID(result.jacobian)
    assert np.array_equal(_array(node), _on_node_grid(sitk.ReadImage(str(worker_output / "jacobian.nii.gz")), node))
    display = node.GetDisplayNode()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx(JACOBIAN_WINDOW)
    assert display.GetColorNode().GetID() == result.color_tables["jacobian"]

    # Through Slicer's own display pipeline: folding is green, 1 is white, 0.5 the ramp's colour there.
    values = np.array([-0.7, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0], dtype=np.float32)
    rgba = _displayed_colours(core, values, display)
    ramp = {v: np.array(rgb) for v, *rgb in [(p[0], *p[1:]) for p in jacobian_control_points()]}
    assert np.allclose(rgba[0, :3] / 255, JACOBIAN_FOLDING_RGB, atol=1 / 255)
    assert np.allclose(rgba[1, :3] / 255, JACOBIAN_FOLDING_RGB, atol=1 / 255)
    for value, expected in ((0.5, ramp[0.5]), (1.0, ramp[1.0]), (1.5, ramp[1.5]), (2.0, ramp[2.0]), (3.0, ramp[2.0])):
        got = rgba[list(values).index(np.float32(value)), :3] / 255
        assert np.allclose(got, expected, atol=2 / 255), (value, got, expected)
    assert np.allclose(jacobian_table_rgb()[int((1.0 - JACOBIAN_WINDOW[0]) / JACOBIAN_STEP)], (1.0, 1.0, 1.0))
    # Slicer's colour legend labels the display window's ends (vtkMRMLColorLegendDisplayableManager::UpdateActor
    # takes level -+ window / 2 as its range): they must read as the map's range, not "-0.00".
    legend_ends = (display.GetLevel() - display.GetWindow() / 2, display.GetLevel() + display.GetWindow() / 2)
    assert ["%.2f" % end for end in legend_ends] == ["0.00", "2.00"]


def _displayed_colours(core, values: np.ndarray, display) -> np.ndarray:
    """RGBA bytes that Slicer's scalar volume display pipeline, set up like ``display``, makes of ``values``."""
    volume = core.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "probe")
    image = vtk.vtkImageData()
    image.SetDimensions(len(values), 1, 1)
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    vtk_to_numpy(image.GetPointData().GetScalars())[:] = values
    volume.SetAndObserveImageData(image)
    probe = core.scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    probe.CopyContent(display)
    volume.SetAndObserveDisplayNodeID(probe.GetID())
    probe.SetInputImageDataConnection(volume.GetImageDataConnection())
    probe.UpdateImageDataPipeline()
    producer = probe.GetOutputImageDataConnection().GetProducer()
    producer.Update()
    rgba = vtk_to_numpy(producer.GetOutputDataObject(0).GetPointData().GetScalars()).copy()
    core.scene.RemoveNode(volume)
    core.scene.RemoveNode(probe)
    return rgba


def test_warped_volume_is_shown_over_the_moving_volumes_window(worker_output, sample_pair):
    """The warped volume takes the grey window the moving volume is shown with (the two look alike); without a
    moving volume, the window Slicer computes from its voxels."""
    core = core_scene()
    fixed = core.volumes_logic.AddArchetypeVolume(str(sample_pair["fixed"]), "fixed")
    moving = core.volumes_logic.AddArchetypeVolume(str(sample_pair["moving"]), "moving")
    moving.GetDisplayNode().AutoWindowLevelOff()
    moving.GetDisplayNode().SetWindowLevelMinMax(12.0, 345.0)
    shown = core.scene.GetNodeByID(load_result(core.scene, worker_output, fixed, moving).warped).GetDisplayNode()
    assert not shown.GetAutoWindowLevel()
    assert (shown.GetWindowLevelMin(), shown.GetWindowLevelMax()) == pytest.approx((12.0, 345.0))
    alone = core_scene()
    shown = alone.scene.GetNodeByID(load_result(alone.scene, worker_output).warped).GetDisplayNode()
    assert shown.GetAutoWindowLevel() and shown.GetWindow() > 0 and shown.GetWindowLevelMax() != pytest.approx(345.0)


def test_pmm_values_and_no_value_is_transparent(loaded, worker_output):
    core, result, *_ = loaded
    node = core.scene.GetNodeByID(result.pmm)
    expected = _on_node_grid(sitk.ReadImage(str(worker_output / "pmm.nii.gz")), node)
    assert np.array_equal(_array(node), expected, equal_nan=True)
    display = node.GetDisplayNode()
    low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    assert (low, high) == pytest.approx(PMM_RANGE), "every run's PMM is shown on one scale"
    rgba = _displayed_colours(core, np.array([np.nan, low, high], dtype=np.float32), display)
    assert rgba[0, 3] == 0 and rgba[1, 3] == 255 and rgba[2, 3] == 255


def test_metrics_table(loaded, worker_output):
    core, result, *_ = loaded
    metrics = json.loads((worker_output / "metrics.json").read_text())
    table = table_as_dict(core.scene.GetNodeByID(result.table))
    assert table["NCC"]["tto"] == pytest.approx(metrics["ncc"]) and table["NCC"][BEFORE_COLUMN] == pytest.approx(metrics["ncc_initial"])
    assert table["Folding (%)"]["tto"] == pytest.approx(metrics["folding_percent"])
    assert table["SDlogJ"]["tto"] == pytest.approx(metrics["sdlogj"])
    assert table["PMM mean"]["tto"] == pytest.approx(metrics["pmm_mean"])
    assert table["Dice mean"]["tto"] == pytest.approx(metrics["dice_mean"])
    assert table["Dice mean"][BEFORE_COLUMN] == pytest.approx(metrics["dice_mean_initial"])
    for code, info in metrics["labels"].items():
        assert table[f"Dice {info['name']}"]["tto"] == pytest.approx(info["dice"])
        hd95 = table[f"HD95 {info['name']} (mm)"]["tto"]
        assert hd95 == pytest.approx(info["hd95"]) if info["hd95"] is not None else math.isnan(hd95)
    assert table["Time register (s)"]["tto"] == pytest.approx(metrics["time_register_s"])


def test_comparison_table_puts_runs_side_by_side(loaded, worker_output):
    """Two runs: rows are the union of their metrics; a run without label maps has NaN Dice."""
    core, *_ = loaded
    metrics = json.loads((worker_output / "metrics.json").read_text())
    without_labels = {k: v for k, v in metrics.items() if not k.startswith(("dice", "hd95", "labels"))}
    node = add_metrics_table(core.scene, {"tto": metrics, "tto (images only)": without_labels}, "comparison")
    table = table_as_dict(node)
    columns = [node.GetTable().GetColumnName(c) for c in range(node.GetNumberOfColumns())]
    assert columns == [METRIC_COLUMN, BEFORE_COLUMN, "tto", "tto (images only)", "Meaning"]
    assert table["NCC"]["tto"] == table["NCC"]["tto (images only)"] == pytest.approx(metrics["ncc"])
    assert table["Dice mean"]["tto"] == pytest.approx(metrics["dice_mean"]) and math.isnan(table["Dice mean"]["tto (images only)"])
    core.scene.RemoveNode(node)


def test_existing_nodes_untouched(loaded):
    core, result, fixed, moving, existing, before, ids_before = loaded
    for node in existing:
        assert core.scene.GetNodeByID(node.GetID()) is node
        state = _node_state(node)
        expected = before[node.GetID()]
        for key in expected:
            if key == "voxels":
                assert np.array_equal(state[key], expected[key]), node.GetName()
            else:
                assert state[key] == expected[key], (node.GetName(), key)
    ids_now = {core.scene.GetNthNode(i).GetID() for i in range(core.scene.GetNumberOfNodes())}
    assert ids_before <= ids_now


def test_scene_written_and_read_back_keeps_everything(loaded, tmp_path):
    core, result, fixed, *_ = loaded
    folder = tmp_path / "bundle"
    folder.mkdir()
    assert core.app_logic.SaveSceneToSlicerDataBundleDirectory(str(folder))
    again = core_scene()
    again.scene.SetURL(str(next(folder.glob("*.mrml"))))
    assert again.scene.Import()

    def twin(node_id):
        node = core.scene.GetNodeByID(node_id)
        copy = again.scene.GetFirstNodeByName(node.GetName())
        assert copy is not None and copy.GetClassName() == node.GetClassName(), node.GetName()
        return node, copy

    for node_id in (result.warped, result.jacobian, result.pmm):
        node, copy = twin(node_id)
        assert np.array_equal(_array(node), _array(copy), equal_nan=True), node.GetName()
        assert copy.GetDisplayNode().GetColorNode().GetName() == node.GetDisplayNode().GetColorNode().GetName()
        assert copy.GetDisplayNode().GetWindow() == pytest.approx(node.GetDisplayNode().GetWindow(), rel=1e-5)
    for colours_id in result.color_tables.values():
        node, copy = twin(colours_id)
        assert copy.GetNumberOfColors() == node.GetNumberOfColors()
        for index in range(0, node.GetNumberOfColors(), 17):
            a, b = [0.0] * 4, [0.0] * 4
            node.GetColor(index, a)
            copy.GetColor(index, b)
            assert np.allclose(a, b, atol=1e-3)
    node, copy = twin(result.transform)
    grid = node.GetTransformFromParent().GetDisplacementGrid()
    grid_copy = copy.GetTransformFromParent().GetDisplacementGrid()
    assert np.allclose(_voxels(grid), _voxels(grid_copy), atol=1e-5)
    assert copy.GetNodeReference(FIXED_ROLE).GetName() == fixed.GetName()
    node, copy = twin(result.segmentations["warped_seg"])
    names = lambda n: sorted(n.GetSegmentation().GetNthSegment(i).GetName() for i in range(n.GetSegmentation().GetNumberOfSegments()))  # noqa: E731
    assert names(copy) == names(node)
    for index in range(node.GetSegmentation().GetNumberOfSegments()):
        segment = node.GetSegmentation().GetNthSegment(index)
        segment_copy = copy.GetSegmentation().GetSegment(node.GetSegmentation().GetNthSegmentID(index))
        assert _segment_voxels(segment_copy, segment.GetLabelValue()) == _segment_voxels(segment, segment.GetLabelValue())
    node, copy = twin(result.table)
    original, read_back = table_as_dict(node), table_as_dict(copy)
    assert original.keys() == read_back.keys()
    for title, row in original.items():
        for column, value in row.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(read_back[title][column])
            elif isinstance(value, float):
                assert read_back[title][column] == pytest.approx(value, rel=1e-5, abs=1e-9), (title, column)
            else:
                assert read_back[title][column] == value


def test_slice_views_show_fixed_with_overlay(loaded):
    core, result, fixed, *_ = loaded
    composite = core.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    show_in_slice_views(core.scene, fixed.GetID(), result.jacobian, 0.5)
    assert composite.GetBackgroundVolumeID() == fixed.GetID() and composite.GetForegroundVolumeID() == result.jacobian
    assert composite.GetForegroundOpacity() == pytest.approx(0.5)
    core.scene.RemoveNode(composite)


def test_unfinished_folder_adds_nothing(tmp_path):
    core = core_scene()
    count = core.scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="result.json is missing"):
        load_result(core.scene, tmp_path)
    (tmp_path / "result.json").write_text(json.dumps({"displacement": "displacement.nii.gz"}))
    with pytest.raises(InputError, match="missing"):
        load_result(core.scene, tmp_path)
    assert core.scene.GetNumberOfNodes() == count


def test_screenshots_render_offscreen(worker_output, tmp_path):
    """The screenshot script renders real slice views offscreen: three views side by side, the warped
    overlay reddish inside the head (red colour table) and the background black outside it."""
    from PIL import Image

    from JointRegSegLib.mrml.screenshots import VIEW_SIZE, render_screenshots

    written = render_screenshots(worker_output, tmp_path, tmp_path / "icon.png")
    warped = np.asarray(Image.open(written["warped_overlay"]).convert("RGB")).astype(float)
    assert warped.shape == (VIEW_SIZE, 3 * VIEW_SIZE, 3)
    centre = warped[VIEW_SIZE // 2 - 40 : VIEW_SIZE // 2 + 40, VIEW_SIZE + VIEW_SIZE // 2 - 40 : VIEW_SIZE + VIEW_SIZE // 2 + 40]
    assert centre[..., 0].mean() > centre[..., 1].mean() + 20, "no red warped overlay in the middle of the axial view"
    assert warped[:8, :8].max() < 10, "the corner outside the head should be black"
    jacobian = np.asarray(Image.open(written["jacobian_overlay"]).convert("RGB"))
    assert jacobian.shape == warped.shape and jacobian.std() > 10
    assert Image.open(written["icon"]).size == (128, 128)


def test_moving_grid_outputs_reference_the_moving_volume(worker_output, sample_pair, tmp_path):
    """A method's own segmentation of the moving image and its brain mask lie on the moving grid
    (here a cropped, shifted grid unlike the fixed one); they keep that geometry and voxel counts,
    and the skull-stripped image is loaded as a volume."""
    output = tmp_path / "out"
    shutil.copytree(worker_output, output)
    moving_image = sitk.ReadImage(str(sample_pair["moving"]))[5:70, 8:75, 10:90]
    labels = sitk.ReadImage(str(sample_pair["moving_seg"]))[5:70, 8:75, 10:90]
    mask = sitk.Cast(labels > 0, sitk.sitkUInt8)
    sitk.WriteImage(moving_image, str(tmp_path / "moving_crop.nii.gz"))
    sitk.WriteImage(labels, str(output / "moving_seg.nii.gz"))
    sitk.WriteImage(mask, str(output / "brain_mask.nii.gz"))
    sitk.WriteImage(sitk.Mask(moving_image, mask), str(output / "extracted.nii.gz"))
    manifest = json.loads((output / "result.json").read_text())
    manifest.update(moving_seg="moving_seg.nii.gz", brain_mask="brain_mask.nii.gz", extracted="extracted.nii.gz")
    (output / "result.json").write_text(json.dumps(manifest))
    core = core_scene()
    fixed = core.volumes_logic.AddArchetypeVolume(str(sample_pair["fixed"]), "fixed")
    moving = core.volumes_logic.AddArchetypeVolume(str(tmp_path / "moving_crop.nii.gz"), "moving")
    result = load_result(core.scene, output, fixed, moving)
    for kind, truth in (("moving_seg", sitk.GetArrayFromImage(labels)), ("brain_mask", sitk.GetArrayFromImage(mask))):
        node = core.scene.GetNodeByID(result.segmentations[kind])
        assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is moving
        geometry = node.GetSegmentation().GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
        assert geometry == slicer.vtkSegmentationConverter.SerializeImageGeometry(_oriented(moving))
        segmentation = node.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            assert _segment_voxels(segment, segment.GetLabelValue()) == int((truth == segment.GetLabelValue()).sum())
    warped_seg = core.scene.GetNodeByID(result.segmentations["warped_seg"])
    assert warped_seg.GetNodeReference(warped_seg.GetReferenceImageGeometryReferenceRole()) is fixed
    extracted = core.scene.GetNodeByID(result.extracted)
    assert np.array_equal(_array(extracted), _on_node_grid(sitk.Mask(moving_image, mask), extracted))
