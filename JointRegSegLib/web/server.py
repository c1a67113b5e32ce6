"""`jointregseg web`: the app controller (`JointRegSegLib.app.Controller`) behind a browser page on real Slicer views.

One process holds one MRML scene (trame-slicer's `SlicerApp`: slicer-core's scene, logics and
slice/3D views rendered offscreen and streamed to the page) and one `Controller` on it, polled
every `POLL_SECONDS` by the server's event loop. Every browser tab on the page shares that scene
and its state (a demo: all see the same inputs, views and progress); only these differ per tab,
by its ``viewer_id``: who started the run (only that tab may cancel it; a Run from another tab is
refused with a message) and the messages meant for one tab (a refused run, an upload's outcome).

Files come only through `files.FileStore` (the bundled sample pair, ``--data``, the uploads
folder); uploads and downloads go through `routes`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ..app import Controller, RunRequest, RunState, describe_method, device_label, format_duration
from ..app.environment import library_root
from ..errors import InputError
from ..methods.catalogue import CATALOGUE, method_info
from ..methods.options import validate_setting
from ..sample_data import FILES as SAMPLE_FILES
from ..sample_data import sample_dir
from . import panels, routes
from .files import SAMPLE, FileStore
from .results import metrics_view, node_names
from .scene import place_legends, set_colour_table
from .views import (
    BEFORE,
    BEFORE_LEGEND,
    CHECKERBOARD,
    LEGEND_POSITION,
    LEGEND_SIZE,
    LEGEND_TITLE_WIDTH,
    OUTLINES,
    OVERLAY_COLOURS,
    OVERLAYS,
    RESULT_OVERLAYS,
    WARPED,
    annotate_slice_view,
    apply_overlay,
    show_before,
)

POLL_SECONDS = 0.1
LOG_LINES = 200
REQUIREMENTS = library_root() / "JointRegSeg" / "Resources" / "requirements.txt"
INPUT_FIELDS: dict[str, tuple[bool, str]] = {
    # state name: (a label map?, the name the command line's reader gives it in messages)
    "fixed_file": (False, "fixed image"),
    "moving_file": (False, "moving image"),
    "fixed_seg_file": (True, "fixed label map"),
    "moving_seg_file": (True, "moving label map"),
    "atlas_file": (False, "atlas"),
    "atlas_seg_file": (True, "atlas label map"),
}
STATE_TEXT = {
    RunState.IDLE: "Ready",
    RunState.INSTALLING: "Installing...",
    RunState.STARTING: "Starting...",
    RunState.RUNNING: "Running",
    RunState.CANCELLING: "Cancelling...",
    RunState.LOADING: "Loading results...",
    RunState.FAILED: "Ready (last run failed)",
}
REFUSED_RUN = "A registration started by another viewer is running; its progress is shown here. Wait for it to finish."
THREE_D_AZIMUTH, THREE_D_ELEVATION = -35.0, 25.0
VIEW_TITLES = {"Red": "Axial", "Green": "Coronal", "Yellow": "Sagittal"}

logger = logging.getLogger(__name__)


class WebApp:
    """The page's server side: scene and views, the controller, the page's state and its handlers."""

    def __init__(self, store: FileStore, work: Path, server: Any = None) -> None:
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import SlicerApp

        from ..mrml.core import register_node_classes

        self.store = store
        self.server = server or get_server(name="jointregseg", client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.state, self.ctrl = self.server.state, self.server.controller
        self.slicer = SlicerApp()
        self.scene = self.slicer.scene
        register_node_classes(self.scene)
        self.layout_manager = self._views()

        self.controller = Controller(self.scene, sys.executable, work / "runs", REQUIREMENTS, app_logic=self.slicer.app_logic)
        self.controller.on_progress = self._on_progress
        self.controller.on_log = self._on_log
        self.controller.on_finished = self._on_finished
        self.controller.on_dependencies = self._on_dependencies
        self.controller.state.listeners.append(self._on_state)
        self.owner = ""  # the viewer whose run goes
        self.nodes: dict[tuple[str, bool], str] = {}  # (file id, as label map) -> node id
        self.finished: list[Any] = []  # the runs whose results are in the scene, in order
        self.tables: dict[str, str] = {}  # run output folder -> its metrics table (a comparison's shared one)
        self.checkerboards: dict[str, str] = {}
        self._log_lines: list[str] = []
        self.started = time.monotonic()

        self._initial_state()
        self._bind()
        panels.build(self.server, self.layout_manager)
        self.ctrl.on_server_bind.add(lambda wslink_server: routes.add_routes(wslink_server, self))
        self.ctrl.on_server_ready.add_task(self._poll_loop)
        self.controller.refresh_dependencies()
        self._inputs_changed(new_inputs=True)

    # Set-up

    def _views(self) -> Any:
        """Axial and 3D above, coronal and sagittal below; slice views linked, labelled and shown in 3D."""
        from trame_slicer.core import LayoutManager
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

        register_rca_factories(self.slicer.view_manager, self.server)
        layout_manager = LayoutManager(self.scene, self.slicer.view_manager, self.server)
        views = ViewLayoutDefinition
        row = LayoutDirection.Horizontal
        grid = Layout(
            LayoutDirection.Vertical,
            [Layout(row, [views.axial_view(), views.threed_view()]), Layout(row, [views.coronal_view(), views.sagittal_view()])],
        )
        layout_manager.register_layout("four-up", grid)
        layout_manager.set_layout("four-up")
        for view in self.slicer.view_manager.get_slice_views():
            annotate_slice_view(view, VIEW_TITLES.get(view.get_singleton_tag(), view.get_singleton_tag()))
            view.set_visible_in_3d(True)
        composites = self.scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        for index in range(composites.GetNumberOfItems()):
            composites.GetItemAsObject(index).SetLinkedControl(True)
        return layout_manager

    def _initial_state(self) -> None:
        self.state.client_only("viewer_id")
        sample = {key: f"{SAMPLE}/{name}" for key, name in SAMPLE_FILES.items()}
        self.state.update(
            {
                "trame__title": "JointRegSeg",
                "viewer_id": "",
                "files": self._file_items(),
                "fixed_file": sample["fixed"],
                "moving_file": sample["moving"],
                "fixed_seg_file": sample["fixed_seg"],
                "moving_seg_file": sample["moving_seg"],
                "atlas_file": None,
                "atlas_seg_file": None,
                "input_errors": {},
                "max_upload_mb": self.store.max_upload_bytes // (1024 * 1024),
                "methods": [{"title": f"{info.name}: {info.title}", "value": info.name} for info in Controller.methods()],
                "method": "tto",
                "method_text": "",
                "supports_tto": True,
                "show_fixed": True,
                "show_atlas": False,
                "devices": [{"title": device_label("cpu"), "value": "cpu"}],
                "device": "cpu",
                "iterations": None,
                "time_budget": None,
                "whole_jacobian": False,
                "seed": 0,
                "dependencies_text": "",
                "run_state": RunState.IDLE.value,
                "run_state_text": STATE_TEXT[RunState.IDLE],
                "busy": False,
                "run_owner": "",
                "progress": 0,
                "progress_text": "",
                "status": "",
                "notices": {},
                "result": None,
                "results": [],
                "overlay": BEFORE,
                "overlays": self._overlay_items(False),
                "opacity": 0.5,
                "overlay_opacity": True,
                "legend": BEFORE_LEGEND.as_dict(),
                "metrics": {"columns": [], "rows": []},
                "all_rows": False,
                "downloads": [],
                "scene_nodes": [],
                "log": "",
            }
        )

    def _bind(self) -> None:
        self.state.change(*INPUT_FIELDS)(lambda **_: self._inputs_changed(new_inputs=True))
        self.state.change("method")(lambda **_: self._method_changed())
        self.state.change("overlay", "opacity", "result")(lambda **_: self._show())
        self.ctrl.run_clicked = self.run_clicked
        self.ctrl.compare_clicked = self.compare_clicked
        self.ctrl.notice_closed = lambda viewer: self._notify(viewer, "")

    # Inputs

    def _file_items(self) -> list[dict[str, str]]:
        return [{"title": entry.label, "value": entry.id} for entry in self.store.files()]

    def _node(self, field: str) -> Any:
        """The scene node of the file chosen in ``field`` (loaded once, after the command line's checks)."""
        file_id = self.state[field]
        if not file_id:
            return None
        if not isinstance(file_id, str):
            raise InputError("Choose a file from the list.")
        labels, name = INPUT_FIELDS[field]
        key = (file_id, labels)
        node = self.scene.GetNodeByID(self.nodes[key]) if key in self.nodes else None
        if node is None:
            from .. import mrml

            path = self.store.check(file_id, labels=labels, name=name)
            node = mrml.read_volume(self.scene, path, Path(file_id).name.split(".")[0], labels=labels)
            if field == "moving_file":  # red over the grey fixed image
                set_colour_table(node, OVERLAY_COLOURS)
            self.nodes[key] = node.GetID()
        return node

    def _inputs_changed(self, new_inputs: bool = False) -> None:
        """Load the chosen files (each refusal shown under its list); new inputs are shown before registration."""
        errors: dict[str, list[str]] = {}
        for field in INPUT_FIELDS:
            try:
                self._node(field)
            except InputError as error:
                errors[field] = [str(error)]
        self.state.input_errors = errors
        self._method_changed()
        if new_inputs:
            self.state.update({"result": None, "overlay": BEFORE})
        self._show(fit=new_inputs)

    def _method_changed(self) -> None:
        info = CATALOGUE.get(self.state.method) or method_info("tto")
        self.state.update(
            {
                "method_text": f"{describe_method(info)} {info.paper}.",
                "supports_tto": info.supports_tto,
                "show_atlas": info.needs_atlas,
                "show_fixed": not info.needs_atlas,
            }
        )

    def request(self) -> RunRequest:
        """The run the page's inputs and options describe (`InputError` for a refused file or option)."""
        errors = self.state.input_errors or {}
        if errors:
            raise InputError(next(iter(errors.values()))[0])
        nodes = {field: self._node(field) for field in INPUT_FIELDS}
        tto = bool(self.state.supports_tto)
        return RunRequest(
            fixed=nodes["fixed_file"], moving=nodes["moving_file"], fixed_segmentation=nodes["fixed_seg_file"],
            moving_segmentation=nodes["moving_seg_file"], atlas=nodes["atlas_file"], atlas_segmentation=nodes["atlas_seg_file"],
            device=self.state.device or "cpu", seed=validate_setting("seed", self.state.seed, "Seed"), output_name="Web",
            iterations=validate_setting("iterations", _blank_is_auto(self.state.iterations), "Iterations") if tto else None,
            time_budget=validate_setting("time_budget", _blank_is_auto(self.state.time_budget), "Time budget") if tto else None,
            whole_jacobian=bool(self.state.whole_jacobian),
        )

    # Running

    def run_clicked(self, viewer: str) -> None:
        """Run: start the chosen method; Cancel for the viewer whose run goes; refused with a message for others."""
        if self.controller.state.busy:
            if viewer == self.owner and self.controller.state.state == RunState.RUNNING:
                self.controller.cancel()
            elif viewer != self.owner:
                self._notify(viewer, REFUSED_RUN)
            return
        self._start(viewer, [self.state.method])

    def compare_clicked(self, viewer: str) -> None:
        """Run every method the inputs allow, one after another, into one metrics table."""
        if self.controller.state.busy:
            self._notify(viewer, REFUSED_RUN if viewer != self.owner else "Cancel the running registration first.")
            return
        try:
            request = self.request()
        except InputError as error:
            self._notify(viewer, str(error))
            return
        self._start(viewer, self.controller.comparable(request))

    def _start(self, viewer: str, methods: list[str]) -> None:
        try:
            self.controller.start(self.request(), methods)
        except InputError as error:
            self._notify(viewer, str(error))
            return
        self.owner = viewer
        self._log_lines = []
        self.state.update({"run_owner": viewer[: panels.OWNER_TAG], "status": f"Running {', '.join(methods)}..."})
        self._notify(viewer, "")

    def _on_state(self, old: RunState, new: RunState) -> None:
        busy = self.controller.state.busy
        self.state.update({"run_state": new.value, "run_state_text": STATE_TEXT[new], "busy": busy})
        if new == RunState.STARTING:
            self.state.update({"progress": 0, "progress_text": "Preparing..."})
        elif new == RunState.CANCELLING:
            self.state.status = "Cancelling: stopping the worker and everything it started..."
        elif new == RunState.LOADING:
            self.state.status = "Loading the results into the scene..."
        if not busy:
            self.owner = ""
            self.state.run_owner = ""

    def _on_progress(self, run: Any) -> None:
        left = format_duration(run.seconds_left)
        percent = int(round(100 * run.fraction))
        self.state.progress = percent
        self.state.progress_text = f"{run.stage}: {percent} %" + (f", about {left} left" if left else "")

    def _on_log(self, line: str) -> None:
        self._log_lines = (self._log_lines + [line])[-LOG_LINES:]
        self.state.log = "\n".join(self._log_lines)

    def _on_dependencies(self, dependencies: Any) -> None:
        self.state.devices = [{"title": device_label(d), "value": d} for d in dependencies.devices]
        if self.state.device not in dependencies.devices:
            self.state.device = "cpu"
        missing = dependencies.summary() + "\nInstall them (README: Set up) and start the page again."
        self.state.dependencies_text = "" if dependencies.ready else missing

    def _on_finished(self, run: Any) -> None:
        if run.cancelled:
            self.state.update({"status": "Cancelled; nothing was added to the scene.", "progress": 0, "progress_text": ""})
        elif run.error:
            self.state.status = f"{run.method} failed: {run.error}"
        else:
            set_colour_table(self.scene.GetNodeByID(run.loaded.warped), OVERLAY_COLOURS)
            three_d = [view.get_view_node_id() for view in self.slicer.view_manager.get_threed_views()]
            place_legends(self.scene, three_d, LEGEND_POSITION, LEGEND_SIZE, LEGEND_TITLE_WIDTH)
            self.finished.append(run)
            self.state.status = f"Finished {run.method} in {format_duration(run.elapsed)}."
        if self.controller.state.busy or run.cancelled or not self.finished:  # a comparison goes on, or nothing new
            return
        for done in self.controller.runs:
            if done.loaded is not None:
                self.tables[done.loaded.output] = self.controller.comparison_table or done.loaded.table
        self.state.update(
            {
                "results": [{"title": f"{r.method} ({i + 1})", "value": i} for i, r in enumerate(self.finished)],
                "downloads": [
                    {"title": f"{r.method} ({i + 1}) output", "href": f"{routes.DOWNLOAD_URL}/{i}", "file": f"jointregseg-{r.method}-{i + 1}.zip"}
                    for i, r in enumerate(self.finished)
                ],
                "overlays": self._overlay_items(True),
                "overlay": self.state.overlay if self.state.overlay in RESULT_OVERLAYS else WARPED,
                "result": len(self.finished) - 1,
            }
        )
        self._show(fit=True)

    # Uploads (called by `routes`)

    def uploaded(self, viewer: str, file_id: str) -> None:
        with self.state:
            self.state.files = self._file_items()
            self._notify(viewer, f"Uploaded {file_id}; choose it in the lists above.", "success")

    def upload_refused(self, viewer: str, message: str) -> None:
        with self.state:
            self._notify(viewer, message)

    # Showing

    def _overlay_items(self, results: bool) -> list[dict[str, Any]]:
        return [{"title": o, "value": o, "props": {"disabled": o in RESULT_OVERLAYS and not results}} for o in OVERLAYS]

    def _shown_run(self) -> Optional[Any]:
        index = self.state.result
        return self.finished[index] if isinstance(index, int) and 0 <= index < len(self.finished) else None

    def _show(self, fit: bool = False) -> None:
        """Show the chosen result with the chosen overlay, or the chosen inputs before registration."""
        run = self._shown_run()
        if run is None and self.state.overlay in RESULT_OVERLAYS and self.finished:  # a result's overlay: the latest result
            run = self.finished[-1]
            self.state.result = len(self.finished) - 1
        opacity = float(self.state.opacity or 0.0)
        app_logic = self.slicer.app_logic if fit else None
        if run is None:
            fixed, moving = (self.nodes.get((self.state[f], False)) for f in ("fixed_file", "moving_file"))
            show_before(self.scene, app_logic, fixed, moving, opacity)
            self.state.update({"legend": BEFORE_LEGEND.as_dict(), "metrics": {"columns": [], "rows": []}})
        else:
            legend = apply_overlay(self.scene, app_logic, run, self.state.overlay or WARPED, opacity, self.checkerboards)
            table = self.scene.GetNodeByID(self.tables.get(run.loaded.output) or run.loaded.table or "")
            self.state.update({"legend": legend.as_dict(), "metrics": metrics_view(_table_dict(table))})
        self.state.update({"scene_nodes": node_names(self.scene), "overlay_opacity": self.state.overlay not in (CHECKERBOARD, OUTLINES)})
        if fit:
            self._fit_3d()

    def _fit_3d(self) -> None:
        """Look at the slice planes from the front-left, above, with the labelled box around them."""
        for view in self.slicer.view_manager.get_threed_views():
            view.set_box_visible(True)
            view.fit_view_to_content()
            camera = view.get_camera_node()
            if camera is not None:
                camera.GetCamera().Azimuth(THREE_D_AZIMUTH)
                camera.GetCamera().Elevation(THREE_D_ELEVATION)
                camera.GetCamera().OrthogonalizeViewUp()
                camera.ResetClippingRange()
                camera.Modified()

    def _notify(self, viewer: str, text: str, kind: str = "warning") -> None:
        """Show ``text`` to ``viewer`` only (an empty text takes its message away)."""
        notices = dict(self.state.notices or {})
        if text:
            notices[viewer] = {"text": text, "type": kind}
        else:
            notices.pop(viewer, None)
        self.state.notices = notices

    # The poll loop

    async def _poll_loop(self, **_: Any) -> None:
        print(f"JointRegSeg web: ready after {time.monotonic() - self.started:.1f} s", flush=True)
        while True:
            with self.state:
                try:
                    self.controller.poll()
                except Exception:  # a view must survive a failure it did not cause; the log says what happened
                    logger.exception("JointRegSeg web: polling the controller failed")
            await asyncio.sleep(POLL_SECONDS)

    def shutdown(self) -> None:
        self.controller.shutdown()


def _table_dict(table: Any) -> dict[str, dict[str, Any]]:
    from .. import mrml

    return mrml.table_as_dict(table) if table is not None else {}


def serve(data: Optional[Path], host: str, port: int) -> None:
    """Run the page until interrupted (``jointregseg web``)."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    os.environ["TRAME_ARGS"] = ""  # trame would otherwise read jointregseg's own command line as its options
    with tempfile.TemporaryDirectory(prefix="jointregseg-web-") as work:
        store = FileStore(sample_dir(), Path(work) / "uploads", data)
        app = WebApp(store, Path(work))
        print(f"JointRegSeg web: open http://{host}:{port}/ (files: {', '.join(store.roots)}; Ctrl+C stops)", flush=True)
        try:
            app.server.start(host=host, port=port, open_browser=False, show_connection_info=False, timeout=0)
        finally:
            app.shutdown()


def _blank_is_auto(value: Any) -> Any:
    """A number field's value, None (the method's default) when the field is empty."""
    return None if value is None or value == "" else value
