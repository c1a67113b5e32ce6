"""The controller (JointRegSegLib.app) driving whole flows: the real worker, slicer-core's real MRML scene.

Each flow is what a user does in the Slicer module or the web page: run and see the results, cancel,
close the scene during a run, meet a worker failure, register to the shipped atlas, export two
segmentations made separately, compare two methods. Processes are checked by pid (the worker and
everything it started), inputs by their voxels and modification times.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (trame-slicer[standalone]) is not installed")

import vtk  # noqa: E402
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy  # noqa: E402

from JointRegSegLib import mrml  # noqa: E402
from JointRegSegLib.app import Controller, RunRequest, RunState  # noqa: E402
from JointRegSegLib.colour_scales import DEFORMABLE_PART, WHOLE_MAPPING, jacobian_title  # noqa: E402
from JointRegSegLib.app.process import BackgroundProcess  # noqa: E402
from JointRegSegLib.errors import InputError  # noqa: E402
from JointRegSegLib.mrml.core import core_scene  # noqa: E402
from JointRegSegLib.mrml.export import write_labels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "JointRegSeg" / "Resources" / "requirements.txt"
TIMEOUT = 900  # generous: a busy 2-core machine; nothing here is about speed


@pytest.fixture
def app(tmp_path, sample_pair):
    """A scene holding the sample pair and its label maps, and a controller on it."""
    core = core_scene()
    nodes = {
        "fixed": core.volumes_logic.AddArchetypeVolume(str(sample_pair["fixed"]), "fixed"),
        "moving": core.volumes_logic.AddArchetypeVolume(str(sample_pair["moving"]), "moving"),
        "fixed_seg": mrml.read_volume(core.scene, sample_pair["fixed_seg"], "fixed labels", labels=True),
        "moving_seg": mrml.read_volume(core.scene, sample_pair["moving_seg"], "moving labels", labels=True),
    }
    controller = Controller(core.scene, sys.executable, tmp_path / "work", REQUIREMENTS, app_logic=core.app_logic)
    log: list[str] = []
    controller.on_log = log.append
    finished = []
    controller.on_finished = finished.append
    yield core, controller, nodes, log, finished
    controller.shutdown()


def _ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _state(node) -> tuple:
    """What must not change in an input node: its voxels, geometry and modification time."""
    voxels = vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).copy()
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    storage = node.GetStorageNode().GetFileName() if node.GetStorageNode() else None
    return voxels.tobytes(), tuple(matrix.GetElement(i, j) for i in range(4) for j in range(4)), node.GetMTime(), storage


def _descendants(pid: int) -> set[int]:
    """The live processes started by ``pid`` (children, grandchildren, ...), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _run_until(controller: Controller, run, fraction: float, seen: set[int]) -> None:
    """Poll until the run passed ``fraction``, remembering every process the worker started."""
    deadline = time.monotonic() + TIMEOUT
    while run.fraction <= fraction and controller.state.state == RunState.RUNNING:
        controller.poll()
        seen.add(run.process.pid)
        seen |= _descendants(run.process.pid)
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.05)
    assert controller.state.state == RunState.RUNNING, run.error


def _gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return {p for p in pids if _alive(p)}


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_run_loads_and_shows_results_inputs_untouched(app):
    core, controller, nodes, log, finished = app
    before = {name: _state(node) for name, node in nodes.items()}
    composite = core.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    request = RunRequest(
        nodes["fixed"], nodes["moving"], nodes["fixed_seg"], nodes["moving_seg"], iterations=5, output_name="First", whole_jacobian=True
    )
    run = controller.start(request, ["uresnet"])
    job = json.loads((run.folder / "job.json").read_text())
    assert "iterations" not in job and "time_budget" not in job, "the panel's iterations are for test-time optimisation only"
    assert job["jacobian"] == "whole"
    assert job["compress"] is False and job["moving"].endswith(".nii"), "scratch files are written once and read once"
    assert controller.state.state == RunState.RUNNING
    progress = []
    controller.on_progress = lambda r: progress.append((r.fraction, r.stage))
    controller.wait(TIMEOUT)
    assert run.error is None and controller.state.state == RunState.IDLE and finished == [run]
    assert [f for f, _ in progress] == sorted(f for f, _ in progress) and progress[-1][0] == 1.0
    loaded = run.loaded
    transform = core.scene.GetNodeByID(loaded.transform)
    assert transform.IsA("vtkMRMLGridTransformNode") and transform.GetName() == "First uresnet transform"
    assert transform.GetNodeReference(mrml.MOVING_ROLE) is nodes["moving"]
    assert transform.GetNodeReference(mrml.FIXED_ROLE) is nodes["fixed"]
    warped = core.scene.GetNodeByID(loaded.warped)
    assert warped.GetImageData().GetDimensions() == nodes["fixed"].GetImageData().GetDimensions()
    table = mrml.table_as_dict(core.scene.GetNodeByID(loaded.table))
    assert table["Dice mean"]["uresnet"] == pytest.approx(run.metrics["dice_mean"])
    controller.show(run, "Jacobian determinant")
    assert composite.GetBackgroundVolumeID() == nodes["fixed"].GetID()
    assert composite.GetForegroundVolumeID() == loaded.jacobian
    assert loaded.jacobian_part == WHOLE_MAPPING
    assert core.scene.GetNodeByID(loaded.jacobian).GetDescription().startswith(jacobian_title(WHOLE_MAPPING))
    assert {name: _state(node) for name, node in nodes.items()} == before, "an input node was modified"
    assert nodes["moving"].GetParentTransformNode() is None
    assert not (run.folder / "inputs").exists() and (run.output / "displacement.nii").is_file()


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_the_next_run_goes_to_a_worker_started_ahead(app, tmp_path):
    """At the end of a run the controller starts the next one's worker (its imports overlap the loading and the
    user's next choices): the second run's worker existed before Apply; `shutdown` ends it when no run comes.
    A run into an output folder of the user's writes compressed files."""
    core, controller, nodes, log, finished = app
    request = RunRequest(nodes["fixed"], nodes["moving"], nodes["fixed_seg"], nodes["moving_seg"])
    first = controller.start(request, ["uresnet"])
    controller.wait(TIMEOUT)
    assert first.error is None, first.error
    before_apply = _descendants(os.getpid())
    request.output_folder = str(tmp_path / "kept")
    second = controller.start(request, ["uresnet"])
    assert second.process.pid in before_apply and second.process.pid != first.process.pid
    controller.wait(TIMEOUT)
    assert second.error is None and core.scene.GetNodeByID(second.loaded.warped) is not None, second.error
    assert (second.output / "displacement.nii.gz").is_file() and second.output.is_relative_to(tmp_path / "kept")
    spare = _descendants(os.getpid()) - before_apply
    assert spare, "no worker was started ahead of a third run"
    third = controller.start(RunRequest(nodes["fixed"], nodes["moving"], iterations=100000, time_budget=3600), ["tto"])
    assert third.process.pid in spare
    seen: set[int] = set()
    _run_until(controller, third, 0.02, seen)
    controller.shutdown()  # during a run; the view may still poll once afterwards
    controller.poll()
    assert not _gone(spare | seen), "shutdown left a worker running"
    workers = [pid for pid in _descendants(os.getpid()) if b"JointRegSegLib.worker" in _command_line(pid)]
    assert not workers, "a worker was started ahead after shutdown"


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_cancel_leaves_scene_unchanged_and_no_process(app):
    core, controller, nodes, log, finished = app
    ids = _ids(core.scene)
    run = controller.start(RunRequest(nodes["fixed"], nodes["moving"], iterations=100000, time_budget=3600), ["tto"])
    seen: set[int] = set()
    _run_until(controller, run, 0.02, seen)
    controller.cancel()
    assert controller.state.state == RunState.CANCELLING
    controller.wait(TIMEOUT)
    assert run.cancelled and controller.state.state == RunState.IDLE and finished == [run]
    assert not _gone(seen), "a process of the cancelled run is still alive"
    assert _ids(core.scene) == ids
    assert not run.folder.exists(), "a cancelled run left its folder"


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_cancel_escalates_to_kill_without_polling(tmp_path):
    """A process that ignores SIGTERM is killed after the grace period even if nobody polls any more."""
    script = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(600)\n"
    process = BackgroundProcess([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not process.poll().lines and time.monotonic() < deadline:
        time.sleep(0.05)
    process.cancel(grace=1.0)
    assert _alive(process.pid) or process.process.poll() is not None
    process.process.wait(timeout=30)
    assert process.process.returncode == -9


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_closing_the_scene_cancels_the_run(app):
    core, controller, nodes, log, finished = app
    run = controller.start(RunRequest(nodes["fixed"], nodes["moving"], iterations=100000, time_budget=3600), ["tto"])
    seen: set[int] = set()
    _run_until(controller, run, 0.02, seen)
    core.scene.Clear(0)
    assert controller.state.state == RunState.CANCELLING
    new_node = core.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "opened after the close")
    ids = _ids(core.scene)
    controller.wait(TIMEOUT)
    assert run.cancelled and run.loaded is None and controller.state.state == RunState.IDLE
    assert _ids(core.scene) == ids and core.scene.GetNodeByID(new_node.GetID()) is new_node
    assert not _gone(seen)
    assert any("scene is closing" in line for line in log)


def test_worker_failure_reaches_the_user_and_adds_nothing(app):
    core, controller, nodes, log, finished = app
    empty = slicer.vtkMRMLScalarVolumeNode()
    core.scene.AddNode(empty)
    empty.CopyOrientation(nodes["moving"])
    image = vtk.vtkImageData()
    image.DeepCopy(nodes["moving"].GetImageData())
    image.GetPointData().SetScalars(numpy_to_vtk(np.zeros(image.GetNumberOfPoints(), np.float32), deep=True))
    empty.SetAndObserveImageData(image)
    ids = _ids(core.scene)
    run = controller.start(RunRequest(nodes["fixed"], empty), ["uresnet"])
    controller.wait(TIMEOUT)
    assert controller.state.state == RunState.FAILED and finished == [run]
    assert run.error and "\n" not in run.error and "empty" in run.error.lower(), run.error
    assert any(run.error in line for line in log)
    assert _ids(core.scene) == ids


def test_atlas_method_with_the_shipped_atlas(app):
    core, controller, nodes, log, finished = app
    composite = core.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    run = controller.start(RunRequest(moving=nodes["moving"]), ["jers"])
    controller.wait(TIMEOUT)
    assert run.error is None, run.error
    atlas = core.scene.GetNodeByID(run.atlas_id)
    assert atlas is not None and atlas.GetName() == "JointRegSeg jers atlas"
    shipped = sitk.ReadImage(str(REPO / "Resources" / "Atlas" / "mni152_t1_2mm.nii.gz"))
    assert atlas.GetImageData().GetDimensions() == shipped.GetSize()
    transform = core.scene.GetNodeByID(run.loaded.transform)
    assert transform.GetNodeReference(mrml.FIXED_ROLE) is atlas
    controller.show(run)
    assert composite.GetBackgroundVolumeID() == atlas.GetID()
    assert composite.GetForegroundVolumeID() == run.loaded.warped


def _segmentation(core, labels: np.ndarray, reference, names: dict[int, str], colours=None):
    """A segmentation node made in Slicer's way from a label array, its segments renamed."""
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    core.scene.AddNode(labelmap)
    labelmap.CopyOrientation(reference)
    image = vtk.vtkImageData()
    image.SetDimensions(*labels.shape[::-1])
    image.GetPointData().SetScalars(numpy_to_vtk(labels.ravel(), deep=True, array_type=vtk.VTK_SHORT))
    labelmap.SetAndObserveImageData(image)
    segmentation = core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    core.scene.RemoveNode(labelmap)
    for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):
        segment = segmentation.GetSegmentation().GetNthSegment(index)
        segment.SetName(names[segment.GetLabelValue()])
    if colours is not None:
        segmentation.SetLabelmapConversionColorTableNodeID(colours.GetID())
    return segmentation


def test_segmentations_made_separately_export_with_freesurfer_codes(app, tmp_path):
    """Two segmentations with their segments in different orders (and a user's colour table on one) give
    label maps with the FreeSurfer code of each structure; the user's colour table is not touched."""
    core, controller, nodes, log, finished = app
    reference = nodes["fixed"]
    shape = reference.GetImageData().GetDimensions()[::-1]
    labels = np.zeros(shape, np.int16)
    labels[10:20, 10:20, 10:20] = 1
    labels[30:40, 30:40, 30:40] = 2
    user_colours = slicer.vtkMRMLColorTableNode()
    user_colours.SetTypeToUser()
    user_colours.SetNumberOfColors(3)
    user_colours.SetColor(1, "my structure", 1, 0, 0, 1)
    core.scene.AddNode(user_colours)
    colours_before = (user_colours.GetNumberOfColors(), user_colours.GetMTime())
    first = _segmentation(core, labels, reference, {1: "Left-Hippocampus", 2: "Right-Lateral-Ventricle"}, user_colours)
    swapped = np.where(labels == 1, 2, np.where(labels == 2, 1, 0)).astype(np.int16)
    second = _segmentation(core, swapped, reference, {2: "Left-Hippocampus", 1: "right lateral ventricle"})
    ids = _ids(core.scene)
    for node, name in ((first, "first"), (second, "second")):
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(write_labels(core.scene, node, reference, tmp_path / f"{name}.nii.gz"))))
        assert set(np.unique(written)) == {0, 17, 43}, name
        assert np.array_equal(written == 17, labels == 1) and np.array_equal(written == 43, labels == 2), name
    assert (user_colours.GetNumberOfColors(), user_colours.GetMTime()) == colours_before
    assert _ids(core.scene) == ids, "the export left nodes in the scene"


def test_segments_standing_for_one_structure_are_refused(app, tmp_path):
    core, controller, nodes, log, finished = app
    shape = nodes["fixed"].GetImageData().GetDimensions()[::-1]
    labels = np.zeros(shape, np.int16)
    labels[5:9, 5:9, 5:9], labels[20:24, 20:24, 20:24] = 1, 2
    node = _segmentation(core, labels, nodes["fixed"], {1: "Left-Hippocampus", 2: "left hippocampus"})
    with pytest.raises(InputError, match="both stand for label 17"):
        write_labels(core.scene, node, nodes["fixed"], tmp_path / "x.nii.gz")


def test_compare_two_methods_fills_one_table(app):
    core, controller, nodes, log, finished = app
    request = RunRequest(nodes["fixed"], nodes["moving"], nodes["fixed_seg"], nodes["moving_seg"])
    controller.start(request, ["uresnet", "hof"])
    controller.wait(TIMEOUT)
    assert [r.method for r in finished] == ["uresnet", "hof"] and all(r.error is None for r in finished)
    assert all(r.loaded.table is None for r in finished), "a comparison makes one table, not one per run"
    table = mrml.table_as_dict(core.scene.GetNodeByID(controller.comparison_table))
    assert table["Dice mean"]["uresnet"] == pytest.approx(finished[0].metrics["dice_mean"])
    assert table["Dice mean"]["hof"] == pytest.approx(finished[1].metrics["dice_mean"])
    assert [r.stage.split(":")[0] for r in finished] == ["uresnet (1/2)", "hof (2/2)"]
    assert all(r.loaded.jacobian_part == DEFORMABLE_PART for r in finished), "by default the deformable part's det J"


def test_requests_checked_in_the_users_words(app):
    core, controller, nodes, log, finished = app
    assert controller.check(RunRequest(moving=nodes["moving"]), "tto") == "Select a fixed and a moving volume."
    assert "segmentation" in controller.check(RunRequest(nodes["fixed"], nodes["moving"]), "segreg")
    assert controller.check(RunRequest(nodes["fixed"], nodes["fixed"]), "tto").startswith("The fixed and moving volumes must be different")
    assert controller.check(RunRequest(moving=nodes["moving"]), "jers") is None
    assert "both an atlas" in controller.check(RunRequest(moving=nodes["moving"], atlas=nodes["fixed"]), "jers")
    pair_only = RunRequest(nodes["fixed"], nodes["moving"])
    assert controller.comparable(pair_only) == ["hof", "tto", "uresnet"], "jers registers to its atlas; segreg needs segmentations"
    with_labels = RunRequest(nodes["fixed"], nodes["moving"], nodes["fixed_seg"], nodes["moving_seg"])
    assert controller.comparable(with_labels) == ["hof", "segreg", "tto", "uresnet"]
    with pytest.raises(InputError, match="segmentation"):
        controller.start(RunRequest(nodes["fixed"], nodes["moving"]), ["tto", "segreg"])
    assert controller.state.state == RunState.IDLE and controller.runs == []


def test_slicer_flow_experiment_times_a_whole_apply(tmp_path):
    """`experiments.slicer_flow` (a script run in a session process of its own) on the bundled pair: one Apply
    measured whole, its parts inside it, the results loaded (a Dice), the table written."""
    from JointRegSegLib.experiments import slicer_flow

    assert slicer_flow.main(["--out", str(tmp_path), "--pair", "sample", "--methods", "uresnet", "--repeats", "1", "--think", "2"]) == 0
    [run] = json.loads((tmp_path / "slicer_flow.json").read_text())
    assert "error" not in run, run.get("error")
    assert 0.0 <= run["dice"] <= 1.0 and run["method"] == "uresnet"
    parts = run["writing the inputs"] + run["worker start-up after Apply"] + run["worker's job"]
    assert 0.0 < parts <= run["Apply to results"] and run["loading and the rest"] >= 0.0
    assert "| uresnet | this |" in (tmp_path / "slicer_flow.md").read_text()
