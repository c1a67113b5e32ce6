"""JointRegSeg: deep-learning registration joined with segmentation, run in a background process.

A thin view: it wires the panel's widgets to `JointRegSegLib.app.Controller`, which checks the
inputs, writes them to files, runs ``python -m JointRegSegLib.worker`` with Slicer's Python,
reports progress, cancels, and loads the results into the scene. torch is never imported in
Slicer's own process by this module (only the PyTorch extension's installer does, when asked).
Supported: Slicer 5.8 and 5.10 (docs/slicer_api.md lists every Slicer API used, checked at both).
"""

import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent
if importlib.util.find_spec("JointRegSegLib") is None:  # a source checkout: the library is the module's sibling
    sys.path.append(str(MODULE_DIR.parent))

from JointRegSegLib.app import (  # noqa: E402
    AUTO_ITERATIONS,
    NO_TIME_LIMIT,
    OVERLAYS,
    Controller,
    RunRequest,
    RunState,
    apply_button,
    describe_method,
    device_label,
    format_duration,
    panel_iterations,
    panel_time_budget,
    progress_text,
    slicer_python,
)
from JointRegSegLib.app.environment import library_root  # noqa: E402
from JointRegSegLib.methods.catalogue import CATALOGUE  # noqa: E402

REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
PARAMETER_PROPERTY = "SlicerParameterName"
TORCH_REQUIREMENT = ">=2.1"
POLL_INTERVAL_MS = 100


class JointRegSeg(ScriptedLoadableModule):
    """Module metadata; registers the sample pair once Slicer has started."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("JointRegSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["JointRegSeg developers"]
        self.parent.helpText = _(
            "Deformable registration of a moving volume onto a fixed volume with published deep-learning methods "
            "(optionally using segmentations), run in the background with progress, time left and Cancel. "
            "Results: the warped volume, a grid transform usable by every Slicer module, the Jacobian-determinant "
            "map of the deformable part (blue: the moving image was locally stretched to fit, red: shrunk, white: "
            "no change, green: folding), "
            "a patch-wise mutual information map (PMM, higher = better local alignment), segmentations and a "
            "metrics table. See the <a href='https://github.com/jointregseg/SlicerJointRegSeg'>project page</a>."
        )
        self.parent.acknowledgementText = _(
            "Methods re-implemented from their papers: HOF, SegReg, U-ReSNet, JERS and test-time-optimised "
            "generalised registration. Sample data: T1 brain scans with FreeSurfer labels (see Resources/SampleData)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Add the bundled brain pair (two T1 volumes and their FreeSurfer label maps) to Sample Data."""
    import SampleData

    files = sorted((library_root() / "Resources" / "SampleData").glob("*.nii.gz"))
    if not files:
        return
    names = ["JointRegSeg " + path.name[: -len(".nii.gz")].replace("_", " ") for path in files]

    def loadPair(_source):
        return [
            (slicer.util.loadLabelVolume if "_seg" in path.name else slicer.util.loadVolume)(str(path), {"name": name})
            for path, name in zip(files, names)
        ]

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="JointRegSeg", sampleName="JointRegSegBrainPair", uris=[path.as_uri() for path in files],
        fileNames=[path.name for path in files], nodeNames=names, loadFileType=["VolumeFile"] * len(files),
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "JointRegSeg.png"), customDownloader=loadPair,
    )


@parameterNodeWrapper
class JointRegSegParameterNode:
    """The panel's inputs and options. ``method`` and ``device`` are bound by hand (their lists are filled at
    run time); every other field through the .ui's SlicerParameterName."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None] = None
    movingSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None] = None
    atlasVolume: Optional[vtkMRMLScalarVolumeNode] = None
    atlasSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None] = None
    method: str = "tto"
    device: str = "cpu"
    iterations: Annotated[int, WithinRange(AUTO_ITERATIONS, 100000)] = AUTO_ITERATIONS  # shown as "auto"
    timeBudget: Annotated[float, WithinRange(NO_TIME_LIMIT, 86400.0)] = NO_TIME_LIMIT  # shown as "no limit"
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    outputName: str = ""
    outputFolder: str = ""
    overlay: Annotated[str, Choice(list(OVERLAYS))] = OVERLAYS[0]
    wholeJacobian: bool = False


class JointRegSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the .ui to the parameter node and to the controller; no logic of its own."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/JointRegSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self._bound = {w.property(PARAMETER_PROPERTY): w for w in uiWidget.findChildren(qt.QWidget) if w.property(PARAMETER_PROPERTY)}

        self.logic = JointRegSegLogic()
        controller = self.logic.controller
        controller.state.listeners.append(self.onStateChanged)
        controller.on_progress = self.onProgress
        controller.on_log = self.ui.logTextEdit.appendPlainText
        controller.on_finished = self.onFinished
        controller.on_dependencies = self.onDependencies
        for info in controller.methods():
            self.ui.methodComboBox.addItem(f"{info.name}: {info.title}", info.name)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.installButton.connect("clicked(bool)", self.onInstallButton)
        self.ui.extensionsManagerButton.connect("clicked(bool)", lambda _checked=False: slicer.app.openExtensionsManagerDialog())
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodOrDeviceChosen)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onMethodOrDeviceChosen)

        self.initializeParameterNode()
        self.onStateChanged(None, controller.state.state)
        controller.refresh_dependencies()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        """Bindings stay while the module is hidden: re-binding on every enter() leaks observers (see setParameterNode)."""

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            volumes = [v for v in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if not v.IsA("vtkMRMLLabelMapVolumeNode")]
            if len(volumes) >= 2:
                self._parameterNode.fixedVolume, self._parameterNode.movingVolume = volumes[0], volumes[1]

    def setParameterNode(self, parameterNode: Optional[JointRegSegParameterNode]) -> None:
        """Bind the widgets to ``parameterNode`` once. Every connect adds a ModifiedEvent observer that
        disconnectGui never removes (5.8 and 5.10), and 5.8's connectGui returns no tag to disconnect with;
        connectParametersToGui returns one in both, and the same node is never bound twice."""
        if parameterNode is not None and self._parameterNode is not None and parameterNode.parameterNode.GetID() == self._parameterNode.parameterNode.GetID():
            return
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode, self._parameterNodeGuiTag = parameterNode, None
        if parameterNode is not None:
            self._parameterNodeGuiTag = parameterNode.connectParametersToGui(self._bound)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """Show the node's method and device in their lists (bound by hand), then update what depends on them."""
        for comboBox, value in ((self.ui.methodComboBox, self._parameterNode.method), (self.ui.deviceComboBox, self._parameterNode.device)):
            index = comboBox.findData(value)
            if index >= 0 and index != comboBox.currentIndex:
                comboBox.currentIndex = index
        info = CATALOGUE.get(self._parameterNode.method)
        self.ui.methodDescriptionLabel.text = describe_method(info) if info else ""
        self.ui.methodDescriptionLabel.toolTip = f"{info.description}\n{info.paper}" if info else ""
        for widget in (self.ui.iterationsSpinBox, self.ui.timeBudgetSpinBox, self.ui.iterationsLabel, self.ui.timeBudgetLabel):
            widget.enabled = bool(info and info.supports_tto)
        atlas = bool(info and info.needs_atlas)
        for widget in (self.ui.atlasVolumeSelector, self.ui.atlasSegmentationSelector, self.ui.atlasVolumeLabel, self.ui.atlasSegmentationLabel):
            widget.visible = atlas
        for widget in (self.ui.fixedVolumeSelector, self.ui.fixedSegmentationSelector, self.ui.fixedVolumeLabel, self.ui.fixedSegmentationLabel):
            widget.enabled = not atlas  # an atlas method registers the moving volume to the atlas instead
        self.updateApplyButton()

    def onMethodOrDeviceChosen(self, _index=None) -> None:
        if self._parameterNode is None:
            return
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.method = _currentData(self.ui.methodComboBox) or self._parameterNode.method
            self._parameterNode.device = _currentData(self.ui.deviceComboBox) or "cpu"

    def updateApplyButton(self) -> None:
        controller = self.logic.controller
        if controller.state.busy or self._parameterNode is None:
            return
        request = self.logic.request(self._parameterNode)
        problem = self.logic.pythonProblem or controller.check(request, self._parameterNode.method)
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Run the registration in the background.")
        self.ui.compareButton.enabled = problem is None

    def onDependencies(self, dependencies) -> None:
        text = dependencies.summary() if not self.logic.pythonProblem else self.logic.pythonProblem
        noExtension = dependencies.torch is None and importlib.util.find_spec("PyTorchUtils") is None
        if noExtension:
            text += "\n" + _("PyTorch comes through the PyTorch extension: install it in the Extensions Manager, then restart Slicer.")
        self.ui.dependenciesLabel.text = text
        self.ui.installButton.visible = not dependencies.ready and not noExtension
        self.ui.extensionsManagerButton.visible = noExtension
        self.ui.dependenciesCollapsibleButton.collapsed = dependencies.ready
        wasBlocked = self.ui.deviceComboBox.blockSignals(True)
        self.ui.deviceComboBox.clear()
        for device in dependencies.devices:
            self.ui.deviceComboBox.addItem(device_label(device), device)
        self.ui.deviceComboBox.blockSignals(wasBlocked)
        if self._parameterNode is not None:
            if self._parameterNode.device not in dependencies.devices:
                self._parameterNode.device = "cpu"
            self.onParameterNodeModified()

    def onStateChanged(self, old: Optional[RunState], new: RunState) -> None:
        self.ui.applyButton.text, self.ui.applyButton.enabled = apply_button(new)
        busy = self.logic.controller.state.busy
        self.ui.compareButton.enabled = self.ui.installButton.enabled = not busy
        for collapsible in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.outputsCollapsibleButton):
            collapsible.enabled = not busy
        if new == RunState.STARTING:
            self.ui.progressBar.value = 0
            self.ui.progressBar.format = _("Preparing: %p%")
        elif new == RunState.INSTALLING:
            self.ui.statusLabel.text = _("Installing the dependencies; this can take several minutes...")
        elif new == RunState.CANCELLING:
            self.ui.statusLabel.text = _("Cancelling: stopping the worker and everything it started...")
        elif new == RunState.LOADING:
            self.ui.statusLabel.text = _("Loading the results into the scene...")
        if not busy:
            self.updateApplyButton()

    def onProgress(self, run) -> None:
        self.ui.progressBar.value = int(round(100 * run.fraction))
        self.ui.progressBar.format = progress_text(run.stage, run.seconds_left)
        left = format_duration(run.seconds_left)
        self.ui.statusLabel.text = _("{stage} (about {left} left)").format(stage=run.stage, left=left) if left else run.stage

    def onApplyButton(self) -> None:
        if self.logic.controller.state.state == RunState.RUNNING:
            self.logic.controller.cancel()
            return
        self.ui.logTextEdit.clear()
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            if self.ensureDependencies():
                self.logic.processParameterNode(self._parameterNode)

    def onCompareButton(self) -> None:
        request = self.logic.request(self._parameterNode)
        usable = self.logic.controller.comparable(request)
        self.ui.logTextEdit.clear()
        with slicer.util.tryWithErrorDisplay(_("Failed to start the comparison."), waitCursor=True):
            if self.ensureDependencies():
                self.logic.processParameterNode(self._parameterNode, methods=usable)

    def onInstallButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Installing the dependencies failed."), waitCursor=True):
            self.ensureDependencies()

    def ensureDependencies(self) -> bool:
        """True when everything is installed; otherwise ask the user and install (False when declined)."""
        dependencies = self.logic.controller.dependencies
        if dependencies.ready:
            return True
        packages = ([_("PyTorch (through the PyTorch extension; it picks the build for your GPU)")] if dependencies.torch is None else []) + dependencies.missing
        if not slicer.util.confirmOkCancelDisplay(
            _("JointRegSeg needs these Python packages, which will now be installed into Slicer's Python "
              "(this can take several minutes):\n\n{packages}\n\nnumpy and SimpleITK stay as Slicer ships them.").format(packages="\n".join(packages))
        ):
            return False
        return self.logic.installDependencies()

    def onFinished(self, run) -> None:
        if run.cancelled:
            self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")
            self.ui.progressBar.value, self.ui.progressBar.format = 0, "%p%"
            return
        if run.error:
            self.ui.statusLabel.text = _("Failed: ") + run.error
            if run.out_of_memory and run.device != "cpu" and slicer.util.confirmOkCancelDisplay(
                _("The GPU ran out of memory:\n\n{error}\n\nRun again on the CPU (slower, uses main memory)?").format(error=run.error)
            ):
                self._parameterNode.device = "cpu"
                self.onApplyButton()
                return
            slicer.util.errorDisplay(_("JointRegSeg ({method}) failed:\n\n{error}").format(method=run.method, error=run.error))
            return
        self.ui.statusLabel.text = _("Finished {method} in {time}.").format(method=run.method, time=format_duration(run.elapsed))
        if not self.logic.controller.state.busy and self._parameterNode is not None:
            self.logic.show(run, self._parameterNode.overlay)


def _currentData(comboBox) -> Optional[str]:
    return comboBox.itemData(comboBox.currentIndex) if comboBox.currentIndex >= 0 else None


class JointRegSegLogic(ScriptedLoadableModuleLogic):
    """The controller on Slicer's scene, polled by a timer; usable from the Python console and in scripts:
    ``run = JointRegSegLogic().process(fixed, moving, method="tto", waitForCompletion=True)``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.pythonProblem = None
        try:
            python = slicer_python(slicer.app.slicerHome)
        except FileNotFoundError as error:
            python, self.pythonProblem = None, str(error)
        self.controller = Controller(
            slicer.mrmlScene, python, Path(slicer.app.temporaryPath) / "JointRegSeg", REQUIREMENTS,
            app_logic=slicer.app.applicationLogic(), environment=slicer.util.startupEnvironment(),
        )
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.controller.poll)
        self._timer.start()
        slicer.app.connect("aboutToQuit()", self.shutdown)

    def getParameterNode(self) -> JointRegSegParameterNode:
        return JointRegSegParameterNode(super().getParameterNode())

    @staticmethod
    def request(parameters: JointRegSegParameterNode) -> RunRequest:
        return RunRequest(
            fixed=parameters.fixedVolume, moving=parameters.movingVolume, fixed_segmentation=parameters.fixedSegmentation,
            moving_segmentation=parameters.movingSegmentation, atlas=parameters.atlasVolume,
            atlas_segmentation=parameters.atlasSegmentation, device=parameters.device or "cpu",
            iterations=panel_iterations(parameters.iterations), time_budget=panel_time_budget(parameters.timeBudget),
            seed=parameters.seed, output_folder=parameters.outputFolder, output_name=parameters.outputName,
            whole_jacobian=parameters.wholeJacobian,
        )

    def processParameterNode(self, parameters: JointRegSegParameterNode, methods: Optional[list] = None):
        """Run the parameter node's method (or each of ``methods``, compared in one metrics table)."""
        return self.controller.start(self.request(parameters), methods or [parameters.method])

    def process(self, fixedVolume, movingVolume, method: str = "tto", methods: Optional[list] = None, waitForCompletion: bool = False, **settings):
        """Register ``movingVolume`` onto ``fixedVolume``; ``settings`` are `RunRequest` fields (iterations=3, ...)."""
        run = self.controller.start(RunRequest(fixed=fixedVolume, moving=movingVolume, **settings), methods or [method])
        if waitForCompletion:
            self.waitForCompletion()
            failed = [r for r in self.controller.runs if r.error]
            if failed:
                raise RuntimeError(f"JointRegSeg ({failed[0].method}) failed: {failed[0].error}")
        return run

    def waitForCompletion(self, timeoutSeconds: Optional[float] = None) -> None:
        self.controller.wait(timeoutSeconds, idle=slicer.app.processEvents)

    def installDependencies(self) -> bool:
        """Install torch through the PyTorch extension and the other requirements with pip (the caller asked first)."""

        def installTorch() -> bool:
            import PyTorchUtils

            return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is not None

        return self.controller.install(installTorch, slicer.util.pip_install)

    def show(self, run, overlay: str) -> None:
        """Show a finished run over its fixed volume; a comparison's table in a table view."""
        self.controller.show(run, overlay)
        if self.controller.comparison_table:
            slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)

    def shutdown(self) -> None:
        """Stop the worker (its whole tree) and the polling timer: module clean-up and application exit."""
        self._timer.stop()
        slicer.app.disconnect("aboutToQuit()", self.shutdown)
        self.controller.shutdown()


class JointRegSegTest(ScriptedLoadableModuleTest):
    """Registers the bundled sample pair with a few iterations on the CPU, and cancels a run."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.logic = JointRegSegLogic()
        self.logic.waitForCompletion(120)
        dependencies = self.logic.controller.dependencies
        try:
            if not dependencies.ready:
                self.delayDisplay("Skipped: " + dependencies.summary().replace("\n", " ") + " Install them in the Dependencies section.")
                return
            self.setUp()
            self.test_SamplePairRegistered()
            self.setUp()
            self.test_CancelLeavesSceneUnchanged()
        finally:
            self.logic.shutdown()

    @staticmethod
    def _samplePair():
        folder = library_root() / "Resources" / "SampleData"
        fixed = slicer.util.loadVolume(str(folder / "fixed_img.nii.gz"), {"name": "JointRegSegTest fixed"})
        moving = slicer.util.loadVolume(str(folder / "moving_img.nii.gz"), {"name": "JointRegSegTest moving"})
        return fixed, moving

    def test_SamplePairRegistered(self):
        self.delayDisplay("Registering the sample pair (tto, 3 iterations, CPU)")
        fixed, moving = self._samplePair()
        movingBefore = slicer.util.arrayFromVolume(moving).copy()
        run = self.logic.process(fixed, moving, method="tto", iterations=3, waitForCompletion=True)
        transform = slicer.mrmlScene.GetNodeByID(run.loaded.transform)
        self.assertTrue(transform.IsA("vtkMRMLGridTransformNode"))
        warped = slicer.mrmlScene.GetNodeByID(run.loaded.warped)
        self.assertEqual(slicer.util.arrayFromVolume(warped).shape, slicer.util.arrayFromVolume(fixed).shape)
        self.assertTrue((slicer.util.arrayFromVolume(slicer.mrmlScene.GetNodeByID(run.loaded.jacobian)) > 0).mean() > 0.99)
        self.assertGreater(run.metrics["ncc"], run.metrics["ncc_initial"])
        self.assertTrue((slicer.util.arrayFromVolume(moving) == movingBefore).all(), "the moving volume was modified")
        self.delayDisplay("Test passed")

    def test_CancelLeavesSceneUnchanged(self):
        self.delayDisplay("Cancelling a run")
        fixed, moving = self._samplePair()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        run = self.logic.process(fixed, moving, method="tto", iterations=100000, time_budget=600)
        deadline = time.monotonic() + 300
        while run.fraction <= 0.05 and self.logic.controller.state.state == RunState.RUNNING and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.logic.controller.cancel()
        self.logic.waitForCompletion(60)
        self.assertTrue(run.cancelled)
        self.assertIsNotNone(run.process.process.poll(), "the worker is still running")
        self.assertFalse(run.folder.exists(), "a cancelled run left its folder")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        logging.info("JointRegSegTest: cancel left the scene unchanged")
        self.delayDisplay("Test passed")
