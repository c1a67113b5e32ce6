"""JointRegSeg: deep-learning registration joined with segmentation, run in a background process.

The module is thin: it writes the selected nodes to files, starts ``python -m JointRegSegLib.worker``
with Slicer's Python (PythonSlicer) without blocking the GUI, turns the worker's JSON events into a
progress bar and a log, and loads the result with ``JointRegSegLib.mrml``. torch is only ever
imported by the worker process; this file imports nothing heavy when Slicer loads it.
"""

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Callable, Optional, Union

import ctk
import qt
import vtk

import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, GuiConnector, WithinRange, parameterNodeGuiConnector, parameterNodeWrapper
from slicer.parameterNodeWrapper.util import unannotatedType
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from JointRegSegHelpers.environment import (
    DESCRIBE_SCRIPT,
    describe_method,
    library_root,
    missing_requirements,
    protected_constraints,
    read_requirements,
)
from JointRegSegHelpers.process import BackgroundProcess, python_environment, worker_command
from JointRegSegHelpers.runstate import RunState, RunStateMachine, apply_button, format_duration, progress_text

MODULE_DIR = Path(__file__).resolve().parent
OVERLAYS = ("Warped volume", "Jacobian determinant", "PMM (local alignment)")
TORCH_REQUIREMENT = ">=2.1"
POLL_INTERVAL_MS = 100


#
# JointRegSeg
#


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
            "map (blue: compression, white: volume kept, red: expansion, green: folding), a patch-wise mutual "
            "information map (PMM, higher = better local alignment), segmentations and a metrics table. "
            "See the <a href='https://github.com/jointregseg/SlicerJointRegSeg'>project page</a>."
        )
        self.parent.acknowledgementText = _(
            "Methods: HOF, SegReg, U-ReSNet, JERS and test-time-optimised generalised registration (TTO), "
            "re-implemented from their papers. Sample data: OASIS-derived T1 brain scans with FreeSurfer labels."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Add the bundled brain pair (two T1 volumes and their FreeSurfer label maps) to Sample Data."""
    import SampleData

    try:
        sampleDir = library_root(MODULE_DIR) / "Resources" / "SampleData"
    except FileNotFoundError:
        return
    files = sorted(sampleDir.glob("*.nii.gz"))
    if not files:
        return
    names = ["JointRegSeg " + path.name[: -len(".nii.gz")].replace("_", " ") for path in files]

    def loadPair(_source):
        """Load the images as volumes and the label maps as label map volumes."""
        nodes = []
        for path, name in zip(files, names):
            load = slicer.util.loadLabelVolume if "_seg" in path.name else slicer.util.loadVolume
            nodes.append(load(str(path), {"name": name}))
        return nodes

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="JointRegSeg",
        sampleName="JointRegSegBrainPair",
        uris=[path.as_uri() for path in files],
        fileNames=[path.name for path in files],
        nodeNames=names,
        loadFileType=["VolumeFile"] * len(files),
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "JointRegSeg.png"),
        customDownloader=loadPair,
    )


#
# Parameter node
#


ITEM_DATA_PROPERTY = "JointRegSegItemData"


@parameterNodeGuiConnector
class ComboBoxItemDataConnector(GuiConnector):
    """Binds a str parameter to a ctkComboBox whose items (filled at run time) carry the value as item data.

    Only combo boxes with the dynamic property ``JointRegSegItemData`` set in the .ui file are handled.
    """

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return isinstance(widget, ctk.ctkComboBox) and unannotatedType(datatype) == str and bool(widget.property(ITEM_DATA_PROPERTY))

    @staticmethod
    def create(widget, datatype):
        if ComboBoxItemDataConnector.canRepresent(widget, datatype):
            return ComboBoxItemDataConnector(widget)
        return None

    def __init__(self, widget):
        super().__init__()
        self._widget = widget

    def _connect(self):
        self._widget.currentIndexChanged.connect(self.changed)

    def _disconnect(self):
        self._widget.currentIndexChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        value = self._widget.itemData(self._widget.currentIndex) if self._widget.currentIndex >= 0 else None
        return "" if value is None else str(value)

    def write(self, value: str) -> None:
        index = self._widget.findData(value)
        if index >= 0:
            self._widget.currentIndex = index


@parameterNodeWrapper
class JointRegSegParameterNode:
    """The module's inputs and options (every field is bound to a widget of JointRegSeg.ui)."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None] = None
    movingSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None] = None
    atlasVolume: Optional[vtkMRMLScalarVolumeNode] = None
    atlasSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None] = None
    method: str = "tto"
    device: str = "cpu"
    iterations: Annotated[int, WithinRange(0, 100000)] = 100
    timeBudget: Annotated[float, WithinRange(1.0, 86400.0)] = 60.0
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    outputName: str = ""
    outputFolder: str = ""
    overlay: Annotated[str, Choice(list(OVERLAYS))] = OVERLAYS[0]


#
# Widget
#


class JointRegSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: binds the .ui to the parameter node and mirrors the logic's state."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._methods = {}

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/JointRegSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = JointRegSegLogic()
        self.logic.stateMachine.listeners.append(self.onStateChanged)
        self.logic.progressCallback = self.onProgress
        self.logic.logCallback = self.onLog
        self.logic.finishedCallback = self.onFinished

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.updateMethodControls)

        self.initializeParameterNode()
        self.onStateChanged(None, self.logic.stateMachine.state)
        self.ui.statusLabel.text = _("Looking for methods and devices...")
        self.logic.describe(self.onDescribed)

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic is not None:
            self.logic.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            volumes = [v for v in volumes if not v.IsA("vtkMRMLLabelMapVolumeNode")]
            if len(volumes) >= 2:
                self._parameterNode.fixedVolume, self._parameterNode.movingVolume = volumes[0], volumes[1]

    def setParameterNode(self, inputParameterNode: Optional[JointRegSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def onDescribed(self, methods: list, devices: list, problem: Optional[str]) -> None:
        """Fill the method and device lists from what the worker's Python reported."""
        self._methods = {info["name"]: info for info in methods}
        self.logic.methodInfo = dict(self._methods)
        for comboBox, items in (
            (self.ui.methodComboBox, [(f"{m['name']}: {m['title']}", m["name"]) for m in methods]),
            (self.ui.deviceComboBox, [(deviceLabel(d), d) for d in devices]),
        ):
            wasBlocked = comboBox.blockSignals(True)
            comboBox.clear()
            for text, data in items:
                comboBox.addItem(text, data)
            comboBox.blockSignals(wasBlocked)
        if self._parameterNode:
            # Re-apply the stored choice now that the items exist; fall back to the first item.
            for name, comboBox in (("method", self.ui.methodComboBox), ("device", self.ui.deviceComboBox)):
                index = comboBox.findData(getattr(self._parameterNode, name))
                comboBox.currentIndex = index if index >= 0 else 0
                setattr(self._parameterNode, name, comboBox.itemData(comboBox.currentIndex) or "")
        self.ui.statusLabel.text = problem or ""
        self.updateMethodControls()

    def updateMethodControls(self, *_args) -> None:
        """Show what the chosen method needs and gives; enable only the inputs and options it uses."""
        info = self._methods.get(self.ui.methodComboBox.itemData(self.ui.methodComboBox.currentIndex) or "", {})
        self.ui.methodDescriptionLabel.text = describe_method(info) if info else ""
        self.ui.methodDescriptionLabel.toolTip = f"{info.get('description', '')}\n{info.get('paper', '')}".strip()
        for widget in (self.ui.iterationsSpinBox, self.ui.timeBudgetSpinBox, self.ui.iterationsLabel, self.ui.timeBudgetLabel):
            widget.enabled = bool(info.get("supports_tto", True))
        atlas = bool(info.get("needs_atlas"))
        for widget in (self.ui.atlasVolumeSelector, self.ui.atlasSegmentationSelector, self.ui.atlasVolumeLabel, self.ui.atlasSegmentationLabel):
            widget.visible = atlas
        for widget in (self.ui.fixedVolumeSelector, self.ui.fixedSegmentationSelector, self.ui.fixedVolumeLabel, self.ui.fixedSegmentationLabel):
            widget.enabled = not atlas  # an atlas method registers the moving volume to the atlas instead
        self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self.logic.stateMachine.busy:
            return
        problem = missingInputs(self._parameterNode, self._methods.get(self._parameterNode.method, {})) if self._parameterNode else _("No parameter node.")
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Run the registration in the background.")
        self.ui.compareButton.enabled = problem is None and len(self._methods) > 0

    def onStateChanged(self, old: Optional[RunState], new: RunState) -> None:
        text, enabled = apply_button(new)
        self.ui.applyButton.text = text
        self.ui.applyButton.enabled = enabled
        busy = self.logic.stateMachine.busy
        self.ui.compareButton.enabled = not busy
        for collapsible in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton, self.ui.outputsCollapsibleButton):
            collapsible.enabled = not busy
        if new == RunState.STARTING:
            self.ui.progressBar.value = 0
            self.ui.progressBar.format = _("Preparing: %p%")
        elif new == RunState.CANCELLING:
            self.ui.statusLabel.text = _("Cancelling: stopping the worker and everything it started...")
        elif new == RunState.LOADING:
            self.ui.statusLabel.text = _("Loading the results into the scene...")
        if not busy:
            self._checkCanApply()

    def onProgress(self, fraction: float, stage: str, secondsLeft: Optional[float]) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = progress_text(stage, secondsLeft)
        left = format_duration(secondsLeft)
        self.ui.statusLabel.text = _("{stage} (about {left} left)").format(stage=stage, left=left) if left else stage

    def onLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onApplyButton(self) -> None:
        if self.logic.stateMachine.busy:
            self.logic.cancel()
            return
        self.ui.logTextEdit.clear()
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            self.logic.processParameterNode(self._parameterNode)

    def onCompareButton(self) -> None:
        if self.logic.stateMachine.busy:
            return
        usable = [name for name, info in self._methods.items() if missingInputs(self._parameterNode, info) is None]
        self.ui.logTextEdit.clear()
        with slicer.util.tryWithErrorDisplay(_("Failed to start the comparison."), waitCursor=True):
            self.logic.processParameterNode(self._parameterNode, methods=usable)

    def onFinished(self, run: "JointRegSegRun") -> None:
        if any("description" not in info for info in self._methods.values()):
            # The first description came without torch; requirements are installed now.
            self.logic.describe(self.onDescribed)
        if run.cancelled:
            self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")
            self.ui.progressBar.value = 0
            self.ui.progressBar.format = "%p%"
            return
        if run.error:
            self.ui.statusLabel.text = _("Failed: ") + run.error
            if run.outOfMemory and run.device != "cpu" and slicer.util.confirmOkCancelDisplay(
                _("The GPU ran out of memory:\n\n{error}\n\nRun again on the CPU (slower, uses main memory)?").format(error=run.error)
            ):
                self.ui.deviceComboBox.currentIndex = self.ui.deviceComboBox.findData("cpu")
                self.onApplyButton()
                return
            slicer.util.errorDisplay(_("JointRegSeg ({method}) failed:\n\n{error}").format(method=run.method, error=run.error))
            return
        self.ui.statusLabel.text = _("Finished {method} in {time}.").format(method=run.method, time=format_duration(run.elapsed))
        if run.loaded is not None and not self.logic.pendingMethods:
            self.logic.showResult(run, self._parameterNode.overlay)


def ensureLibraryImportable() -> None:
    """Make ``import JointRegSegLib`` work in Slicer (needed when the module runs from a source checkout)."""
    root = str(library_root(MODULE_DIR))
    if root not in sys.path:
        sys.path.append(root)


def deviceLabel(device: str) -> str:
    """A device as shown in the list."""
    return _("CPU") if device == "cpu" else _("GPU ({device})").format(device=device)


def missingInputs(parameters: Optional[JointRegSegParameterNode], info: dict) -> Optional[str]:
    """Why a run cannot start with these parameters and this method (None when it can)."""
    if parameters is None:
        return _("No parameter node.")
    if info.get("needs_atlas"):  # the moving volume goes to the atlas (the shipped one unless one is chosen)
        if not parameters.movingVolume:
            return _("Select the volume to register to the atlas (moving).")
        if bool(parameters.atlasVolume) != bool(parameters.atlasSegmentation):
            return _("Select both an atlas volume and its segmentation, or neither to use the shipped MNI152 atlas.")
        return None
    if not parameters.fixedVolume or not parameters.movingVolume:
        return _("Select a fixed and a moving volume.")
    if parameters.fixedVolume == parameters.movingVolume:
        return _("The fixed and moving volumes must be different nodes.")
    if not parameters.method:
        return _("No registration method is available yet.")
    if info.get("needs_segmentations") and not (parameters.fixedSegmentation and parameters.movingSegmentation):
        return _("This method needs segmentations of both volumes.")
    return None


#
# Logic
#


@dataclasses.dataclass
class JointRegSegRun:
    """One worker run: its settings, progress, outcome and the nodes it added."""

    method: str
    device: str
    folder: Path
    output: Path
    namePrefix: str
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    loadMetricsTable: bool = True
    process: Optional[BackgroundProcess] = None
    fraction: float = 0.0
    stage: str = ""
    secondsLeft: Optional[float] = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    elapsed: float = 0.0
    metrics: dict = dataclasses.field(default_factory=dict)
    loaded: object = None
    error: Optional[str] = None
    outOfMemory: bool = False
    cancelled: bool = False
    stderrTail: list = dataclasses.field(default_factory=list)


class JointRegSegLogic(ScriptedLoadableModuleLogic):
    """Runs the worker in the background and loads its results; usable from the Python console and tests.

    Scripts: ``run = JointRegSegLogic().process(fixed, moving, method="tto", waitForCompletion=True)``.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.stateMachine = RunStateMachine()
        self.progressCallback: Optional[Callable] = None
        self.logCallback: Optional[Callable] = None
        self.finishedCallback: Optional[Callable] = None
        self.run: Optional[JointRegSegRun] = None
        self.runs: list = []
        self.pendingMethods: list = []
        self.methodInfo: dict = {}  # name -> what the method needs and gives (filled by describe)
        self._pendingSettings: dict = {}
        self._comparison: Optional[dict] = None
        self._polling = False
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)
        self._describeTimer: Optional[qt.QTimer] = None

    def getParameterNode(self) -> JointRegSegParameterNode:
        return JointRegSegParameterNode(super().getParameterNode())

    # Environment

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's Python launcher (PythonSlicer), which the worker runs with."""
        found = shutil.which("PythonSlicer")
        if found:
            return found
        candidate = Path(slicer.app.slicerHome) / "bin" / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
        if candidate.exists():
            return str(candidate)
        return sys.executable

    @staticmethod
    def workerEnvironment() -> dict:
        return python_environment(str(library_root(MODULE_DIR)), base=slicer.util.startupEnvironment())

    def describe(self, callback: Callable) -> None:
        """Ask the worker's Python which methods and devices exist; ``callback(methods, devices, problem)``
        is called on the GUI thread when it answers (without torch: the method names only, and the CPU)."""
        if self._describeTimer is not None:
            self._describeTimer.stop()
        process = BackgroundProcess([self.pythonExecutable(), "-c", DESCRIBE_SCRIPT], env=self.workerEnvironment(), cwd=tempfile.gettempdir())
        timer = qt.QTimer()
        timer.setInterval(200)
        collected = {"events": [], "lines": []}

        def poll():
            out = process.poll()
            collected["events"] += out.events
            collected["lines"] += out.lines
            if not out.finished:
                return
            timer.stop()
            answers = [e for e in collected["events"] if e.get("event") == "describe"]
            if answers:
                callback(answers[-1]["methods"], answers[-1]["devices"], None)
                return
            logging.warning("JointRegSeg: the worker's Python could not describe the methods:\n" + "\n".join(collected["lines"][-20:]))
            callback(self._methodsWithoutTorch(), ["cpu"], _("PyTorch or another requirement is not installed yet; it will be offered on Apply."))

        timer.connect("timeout()", poll)
        timer.start()
        self._describeTimer = timer

    @staticmethod
    def _methodsWithoutTorch() -> list:
        """Method names from the registry (imports no torch), with no details; none if the library is missing."""
        try:
            ensureLibraryImportable()
            from JointRegSegLib.methods import method_names
        except (FileNotFoundError, ImportError):
            logging.exception("JointRegSeg: JointRegSegLib cannot be imported")
            return []
        return [{"name": name, "title": name} for name in method_names()]

    def ensureRequirements(self, askConfirmation: bool = True) -> bool:
        """Install torch (through the PyTorch extension) and Resources/requirements.txt when missing.

        Asks the user first (not when testing); never installs or upgrades numpy or SimpleITK.
        Returns False if the user declined.
        """
        import importlib.util

        askConfirmation = askConfirmation and not slicer.app.testingEnabled()
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError as error:
                raise RuntimeError(_("JointRegSeg needs the PyTorch extension: install it with the Extensions Manager and restart Slicer.")) from error
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                return False
        missing = missing_requirements(read_requirements(MODULE_DIR / "Resources" / "requirements.txt"))
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("JointRegSeg needs these Python packages, which will now be installed into Slicer:\n\n{packages}\n\n"
                  "numpy and SimpleITK stay as Slicer ships them.").format(packages="\n".join(missing))
            ):
                return False
            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
                constraints.write("\n".join(protected_constraints()) + "\n")
            try:
                slicer.util.pip_install(missing + ["--constraint", constraints.name])
            finally:
                os.unlink(constraints.name)
        return True

    # Running

    def processParameterNode(self, parameters: JointRegSegParameterNode, methods: Optional[list] = None, waitForCompletion: bool = False):
        """Run the parameter node's method (or each of ``methods``, to compare them side by side)."""
        return self.process(
            parameters.fixedVolume,
            parameters.movingVolume,
            method=parameters.method,
            methods=methods,
            device=parameters.device or "cpu",
            iterations=parameters.iterations,
            timeBudget=parameters.timeBudget,
            seed=parameters.seed,
            fixedSegmentation=parameters.fixedSegmentation,
            movingSegmentation=parameters.movingSegmentation,
            atlasVolume=parameters.atlasVolume,
            atlasSegmentation=parameters.atlasSegmentation,
            outputFolder=parameters.outputFolder,
            outputName=parameters.outputName,
            waitForCompletion=waitForCompletion,
        )

    def process(
        self,
        fixedVolume: vtkMRMLScalarVolumeNode,
        movingVolume: vtkMRMLScalarVolumeNode,
        method: str = "tto",
        methods: Optional[list] = None,
        device: str = "cpu",
        iterations: Optional[int] = None,
        timeBudget: Optional[float] = None,
        seed: int = 0,
        fixedSegmentation=None,
        movingSegmentation=None,
        atlasVolume=None,
        atlasSegmentation=None,
        outputFolder: str = "",
        outputName: str = "",
        waitForCompletion: bool = False,
    ) -> Optional[JointRegSegRun]:
        """Start registering ``movingVolume`` onto ``fixedVolume`` in the background and return the run.

        With ``methods`` every listed method runs in turn and one metrics table compares them. With
        ``waitForCompletion`` it returns when everything finished (RuntimeError on failure).
        Returns None when the user declined to install requirements.
        """
        if self.stateMachine.busy:
            raise RuntimeError(_("A registration is already running; cancel it or wait for it to finish."))
        atlasOnly = all(self.methodInfo.get(m, {}).get("needs_atlas") for m in (methods or [method]))
        if not movingVolume or not (fixedVolume or atlasOnly):
            raise ValueError(_("Select a fixed and a moving volume."))
        self.stateMachine.go(RunState.STARTING)
        try:
            if not self.ensureRequirements():
                self.stateMachine.go(RunState.IDLE)
                return None
        except Exception:
            self.stateMachine.go(RunState.FAILED)
            raise
        queue = list(methods) if methods else [method]
        self._comparison = {"metrics": {}} if methods else None
        self._pendingSettings = dict(
            fixedVolume=fixedVolume, movingVolume=movingVolume, device=device, iterations=iterations, timeBudget=timeBudget,
            seed=seed, fixedSegmentation=fixedSegmentation, movingSegmentation=movingSegmentation, atlasVolume=atlasVolume,
            atlasSegmentation=atlasSegmentation, outputFolder=outputFolder, outputName=outputName,
        )
        self.pendingMethods = queue[1:]
        self.runs = []
        run = self._start(queue[0])
        if waitForCompletion:
            self.waitForCompletion()
            failed = [r for r in self.runs if r.error]
            if failed:
                raise RuntimeError(f"JointRegSeg ({failed[0].method}) failed: {failed[0].error}")
        return run

    def _start(self, method: str) -> JointRegSegRun:
        """Write the inputs and the job file, then launch the worker (state: starting -> running)."""
        settings = self._pendingSettings
        self.stateMachine.go(RunState.STARTING)
        root = Path(settings["outputFolder"]) if settings["outputFolder"] else Path(slicer.app.temporaryPath) / "JointRegSeg"
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-") + method + "-", dir=root))
        prefix = settings["outputName"] or f"JointRegSeg {method}"
        if self._comparison is not None and settings["outputName"]:
            prefix = f"{settings['outputName']} {method}"
        run = JointRegSegRun(
            method=method, device=settings["device"], folder=folder, output=folder / "output", namePrefix=prefix,
            fixedVolume=settings["atlasVolume"] if self._needsAtlas(method) else settings["fixedVolume"],
            movingVolume=settings["movingVolume"], loadMetricsTable=self._comparison is None,
        )
        self.run = run
        self.runs.append(run)
        try:
            job = self.writeJob(run, settings)
            self._log(f"{method}: inputs written to {folder}")
            run.process = BackgroundProcess(
                worker_command(self.pythonExecutable(), str(job)), env=self.workerEnvironment(), cwd=str(folder)
            )
        except Exception as error:
            run.error = str(error)
            self.stateMachine.go(RunState.FAILED)
            raise
        self.stateMachine.go(RunState.RUNNING)
        self._timer.start()
        return run

    def writeJob(self, run: JointRegSegRun, settings: dict) -> Path:
        """Write the input nodes as NIfTI files and the worker's job file into the run folder."""
        inputs = run.folder / "inputs"
        inputs.mkdir()
        job = {
            "method": run.method,
            "output": str(run.output),
            "moving": self._exportVolume(settings["movingVolume"], inputs / "moving.nii.gz"),
            "device": run.device,
            "seed": int(settings["seed"]),
            "iterations": None if settings["iterations"] is None else int(settings["iterations"]),
            "time_budget": None if settings["timeBudget"] is None else float(settings["timeBudget"]),
            "options": {},
            "pictures": False,
        }
        # An atlas method registers the moving volume to the chosen atlas, or (without one) to the shipped atlas.
        fixed, fixedSegmentation = (
            (settings["atlasVolume"], settings["atlasSegmentation"]) if self._needsAtlas(run.method)
            else (settings["fixedVolume"], settings["fixedSegmentation"])
        )
        if fixed:
            job["fixed"] = self._exportVolume(fixed, inputs / "fixed.nii.gz")
            if fixedSegmentation:
                job["fixed_seg"] = self._exportLabels(fixedSegmentation, fixed, inputs / "fixed_seg.nii.gz")
        if settings["movingSegmentation"]:
            job["moving_seg"] = self._exportLabels(settings["movingSegmentation"], settings["movingVolume"], inputs / "moving_seg.nii.gz")
        path = run.folder / "job.json"
        path.write_text(json.dumps(job, indent=2))
        return path

    def _needsAtlas(self, method: str) -> bool:
        return bool(self.methodInfo.get(method, {}).get("needs_atlas"))

    @staticmethod
    def _exportVolume(node, path: Path) -> str:
        """Write a volume (in world coordinates, without touching its storage node)."""
        if not slicer.util.exportNode(node, str(path), {}, world=True):
            raise RuntimeError(_("Could not write {name} to {path}.").format(name=node.GetName(), path=path))
        return str(path)

    def _exportLabels(self, node, reference, path: Path) -> str:
        """Write a label map, or a segmentation as a label map on ``reference``'s grid (label values kept
        through the segmentation's label-map conversion colour table when it has one)."""
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            return self._exportVolume(node, path)
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "JointRegSeg temporary label map")
        try:
            segmentIds = vtk.vtkStringArray()
            node.GetSegmentation().GetSegmentIDs(segmentIds)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                node, segmentIds, labelmap, reference, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
                node.GetLabelmapConversionColorTableNode(),
            ):
                raise RuntimeError(_("Could not turn {name} into a label map.").format(name=node.GetName()))
            return self._exportVolume(labelmap, path)
        finally:
            slicer.mrmlScene.RemoveNode(labelmap)

    def cancel(self) -> None:
        """Stop the running worker and its whole process tree; nothing is added to the scene."""
        self.pendingMethods = []
        if self.run is not None and self.run.process is not None and self.stateMachine.state == RunState.RUNNING:
            self.run.cancelled = True
            self.stateMachine.go(RunState.CANCELLING)
            self._log(_("Cancelling..."))
            self.run.process.cancel()

    def waitForCompletion(self, timeoutSeconds: Optional[float] = None) -> None:
        """Process events until every queued run finished (for scripts and tests)."""
        deadline = None if timeoutSeconds is None else time.monotonic() + timeoutSeconds
        while self.stateMachine.busy:
            self._poll()
            slicer.app.processEvents()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(_("JointRegSeg did not finish within {seconds} s.").format(seconds=timeoutSeconds))
            time.sleep(0.05)

    def _poll(self) -> None:
        if self._polling or self.run is None or self.run.process is None:
            return
        self._polling = True
        try:
            run = self.run
            out = run.process.poll()
            for event in out.events:
                self._handleEvent(run, event)
            for line in out.lines:
                run.stderrTail = (run.stderrTail + [line])[-40:]
                self._log(line)
            if out.finished:
                self._timer.stop()
                self._finish(run, out.exit_code)
        finally:
            self._polling = False

    def _handleEvent(self, run: JointRegSegRun, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            run.fraction = float(event.get("fraction") or 0.0)
            run.stage = str(event.get("stage") or "")
            run.secondsLeft = event.get("seconds_left")
            if self.progressCallback:
                self.progressCallback(run.fraction, f"{run.method}: {run.stage}", run.secondsLeft)
        elif kind == "log":
            self._log(f"{run.method}: {event.get('message', '')}")
        elif kind == "result":
            run.metrics = event.get("metrics") or {}
        elif kind == "error":
            run.error = str(event.get("message") or _("the worker failed."))
            run.outOfMemory = "out of memory" in run.error.lower()

    def _finish(self, run: JointRegSegRun, exitCode: Optional[int]) -> None:
        run.elapsed = time.monotonic() - run.started
        if run.cancelled:
            self._log(_("{method}: cancelled.").format(method=run.method))
            shutil.rmtree(run.folder, ignore_errors=True)
            self.stateMachine.go(RunState.IDLE)
            self._notifyFinished(run)
            return
        if exitCode != 0 or run.error:
            run.error = run.error or _("the worker stopped with exit code {code}:\n{tail}").format(code=exitCode, tail="\n".join(run.stderrTail[-10:]))
            self._log(f"{run.method}: {run.error}")
            shutil.rmtree(run.folder / "inputs", ignore_errors=True)
            self.stateMachine.go(RunState.FAILED)
            self._notifyFinished(run)
            self._next()
            return
        self.stateMachine.go(RunState.LOADING)
        try:
            ensureLibraryImportable()
            from JointRegSegLib import mrml

            run.loaded = mrml.load_result(
                slicer.mrmlScene, run.output, run.fixedVolume, run.movingVolume, name_prefix=run.namePrefix,
                metrics_table=run.loadMetricsTable,
            )
            run.metrics = run.loaded.metrics or run.metrics
        except Exception as error:
            logging.exception("JointRegSeg: loading the results failed")
            run.error = _("the results could not be loaded: {error}").format(error=error)
            self.stateMachine.go(RunState.FAILED)
            self._notifyFinished(run)
            self._next()
            return
        finally:
            shutil.rmtree(run.folder / "inputs", ignore_errors=True)
        self._log(_("{method}: finished in {time}; results in {folder}").format(method=run.method, time=format_duration(run.elapsed), folder=run.output))
        if self._comparison is not None:
            self._comparison["metrics"][run.method] = run.metrics
        if not self._next():
            self.stateMachine.go(RunState.IDLE)
        self._notifyFinished(run)

    def _next(self) -> bool:
        """Start the next method of a comparison; at the end build its table. True if one started."""
        while self.pendingMethods:
            method = self.pendingMethods.pop(0)
            try:
                self._start(method)
                return True
            except Exception as error:
                self._log(f"{method}: {error}")
        if self._comparison is not None and self._comparison["metrics"]:
            from JointRegSegLib import mrml

            table = mrml.add_metrics_table(slicer.mrmlScene, self._comparison["metrics"], "JointRegSeg comparison")
            self._comparison["table"] = table.GetID()
            self._log(_("Comparison table: {name}").format(name=table.GetName()))
            slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            self._showTable(table.GetID())
        return False

    def _notifyFinished(self, run: JointRegSegRun) -> None:
        if self.finishedCallback:
            self.finishedCallback(run)

    def _log(self, text: str) -> None:
        logging.info(f"JointRegSeg: {text}")
        if self.logCallback:
            self.logCallback(text)

    # Showing results

    def showResult(self, run: JointRegSegRun, overlay: str = OVERLAYS[0]) -> None:
        """Show the fixed volume with the warped volume or a map over it in every slice view."""
        from JointRegSegLib import mrml

        loaded = run.loaded
        foreground = {OVERLAYS[0]: loaded.warped, OVERLAYS[1]: loaded.jacobian, OVERLAYS[2]: loaded.pmm}.get(overlay) or loaded.warped
        mrml.show_in_slice_views(slicer.mrmlScene, run.fixedVolume.GetID(), foreground, 0.5, slicer.app.applicationLogic())
        if loaded.table:
            self._showTable(loaded.table)

    @staticmethod
    def _showTable(tableId: str) -> None:
        appLogic = slicer.app.applicationLogic()
        appLogic.GetSelectionNode().SetActiveTableID(tableId)
        appLogic.PropagateTableSelection()


#
# Test
#


class JointRegSegTest(ScriptedLoadableModuleTest):
    """Runs the logic on small synthetic volumes it makes itself (CPU, a few iterations)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RegistrationAddsResults()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()

    @staticmethod
    def _makePair(size: int = 32):
        """A bright ellipsoid with an inner structure, and the same shifted by 2 voxels along each axis."""
        import numpy as np

        k, j, i = np.meshgrid(*(np.arange(size, dtype=np.float32),) * 3, indexing="ij")
        centre = (size - 1) / 2.0

        def phantom(shift: float):
            r = np.sqrt(((i - centre - shift) / 11.0) ** 2 + ((j - centre - shift) / 9.0) ** 2 + ((k - centre - shift) / 8.0) ** 2)
            inner = np.sqrt(((i - centre - shift - 3) / 4.0) ** 2 + ((j - centre - shift) / 3.0) ** 2 + ((k - centre - shift) / 3.0) ** 2)
            return (200.0 * (r < 1) - 120.0 * (inner < 1)).clip(0).astype(np.float32)

        fixed = slicer.util.addVolumeFromArray(phantom(0.0), nodeName="JointRegSegTest fixed")
        moving = slicer.util.addVolumeFromArray(phantom(2.0), nodeName="JointRegSegTest moving")
        for node in (fixed, moving):
            node.SetSpacing(2.0, 2.0, 2.0)
        return fixed, moving

    def test_RegistrationAddsResults(self):
        self.delayDisplay("Registering two synthetic volumes")
        fixed, moving = self._makePair()
        movingBefore = slicer.util.arrayFromVolume(moving).copy()
        logic = JointRegSegLogic()
        run = logic.process(fixed, moving, method="tto", device="cpu", iterations=3, timeBudget=60, waitForCompletion=True)
        loaded = run.loaded
        self.assertIsNone(run.error)
        transform = slicer.mrmlScene.GetNodeByID(loaded.transform)
        self.assertTrue(transform.IsA("vtkMRMLGridTransformNode"))
        from JointRegSegLib import mrml

        self.assertEqual(transform.GetNodeReference(mrml.MOVING_ROLE).GetID(), moving.GetID())
        warped = slicer.mrmlScene.GetNodeByID(loaded.warped)
        self.assertEqual(slicer.util.arrayFromVolume(warped).shape, slicer.util.arrayFromVolume(fixed).shape)
        jacobian = slicer.util.arrayFromVolume(slicer.mrmlScene.GetNodeByID(loaded.jacobian))
        self.assertTrue((jacobian > 0).mean() > 0.99)
        table = slicer.mrmlScene.GetNodeByID(loaded.table)
        self.assertGreater(table.GetNumberOfRows(), 5)
        self.assertGreaterEqual(run.metrics["ncc"], run.metrics["ncc_initial"] - 0.05)
        self.assertTrue((slicer.util.arrayFromVolume(moving) == movingBefore).all(), "the moving volume was modified")
        self.assertIsNone(moving.GetParentTransformNode())
        self.delayDisplay("Test passed")

    def test_CancelLeavesSceneUnchanged(self):
        self.delayDisplay("Cancelling a run")
        fixed, moving = self._makePair()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        logic = JointRegSegLogic()
        run = logic.process(fixed, moving, method="tto", device="cpu", iterations=100000, timeBudget=600)
        deadline = time.monotonic() + 120
        while run.fraction <= 0.05 and logic.stateMachine.busy and time.monotonic() < deadline:
            logic._poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        logic.cancel()
        logic.waitForCompletion(timeoutSeconds=60)
        self.assertTrue(run.cancelled)
        self.assertEqual(logic.stateMachine.state, RunState.IDLE)
        self.assertIsNotNone(run.process.process.poll(), "the worker is still running")
        self.assertFalse(run.output.exists(), "a cancelled run left an output folder")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Test passed")
