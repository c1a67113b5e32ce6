"""The controller every view shares (the Slicer module, the web page): runs, progress, cancel, results.

Qt-free and torch-free. A view builds one `Controller` for its MRML scene and the worker's Python,
calls `poll` every ~100 ms from its own loop (a QTimer in Slicer, the server loop on the web, `wait`
in scripts and tests), and listens through the ``on_*`` callbacks. The controller

- checks a request against what the method needs (`request.problem`), in the user's words;
- writes the input nodes to files (`mrml.export`: world coordinates, segmentations through a colour
  table of its own; uncompressed, as are the results of a run without an output folder of the user's:
  files written once and read once), writes the job file and hands it to a worker in the background;
- keeps one worker started ahead of the next job (``prestart``): its imports (about 2 s on 2 cores)
  run while the user chooses the inputs, or while the previous results load, instead of after Apply.
  It starts once the dependency check found torch, and again at the end of each run; it ends with
  `shutdown`, a new dependency check, or the end of its stdin (Slicer gone);
- turns the worker's events into progress (fraction, stage, time left) and log lines;
- cancels the whole worker tree (SIGTERM, then SIGKILL after a grace period, by a watchdog that
  does not depend on `poll`), also when the scene is closed, and stops everything on `shutdown`;
- loads finished results into the scene (`mrml.load_result`) and, for a comparison, queues the
  methods one after another and builds one metrics table with a column per method;
- knows what is installed (`environment.Dependencies`) and runs an install the view confirmed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import InputError
from ..labels import codes_for_names
from ..methods.catalogue import CATALOGUE, MethodInfo, method_info, method_names
from .environment import (
    DESCRIBE_SCRIPT,
    Dependencies,
    dependencies,
    missing_requirements,
    protected_constraints,
    read_requirements,
    worker_command,
    worker_environment,
)
from .process import BackgroundProcess
from .request import RunRequest, problem
from .state import RunState, RunStateMachine

OVERLAYS = ("Warped volume", "Jacobian determinant", "PMM (local alignment)")
STDERR_LINES = 40


@dataclass
class Run:
    """One worker run: its settings, progress, outcome and the nodes it added."""

    method: str
    device: str
    folder: Path
    output: Path
    name_prefix: str
    fixed_id: Optional[str]
    moving_id: str
    position: str = ""
    load_table: bool = True
    process: Optional[BackgroundProcess] = None
    fraction: float = 0.0
    stage: str = ""
    seconds_left: Optional[float] = None
    started: float = field(default_factory=time.monotonic)
    elapsed: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    loaded: Any = None
    atlas_id: Optional[str] = None
    error: Optional[str] = None
    out_of_memory: bool = False
    cancelled: bool = False
    stderr_tail: list[str] = field(default_factory=list)

    @property
    def background_id(self) -> Optional[str]:
        """The volume the results lie on: the fixed volume, or the atlas the run registered to."""
        return self.fixed_id or self.atlas_id


class Controller:
    """Runs registrations for one MRML scene in background worker processes (see the module docstring)."""

    def __init__(
        self,
        scene: Any,
        python: Optional[str],
        work_root: Path,
        requirements: Path,
        app_logic: Any = None,
        environment: Optional[dict[str, str]] = None,
        prestart: bool = True,
    ) -> None:
        self.scene = scene
        self.prestart = prestart
        self.python = python
        self.work_root = Path(work_root)
        self.requirements = Path(requirements)
        self.app_logic = app_logic
        self.environment = worker_environment(environment)
        self.state = RunStateMachine()
        self.on_progress: Optional[Callable[[Run], None]] = None
        self.on_log: Optional[Callable[[str], None]] = None
        self.on_finished: Optional[Callable[[Run], None]] = None
        self.on_dependencies: Optional[Callable[[Dependencies], None]] = None
        self.run: Optional[Run] = None
        self.runs: list[Run] = []
        self.comparison_table: Optional[str] = None
        self.dependencies = dependencies(self.requirements)
        self._request: Optional[RunRequest] = None
        self._pending: list[str] = []
        self._comparison: Optional[dict[str, dict[str, Any]]] = None
        self._describe: Optional[BackgroundProcess] = None
        self._spare: Optional[BackgroundProcess] = None
        self._closed = False  # after `shutdown`: no worker is started ahead any more
        self._describe_events: list[dict[str, Any]] = []
        self._describe_lines: list[str] = []
        self._polling = False
        import slicer

        self._scene_observer = scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, self._on_scene_closing)

    # What there is

    @staticmethod
    def methods() -> list[MethodInfo]:
        """Every method, whatever is installed."""
        return [CATALOGUE[name] for name in method_names()]

    @property
    def devices(self) -> list[str]:
        return self.dependencies.devices

    def check(self, request: RunRequest, method: str) -> Optional[str]:
        """Why ``request`` cannot run with ``method`` (None when it can)."""
        if method not in CATALOGUE:
            return f"Unknown method '{method}'."
        return problem(request, method_info(method))

    def comparable(self, request: RunRequest) -> list[str]:
        """The methods "compare all" runs: those that register the moving volume onto the fixed volume and can
        run with ``request`` (an atlas method registers to its atlas instead, so its numbers would not compare)."""
        return [info.name for info in self.methods() if not info.needs_atlas and self.check(request, info.name) is None]

    def refresh_dependencies(self) -> Dependencies:
        """Re-read what is installed; ask the worker's Python which devices torch can use (answer via `poll`)."""
        self.dependencies = dependencies(self.requirements)
        self._stop_spare()  # it may hold modules from before an install
        if self._describe is not None:
            self._describe.stop()
            self._describe = None
        if self.python is None:
            self.dependencies.problem = "No Python to run the computation with was found."
        elif self.dependencies.torch is not None:
            self._describe_events, self._describe_lines = [], []
            self._describe = BackgroundProcess(
                [self.python, "-c", DESCRIBE_SCRIPT], env=self.environment, cwd=tempfile.gettempdir()
            )
        self._notify(self.on_dependencies, self.dependencies)
        return self.dependencies

    def install(self, install_torch: Callable[[], bool], pip_install: Callable[[list[str]], None]) -> bool:
        """Install what is missing (the view asked the user first): torch through ``install_torch`` (in Slicer, the
        PyTorch extension; returns False when declined), then the other requirements through ``pip_install``
        with constraints that keep the installed numpy and SimpleITK. Returns False when torch was declined."""
        self.state.go(RunState.INSTALLING)
        try:
            if self.dependencies.torch is None and not install_torch():
                self.state.go(RunState.IDLE)
                return False
            missing = missing_requirements(read_requirements(self.requirements))
            if missing:
                with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
                    constraints.write("\n".join(protected_constraints()) + "\n")
                try:
                    self._log("Installing: " + ", ".join(missing))
                    pip_install(missing + ["--constraint", constraints.name])
                finally:
                    Path(constraints.name).unlink()
        except Exception:
            self.state.go(RunState.FAILED)
            self.refresh_dependencies()
            raise
        self.state.go(RunState.IDLE)
        self.refresh_dependencies()
        return True

    # Running

    def start(self, request: RunRequest, methods: list[str]) -> Run:
        """Start ``methods`` one after another on ``request`` (several: a comparison with one metrics table)."""
        if self.state.busy:
            raise InputError("A registration is already running; cancel it or wait for it to finish.")
        if not methods:
            raise InputError("Choose a method.")
        for method in methods:
            reason = self.check(request, method)
            if reason:
                raise InputError(reason)
        if self.python is None:
            raise InputError("No Python to run the computation with was found; see the Dependencies section.")
        if not self.dependencies.ready:
            raise InputError("PyTorch or another requirement is missing: install them first (Dependencies).")
        self._request = request
        self._pending = list(methods[1:])
        self._comparison = {} if len(methods) > 1 else None
        self.comparison_table = None
        self.runs = []
        return self._start(methods[0], len(methods))

    def _start(self, method: str, total: int) -> Run:
        """Write the inputs and the job file, then launch the worker (state: starting -> running)."""
        request = self._request
        self.state.go(RunState.STARTING)
        root = Path(request.output_folder) if request.output_folder else self.work_root
        folder = None
        try:
            root.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-") + method + "-", dir=root))
            prefix = f"{request.output_name} {method}".strip() if request.output_name else f"JointRegSeg {method}"
            atlas = method_info(method).needs_atlas
            fixed = request.atlas if atlas else request.fixed
            run = Run(
                method=method, device=request.device, folder=folder, output=folder / "output", name_prefix=prefix,
                fixed_id=fixed.GetID() if fixed is not None else None, moving_id=request.moving.GetID(),
                position=f" ({len(self.runs) + 1}/{total})" if total > 1 else "", load_table=self._comparison is None,
            )
            job = self._write_job(run, request, fixed, request.atlas_segmentation if atlas else request.fixed_segmentation)
            self._log(f"{method}: inputs written to {folder}")
            run.process = self._worker(job, folder)
        except Exception:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            self.state.go(RunState.FAILED)
            raise
        self.run = run
        self.runs.append(run)
        self.state.go(RunState.RUNNING)
        return run

    def _write_job(self, run: Run, request: RunRequest, fixed: Any, fixed_segmentation: Any) -> Path:
        """Write the input nodes as NIfTI files and the worker's job file into the run folder."""
        from ..mrml import export

        inputs = run.folder / "inputs"
        inputs.mkdir()
        job: dict[str, Any] = {
            "method": run.method,
            "output": str(run.output),
            "moving": str(export.write_volume(self.scene, request.moving, inputs / "moving.nii")),
            "device": run.device,
            "seed": int(request.seed),
            "options": dict(request.options),
            "pictures": False,
            "compress": bool(request.output_folder),  # scratch results are read once, by the scene: not compressed
            "jacobian": "whole" if request.whole_jacobian else "deformable",
        }
        if method_info(run.method).supports_tto:  # the panel's iterations and time budget are for these only
            job["iterations"] = None if request.iterations is None else int(request.iterations)
            job["time_budget"] = None if request.time_budget is None else float(request.time_budget)
        segmentations = [s for s in (fixed_segmentation, request.moving_segmentation) if s is not None]
        names = [name for s in segmentations if s.IsA("vtkMRMLSegmentationNode") for name in export.segment_names(s)]
        codes = codes_for_names(names)  # one table for both, so the same structure gets the same code
        if fixed is not None:
            job["fixed"] = str(export.write_volume(self.scene, fixed, inputs / "fixed.nii"))
            if fixed_segmentation is not None:
                job["fixed_seg"] = str(export.write_labels(self.scene, fixed_segmentation, fixed, inputs / "fixed_seg.nii", codes))
        if request.moving_segmentation is not None:
            job["moving_seg"] = str(
                export.write_labels(self.scene, request.moving_segmentation, request.moving, inputs / "moving_seg.nii", codes)
            )
        path = run.folder / "job.json"
        path.write_text(json.dumps(job, indent=2))
        return path

    def poll(self) -> None:
        """Handle everything the worker (and the dependency check) said since the last call."""
        if self._polling:
            return
        self._polling = True
        try:
            self._poll_describe()
            run = self.run
            if run is None or run.process is None or not run.process.running:
                return
            out = run.process.poll()
            for event in out.events:
                self._handle_event(run, event)
            for line in out.lines:
                run.stderr_tail = (run.stderr_tail + [line])[-STDERR_LINES:]
            if out.finished:
                self._finish(run, out.exit_code)
        finally:
            self._polling = False

    def wait(self, timeout: Optional[float] = None, idle: Optional[Callable[[], None]] = None) -> None:
        """Poll until every queued run finished (scripts and tests); ``idle`` runs between polls (e.g. GUI events)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state.busy or (self._describe is not None and self._describe.running):
            self.poll()
            if idle is not None:
                idle()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"JointRegSeg did not finish within {timeout} s.")
            time.sleep(0.05)

    def cancel(self) -> None:
        """Stop the running worker and its whole process tree and drop the queue; nothing is added to the scene."""
        self._pending = []
        self._comparison = None
        run = self.run
        if run is not None and run.process is not None and self.state.state == RunState.RUNNING:
            run.cancelled = True
            self.state.go(RunState.CANCELLING)
            self._log(f"{run.method}: cancelling...")
            run.process.cancel()

    def shutdown(self) -> None:
        """Stop everything now and wait for the processes to end (module clean-up, application exit)."""
        self._closed = True
        self.cancel()
        self._stop_spare()
        for process in (self.run.process if self.run else None, self._describe):
            if process is not None and process.process.poll() is None:
                process.stop()
        if self.run is not None and self.run.cancelled:
            shutil.rmtree(self.run.folder, ignore_errors=True)
        if self._scene_observer is not None:
            self.scene.RemoveObserver(self._scene_observer)
            self._scene_observer = None

    def _on_scene_closing(self, caller: Any = None, event: Any = None) -> None:
        """The scene is being closed: the run's nodes go away, so the run is cancelled and nothing is loaded."""
        if self.state.state == RunState.RUNNING:
            self._log("The scene is closing: the registration is cancelled.")
        self.cancel()

    # Events and the end of a run

    def _handle_event(self, run: Run, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            run.fraction = float(event.get("fraction") or 0.0)
            run.stage = f"{run.method}{run.position}: {event.get('stage') or ''}"
            run.seconds_left = event.get("seconds_left")
            self._notify(self.on_progress, run)
        elif kind == "log":
            self._log(f"{run.method}: {event.get('message', '')}")
        elif kind == "result":
            run.metrics = event.get("metrics") or {}
        elif kind == "error":
            run.error = str(event.get("message") or "the worker failed.")
            run.out_of_memory = "out of memory" in run.error.lower()

    def _finish(self, run: Run, exit_code: Optional[int]) -> None:
        run.elapsed = time.monotonic() - run.started
        self._start_spare()  # its imports overlap the loading of these results
        if run.cancelled:
            self._log(f"{run.method}: cancelled; nothing was added to the scene.")
            shutil.rmtree(run.folder, ignore_errors=True)
            self.state.go(RunState.IDLE)
            self._notify(self.on_finished, run)
            return
        if exit_code != 0 or run.error:
            tail = "\n".join(run.stderr_tail[-10:])
            run.error = run.error or f"the worker stopped with exit code {exit_code}:\n{tail}"
            self._log(f"{run.method} failed: {run.error}")
            shutil.rmtree(run.folder / "inputs", ignore_errors=True)
            self.state.go(RunState.FAILED)
            self._notify(self.on_finished, run)
            self._next()
            return
        self.state.go(RunState.LOADING)
        try:
            self._load(run)
        except Exception as error:
            run.error = f"the results could not be loaded: {error}"
            self._log(f"{run.method}: {run.error}")
            self.state.go(RunState.FAILED)
            self._notify(self.on_finished, run)
            self._next()
            return
        finally:
            shutil.rmtree(run.folder / "inputs", ignore_errors=True)
        self._log(f"{run.method}: finished in {run.elapsed:.0f} s; files in {run.output}")
        if self._comparison is not None:
            self._comparison[run.method] = run.metrics
        if not self._next():
            self.state.go(RunState.IDLE)
        self._notify(self.on_finished, run)

    def _load(self, run: Run) -> None:
        """Add the run's results to the scene; a run on the shipped atlas also adds the atlas (its background)."""
        from .. import mrml

        fixed = self.scene.GetNodeByID(run.fixed_id) if run.fixed_id else None
        moving = self.scene.GetNodeByID(run.moving_id)
        atlas = None
        if run.fixed_id is None:
            used = json.loads((run.output / "provenance.json").read_text())["job"]["fixed"]
            atlas = mrml.read_volume(self.scene, Path(used), f"{run.name_prefix} atlas")
            run.atlas_id = atlas.GetID()
        try:
            run.loaded = mrml.load_result(
                self.scene, run.output, fixed if fixed is not None else atlas, moving, name_prefix=run.name_prefix,
                metrics_table=run.load_table,
            )
        except BaseException:
            if atlas is not None:
                mrml.remove_node(self.scene, atlas)
            raise
        if atlas is not None:
            mrml.move_into_folder(self.scene, atlas, run.loaded.folder_item)
        run.metrics = run.loaded.metrics or run.metrics

    def _next(self) -> bool:
        """Start the next method of a comparison; at its end build the table. True if one started."""
        while self._pending:
            method = self._pending.pop(0)
            try:
                self._start(method, len(self.runs) + len(self._pending) + 1)
                return True
            except Exception as error:
                self._log(f"{method} could not start: {error}")
        if self._comparison:
            from .. import mrml

            name = f"{self._request.output_name or 'JointRegSeg'} comparison"
            self.comparison_table = mrml.add_metrics_table(self.scene, self._comparison, name).GetID()
            self._log(f"Comparison table: {name}")
        self._comparison = None
        return False

    # Workers

    def _worker(self, job: Path, folder: Path) -> BackgroundProcess:
        """A worker running ``job``: the one started ahead (`_start_spare`) where it is still alive, else a new one."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.process.poll() is None:
            try:
                spare.send(str(job))
                return spare
            except OSError:  # it ended between the check and the write: a new one runs the job
                pass
        return BackgroundProcess(worker_command(self.python, job), env=self.environment, cwd=str(folder))

    def _start_spare(self) -> None:
        """Start a worker ahead of the next job (module docstring), unless one is there or it cannot run."""
        if self._closed or not self.prestart or self._spare is not None or self.python is None or not self.dependencies.ready:
            return
        self.work_root.mkdir(parents=True, exist_ok=True)
        self._spare = BackgroundProcess(worker_command(self.python), env=self.environment, cwd=str(self.work_root), stdin=True)

    def _stop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None and spare.process.poll() is None:
            spare.stop()

    # Showing results

    def show(self, run: Run, overlay: str = OVERLAYS[0], opacity: float = 0.5) -> None:
        """Show the run's background (fixed volume or atlas) with the warped volume or a map over it in every slice view."""
        from .. import mrml

        loaded = run.loaded
        foreground = {OVERLAYS[0]: loaded.warped, OVERLAYS[1]: loaded.jacobian, OVERLAYS[2]: loaded.pmm}.get(overlay) or loaded.warped
        mrml.show_in_slice_views(self.scene, run.background_id, foreground, opacity, self.app_logic)
        table = self.comparison_table or loaded.table
        if table and self.app_logic is not None:
            mrml.show_table(self.app_logic, table)

    # Helpers

    def _poll_describe(self) -> None:
        process = self._describe
        if process is None:
            return
        out = process.poll()
        self._describe_events += out.events
        self._describe_lines += out.lines
        if not out.finished:
            return
        self._describe = None
        answers = [e for e in self._describe_events if e.get("event") == "describe"]
        if answers:
            self.dependencies = dependencies(self.requirements, answers[-1])
            if not self.state.busy:  # a run's end starts one otherwise
                self._start_spare()
        else:
            tail = " ".join(self._describe_lines[-3:])
            self.dependencies = dependencies(self.requirements, problem=f"PyTorch could not be loaded: {tail}")
        self._notify(self.on_dependencies, self.dependencies)

    def _log(self, text: str) -> None:
        self._notify(self.on_log, text)

    @staticmethod
    def _notify(callback: Optional[Callable[[Any], None]], value: Any) -> None:
        if callback is not None:
            callback(value)
