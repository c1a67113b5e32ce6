"""`jointregseg web`: the app controller (`JointRegSegLib.app.Controller`) behind a browser page on real Slicer views.

One process holds one MRML scene (trame-slicer's `SlicerApp`: slicer-core's scene, logics and
slice/3D views rendered offscreen and streamed to the page) and one `Controller` on it, polled
every `POLL_SECONDS` by the server's event loop. Every browser tab on the page shares that scene
and its state (a demo: all see the same inputs, views and progress); only these differ per tab,
by its ``viewer_id``: who started the run (only that tab may cancel it; a Run from another tab is
refused with a message) and the messages meant for one tab (a refused run or upload).

Files come only through `files.FileStore` (the bundled sample pair, ``--data``, the uploads
folder); uploads arrive by HTTP POST on `panels.UPLOAD_URL` (streamed, size-capped, checked with
the command line's readers); a finished run's output folder is offered as a zip on
`panels.DOWNLOAD_URL`/<n>, n being the run's place in the page's result list (no path comes from
the page).
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

from ..app import Controller, RunRequest, RunState, describe_method, device_label, format_duration
from ..app.environment import library_root
from ..errors import InputError
from ..methods.catalogue import CATALOGUE, method_info
from ..sample_data import FILES as SAMPLE_FILES
from ..sample_data import sample_dir
from . import panels
from .scene import place_legends, set_colour_table
from .files import SAMPLE, FileStore
from .views import (
    BEFORE,
    CHECKERBOARD,
    OUTLINES,
    OVERLAY_COLOURS,
    OVERLAYS,
    RESULT_OVERLAYS,
    WARPED,
    BEFORE_LEGEND,
    annotate_slice_view,
    LEGEND_POSITION,
    LEGEND_SIZE,
    apply_overlay,
    show_before,
)

POLL_SECONDS = 0.1
LOG_LINES = 200
REQUIREMENTS = library_root() / "JointRegSeg" / "Resources" / "requirements.txt"
INPUT_FIELDS = {
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
THREE_D_AZIMUTH, THREE_D_ELEVATION = -35.0, 25.0
VIEW_TITLES = {"Red": "Axial", "Green": "Coronal", "Yellow": "Sagittal"}

logger = logging.getLogger(__name__)


class WebApp:
    """The page's server side: scene and views, the controller, the page's state and its handlers."""

    def __init__(self, store: FileStore, work: Path, server: Any = None) -> None:
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

        from ..mrml.core import register_node_classes

        self.store = store
        self.server = server or get_server(name="jointregseg", client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.state, self.ctrl = self.server.state, self.server.controller
        self.slicer = SlicerApp()
        self.scene = self.slicer.scene
        register_node_classes(self.scene)
        register_rca_factories(self.slicer.view_manager, self.server)
        self.layout_manager = LayoutManager(self.scene, self.slicer.view_manager, self.server)
        axial, coronal, sagittal = ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(), ViewLayoutDefinition.sagittal_view()
        grid = Layout(
            LayoutDirection.Vertical,
            [Layout(LayoutDirection.Horizontal, [axial, ViewLayoutDefinition.threed_view()]), Layout(LayoutDirection.Horizontal, [coronal, sagittal])],
        )
        self.layout_manager.register_layout("four-up", grid)
        self.layout_manager.set_layout("four-up")
        for view in self.slicer.view_manager.get_slice_views():
            annotate_slice_view(view, VIEW_TITLES.get(view.get_singleton_tag(), view.get_singleton_tag()))
            view.set_visible_in_3d(True)
        self._link_slice_views()

        self.controller = Controller(self.scene, sys.executable, work / "runs", REQUIREMENTS, app_logic=self.slicer.app_logic)
        self.controller.on_progress = self._on_progress
        self.controller.on_log = self._on_log
        self.controller.on_finished = self._on_finished
        self.controller.on_dependencies = self._on_dependencies
        self.controller.state.listeners.append(self._on_state)
        self.owner = ""
        self.nodes: dict[tuple[str, bool], str] = {}
        self.finished: list[Any] = []
        self.tables: dict[str, str] = {}
        self.checkerboards: dict[str, str] = {}
        self._log_lines: list[str] = []
        self.started = time.monotonic()

        self._initial_state()
        self._bind()
        panels.build(self.server, self.layout_manager)
        self.ctrl.on_server_bind.add(self._add_routes)
        self.ctrl.on_server_ready.add_task(self._poll_loop)
        self.controller.refresh_dependencies()
        self._inputs_changed()

    # Set-up

    def _link_slice_views(self) -> None:
        composites = self.scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        for index in range(composites.GetNumberOfItems()):
            composites.GetItemAsObject(index).SetLinkedControl(True)

    def _initial_state(self) -> None:
        state = self.state
        state.client_only("viewer_id")
        sample = {key: f"{SAMPLE}/{name}" for key, name in SAMPLE_FILES.items()}
        state.update(
            {
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
                "iterations": 100,
                "time_budget": 60,
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
        self.state.trame__title = "JointRegSeg"

    def _bind(self) -> None:
        self.state.change(*INPUT_FIELDS)(lambda **_: self._inputs_changed())
        self.state.change("method")(lambda **_: self._method_changed())
        self.state.change("overlay", "opacity", "result")(lambda **_: self._show())
        self.state.change("overlay")(lambda overlay, **_: self.state.update({"overlay_opacity": overlay not in (CHECKERBOARD, OUTLINES)}))
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

    def _inputs_changed(self) -> None:
        errors: dict[str, list[str]] = {}
        for field in INPUT_FIELDS:
            try:
                self._node(field)
            except InputError as error:
                errors[field] = [str(error)]
        self.state.input_errors = errors
        self._method_changed()
        if not self.finished:
            self._show()
        self._update_scene_nodes()

    def _method_changed(self) -> None:
        info = CATALOGUE.get(self.state.method) or method_info("tto")
        self.state.method_text = f"{describe_method(info)} {info.paper}."
        self.state.supports_tto = info.supports_tto
        self.state.show_atlas, self.state.show_fixed = info.needs_atlas, not info.needs_atlas

    def request(self) -> RunRequest:
        """The run the page's inputs and options describe (`InputError` for a refused file)."""
        errors = self.state.input_errors or {}
        if errors:
            raise InputError(next(iter(errors.values()))[0])
        nodes = {field: self._node(field) for field in INPUT_FIELDS}
        return RunRequest(
            fixed=nodes["fixed_file"], moving=nodes["moving_file"], fixed_segmentation=nodes["fixed_seg_file"],
            moving_segmentation=nodes["moving_seg_file"], atlas=nodes["atlas_file"], atlas_segmentation=nodes["atlas_seg_file"],
            device=self.state.device or "cpu", iterations=_whole(self.state.iterations, "Iterations", 1),
            time_budget=_number(self.state.time_budget, "Time budget", 1.0), seed=_whole(self.state.seed, "Seed", 0),
            output_name="Web",
        )

    # Running

    def run_clicked(self, viewer: str) -> None:
        """Run: start the chosen method; Cancel for the viewer whose run goes; refused with a message for others."""
        if self.controller.state.busy:
            if viewer == self.owner and self.controller.state.state == RunState.RUNNING:
                self.controller.cancel()
            elif viewer != self.owner:
                self._notify(viewer, "A registration started by another viewer is running; its progress is shown here. Wait for it to finish.")
            return
        self._start(viewer, [self.state.method])

    def compare_clicked(self, viewer: str) -> None:
        """Run every method the inputs allow, one after another, into one metrics table."""
        if self.controller.state.busy:
            self._notify(viewer, "A registration is running; compare the methods when it has finished.")
            return
        try:
            request = self.request()
        except InputError as error:
            self._notify(viewer, str(error))
            return
        usable = [info.name for info in Controller.methods() if self.controller.check(request, info.name) is None]
        self._start(viewer, usable)

    def _start(self, viewer: str, methods: list[str]) -> None:
        try:
            self.controller.start(self.request(), methods)
        except InputError as error:
            self._notify(viewer, str(error))
            return
        self.owner = viewer
        self.state.run_owner = viewer
        self._notify(viewer, "")
        self._log_lines = []
        self.state.status = f"Running {', '.join(methods)}..."

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
        self.state.dependencies_text = "" if dependencies.ready else dependencies.summary() + "\nInstall them (README: Set up) and restart the page's server."

    def _on_finished(self, run: Any) -> None:
        if run.cancelled:
            self.state.update({"status": "Cancelled; nothing was added to the scene.", "progress": 0, "progress_text": ""})
        elif run.error:
            self.state.status = f"{run.method} failed: {run.error}"
        else:
            set_colour_table(self.scene.GetNodeByID(run.loaded.warped), OVERLAY_COLOURS)
            three_d = [view.get_view_node_id() for view in self.slicer.view_manager.get_threed_views()]
            place_legends(self.scene, three_d, LEGEND_POSITION, LEGEND_SIZE)
            self.finished.append(run)
            self.state.status = f"Finished {run.method} in {format_duration(run.elapsed)}."
        if self.controller.state.busy:
            return
        for done in self.controller.runs:
            if done.loaded is not None:
                self.tables[done.loaded.output] = self.controller.comparison_table or done.loaded.table
        if self.finished and not run.cancelled:
            self.state.results = [{"title": f"{r.method} ({i + 1})", "value": i} for i, r in enumerate(self.finished)]
            self.state.downloads = [
                {"title": f"{r.method} ({i + 1}) output", "href": f"{panels.DOWNLOAD_URL}/{i}", "file": f"jointregseg-{r.method}-{i + 1}.zip"}
                for i, r in enumerate(self.finished)
            ]
            self.state.overlays = self._overlay_items(True)
            if self.state.overlay not in RESULT_OVERLAYS:
                self.state.overlay = WARPED
            self.state.result = len(self.finished) - 1
            self._show(fit=True)
        self._update_scene_nodes()

    # Showing

    def _overlay_items(self, results: bool) -> list[dict[str, Any]]:
        return [{"title": o, "value": o, "props": {"disabled": o in RESULT_OVERLAYS and not results}} for o in OVERLAYS]

    def _shown_run(self) -> Optional[Any]:
        index = self.state.result
        return self.finished[index] if isinstance(index, int) and 0 <= index < len(self.finished) else None

    def _show(self, fit: bool = False) -> None:
        run = self._shown_run()
        app_logic = self.slicer.app_logic if fit or run is None else None
        opacity = float(self.state.opacity or 0.0)
        if run is None:
            fixed = self.scene.GetNodeByID(self.nodes.get((self.state.fixed_file, False), "")) if self.state.fixed_file else None
            moving = self.scene.GetNodeByID(self.nodes.get((self.state.moving_file, False), "")) if self.state.moving_file else None
            show_before(self.scene, app_logic, fixed.GetID() if fixed else None, moving.GetID() if moving else None, opacity)
            self.state.legend = BEFORE_LEGEND.as_dict()
            self._fit_3d()
            return
        legend = apply_overlay(self.scene, app_logic, run, self.state.overlay or WARPED, opacity, self.checkerboards)
        self.state.legend = legend.as_dict()
        self.state.metrics = self._metrics(run)
        self._update_scene_nodes()
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

    def _metrics(self, run: Any) -> dict[str, Any]:
        from .. import mrml
        from ..mrml.table import MEANING_COLUMN, METRIC_COLUMN, ROWS

        table_id = self.tables.get(run.loaded.output) or run.loaded.table
        node = self.scene.GetNodeByID(table_id) if table_id else None
        if node is None:
            return {"columns": [], "rows": []}
        data = mrml.table_as_dict(node)
        main = {title for _, _, title, _ in ROWS}
        columns = [c for c in next(iter(data.values()), {}) if c not in (METRIC_COLUMN, MEANING_COLUMN)] if data else []
        rows = [
            {
                "title": title,
                "meaning": values.get(MEANING_COLUMN, ""),
                "values": [_format(values[c]) for c in columns],
                "main": title in main or title.startswith("Time"),
            }
            for title, values in data.items()
        ]
        return {"columns": ["Metric"] + columns, "rows": rows}

    def _update_scene_nodes(self) -> None:
        names = []
        for class_name in ("vtkMRMLScalarVolumeNode", "vtkMRMLTransformNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode"):
            nodes = self.scene.GetNodesByClass(class_name)
            names += [node.GetName() for node in (nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())) if not node.GetHideFromEditors()]
        self.state.scene_nodes = names

    def _notify(self, viewer: str, text: str) -> None:
        notices = dict(self.state.notices or {})
        if text:
            notices[viewer] = text
        else:
            notices.pop(viewer, None)
        self.state.notices = notices

    # HTTP routes and the poll loop

    def _add_routes(self, wslink_server: Any) -> None:
        from aiohttp import web

        async def upload(request: web.Request) -> web.Response:
            viewer = request.query.get("viewer", "")
            name = request.query.get("name", "")
            try:
                if self.controller.state.busy:
                    raise InputError("Uploads wait until the running registration has finished.")
                file_id = await asyncio.get_running_loop().run_in_executor(None, self.store.save_upload, name, _Reader(request))
            except InputError as error:
                with self.state:
                    self._notify(viewer, str(error))
                return web.json_response({"ok": False, "message": str(error)}, status=400)
            with self.state:
                self.state.files = self._file_items()
                self._notify(viewer, f"Uploaded {file_id}; choose it in the lists above.")
            return web.json_response({"ok": True, "file": file_id})

        async def download(request: web.Request) -> web.Response:
            text = request.match_info["index"]
            if not (text.isascii() and text.isdigit()) or int(text) >= len(self.finished):  # a place in the result list, nothing else
                raise web.HTTPNotFound(text="No such result.")
            index = int(text)
            run = self.finished[index]
            data = await asyncio.get_running_loop().run_in_executor(None, zip_folder, run.output)
            name = f"jointregseg-{run.method}-{index + 1}.zip"
            return web.Response(body=data, content_type="application/zip", headers={"Content-Disposition": f'attachment; filename="{name}"'})

        wslink_server.app.router.add_post(f"/{panels.UPLOAD_URL}", upload)
        wslink_server.app.router.add_get(f"/{panels.DOWNLOAD_URL}/{{index}}", download)

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


class _Reader:
    """A blocking ``read(n)`` over an aiohttp request body, for `FileStore.save_upload` in a worker thread."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.loop = asyncio.get_running_loop()

    def read(self, size: int) -> bytes:
        return asyncio.run_coroutine_threadsafe(self.request.content.read(size), self.loop).result()


def zip_folder(folder: Path) -> bytes:
    """The files under ``folder`` as a zip archive (paths relative to the folder)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def _format(value: Any) -> str:
    return "–" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:.3f}"


def _whole(value: Any, name: str, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number.") from None
    if number < minimum:
        raise InputError(f"{name} must be at least {minimum}.")
    return number


def _number(value: Any, name: str, minimum: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number.") from None
    if not math.isfinite(number) or number < minimum:
        raise InputError(f"{name} must be at least {minimum:g}.")
    return number


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
