"""The page's layout: the module's panels on the left, the Slicer views in the middle, results on the right.

Left (as in the Slicer module): inputs chosen from the allowed files or uploaded, the method with
what it needs and gives, the device, the method's main options, Run (Cancel while the viewer's own
run goes), Compare all methods, the progress bar with stage and time left, messages. Middle: the
slice views (axial, coronal, sagittal, linked) and the 3D view. Right: the overlay chooser and
opacity, the legend of what is shown, the metrics table, downloads, the scene's nodes, the log.

Everything here is declarative: it binds widgets to state names and to the handlers `server.WebApp`
registers on the trame controller (``ctrl.<name>``). ``viewer_id`` is client-only state: each
browser tab draws one at random, and the handlers receive it to tell viewers apart (who may cancel,
whom a message is for); the others learn only its first `OWNER_TAG` characters.
"""

from __future__ import annotations

from typing import Any

from .routes import UPLOAD_URL

DRAWER_WIDTH = 340
RESULTS_WIDTH = 480
OWNER_TAG = 4
"""How many leading characters of the running viewer's id all viewers are told (``run_owner``): enough to tell
who sees Cancel, too few for another viewer to act in the owner's name (the server checks the whole id)."""
OWNER = f"(run_owner && viewer_id.slice(0, {OWNER_TAG}) === run_owner)"
TITLE = "JointRegSeg: registration joined with segmentation, in 3D Slicer's views"

# Posts the chosen file to the upload route; the server answers through the page's state (messages, file list).
UPLOAD_SCRIPT = f"""
window.jrsUpload = async function (event, viewer) {{
  const input = event.target;
  const file = input.files && input.files[0];
  if (!file) return;
  const url = '{UPLOAD_URL}?viewer=' + encodeURIComponent(viewer) + '&name=' + encodeURIComponent(file.name);
  try {{ await fetch(url, {{ method: 'POST', body: file }}); }} finally {{ input.value = ''; }}
}};
"""

STYLE = """
.jrs-panel .v-card-title { font-size: 1.05rem; padding-bottom: 0; }
.jrs-legend-bar { height: 22px; border: 1px solid #555; border-radius: 3px; }
.jrs-ticks { display: flex; justify-content: space-between; font-size: 0.9rem; }
.jrs-swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #444; margin-right: 6px; vertical-align: middle; }
.jrs-metrics td, .jrs-metrics th { padding: 1px 4px !important; font-size: 0.86rem; white-space: nowrap; }
.jrs-metrics { overflow-x: auto; }
.jrs-log { font-size: 0.78rem; max-height: 160px; overflow-y: auto; white-space: pre-wrap; margin: 0; }
.jrs-download { padding: 3px 8px; border: 1px solid #90a4ae; border-radius: 4px; text-decoration: none; }
html { overflow-y: hidden; }
"""

INPUTS = (
    ("fixed_file", "Fixed volume", "show_fixed"),
    ("moving_file", "Moving volume", "true"),
    ("fixed_seg_file", "Fixed label map (optional)", "show_fixed"),
    ("moving_seg_file", "Moving label map (optional)", "true"),
    ("atlas_file", "Atlas volume (empty: shipped MNI152)", "show_atlas"),
    ("atlas_seg_file", "Atlas label map", "show_atlas"),
)


def build(server: Any, layout_manager: Any) -> Any:
    """The page's one template (``main``)."""
    from trame.ui.vuetify3 import VAppLayout
    from trame.widgets import client, html
    from trame.widgets import vuetify3 as v

    ctrl = server.controller
    with VAppLayout(server, full_height=True) as layout:
        client.Style(STYLE)
        client.Script(UPLOAD_SCRIPT)
        client.ClientTriggers(mounted="viewer_id = viewer_id || (Math.random().toString(36).slice(2, 10) + Math.random().toString(36).slice(2, 10))")
        with v.VAppBar(density="compact", color="blue-grey-darken-3"):
            v.VAppBarTitle(TITLE)
            v.VChip("{{ run_state_text }}", classes="mr-4", color=("run_state === 'idle' ? 'green' : 'amber'",), id="jrs-state")

        with v.VNavigationDrawer(permanent=True, width=DRAWER_WIDTH, location="left", classes="jrs-panel"):
            _inputs(v, html)
            _method(v, html)
            _run(v, html, ctrl)

        with v.VNavigationDrawer(permanent=True, width=RESULTS_WIDTH, location="right", classes="jrs-panel"):
            _display(v, html)
            _metrics(v, html)
            _scene_and_log(v, html)

        with v.VMain():
            with html.Div(style="height: calc(100vh - 48px); display: flex;", id="jrs-views"):
                layout_manager.initialize_layout_grid(layout)
    return layout


def _inputs(v: Any, html: Any) -> None:
    with v.VCard(flat=True, title="Inputs", id="jrs-inputs"):
        with v.VCardText(classes="pb-1"):
            for name, label, shown in INPUTS:
                v.VSelect(
                    label=label, v_model=(name, None), items=("files", []), item_title="title", item_value="value",
                    clearable=True, density="compact", hide_details="auto", classes="mb-2", v_show=shown,
                    error_messages=(f"input_errors.{name} || []",), disabled=("busy",), id=f"jrs-{name}",
                )
            html.Div("Upload an image (NIfTI, NRRD, MetaImage, MGZ; at most {{ max_upload_mb }} MB):", classes="text-body-2 mt-1")
            html.Input(type="file", id="jrs-upload", change="window.jrsUpload($event, viewer_id)", classes="text-body-2", disabled=("busy",))


def _method(v: Any, html: Any) -> None:
    with v.VCard(flat=True, title="Method"):
        with v.VCardText(classes="pb-1"):
            v.VSelect(
                v_model=("method", "tto"), items=("methods", []), item_title="title", item_value="value", density="compact",
                hide_details=True, disabled=("busy",), id="jrs-method",
            )
            html.Div("{{ method_text }}", classes="text-body-2 my-2", id="jrs-method-text")
            v.VSelect(
                label="Device", v_model=("device", "cpu"), items=("devices", []), item_title="title", item_value="value",
                density="compact", hide_details=True, disabled=("busy",), classes="mb-2",
            )
            with html.Div(classes="d-flex ga-2"):
                v.VTextField(
                    label="Iterations", v_model_number=("iterations", None), type="number", density="compact", hide_details=True,
                    placeholder="auto", persistent_placeholder=True, v_show="supports_tto", disabled=("busy",), id="jrs-iterations",
                )
                v.VTextField(
                    label="Time budget (s)", v_model_number=("time_budget", None), type="number", density="compact",
                    placeholder="none", persistent_placeholder=True, hide_details=True, v_show="supports_tto", disabled=("busy",),
                )
                v.VTextField(label="Seed", v_model_number=("seed", 0), type="number", density="compact", hide_details=True, disabled=("busy",))
            v.VCheckbox(
                label="Jacobian of the whole mapping (default: of its deformable part)", v_model=("whole_jacobian", False),
                density="compact", hide_details=True, disabled=("busy",), id="jrs-whole-jacobian",
            )
            html.Div("{{ dependencies_text }}", classes="text-caption mt-2", style="white-space: pre-line", v_show="dependencies_text")


def _run(v: Any, html: Any, ctrl: Any) -> None:
    with v.VCard(flat=True, title="Run"):
        with v.VCardText():
            with html.Div(classes="d-flex ga-2 mb-3"):
                v.VBtn(
                    f"{{{{ run_state === 'running' && {OWNER} ? 'Cancel' : (busy && {OWNER} ? run_state_text : 'Run') }}}}",
                    color=(f"run_state === 'running' && {OWNER} ? 'red' : 'primary'",),
                    disabled=(f"busy && {OWNER} && run_state !== 'running'",),
                    click=(ctrl.run_clicked, "[viewer_id]"), id="jrs-run", width=110, classes="text-none",
                )
                v.VBtn(
                    "Compare all methods", variant="outlined", click=(ctrl.compare_clicked, "[viewer_id]"), id="jrs-compare",
                    classes="text-none",
                )
            with v.VProgressLinear(model_value=("progress", 0), height=26, color="teal", rounded=True, id="jrs-progress"):
                html.Span("{{ progress_text }}", classes="text-body-2", style="color: black")
            html.Div("{{ status }}", classes="text-body-2 mt-2", id="jrs-status")
            v.VAlert(
                text=("(notices[viewer_id] || {}).text || ''",), v_show="notices[viewer_id]",
                type=("(notices[viewer_id] || {}).type || 'warning'",), density="compact",
                closable=True, classes="mt-2", id="jrs-notice", click_close=(ctrl.notice_closed, "[viewer_id]"),
            )


def _display(v: Any, html: Any) -> None:
    with v.VCard(flat=True, title="Display"):
        with v.VCardText(classes="pb-1"):
            v.VSelect(
                label="Result", v_model=("result", None), items=("results", []), item_title="title", item_value="value",
                density="compact", hide_details=True, v_show="results.length", classes="mb-2",
            )
            v.VSelect(
                label="Overlay on the fixed image", v_model=("overlay", None), items=("overlays", []), item_title="title",
                item_value="value", item_props="props", density="compact", hide_details=True, id="jrs-overlay",
            )
            v.VSlider(
                label="Opacity", v_model=("opacity", 0.5), min=0, max=1, step=0.05, hide_details=True, thumb_label=True,
                density="compact", disabled=("!overlay_opacity",),
            )
            with html.Div(id="jrs-legend", classes="mt-1"):
                html.Div("{{ legend.title }}", classes="text-subtitle-2")
                html.Div(classes="jrs-legend-bar", style=("{ background: legend.gradient }",), v_show="legend.gradient")
                with html.Div(classes="jrs-ticks", v_show="legend.ticks.length"):
                    html.Span("{{ tick }}", v_for="tick in legend.ticks", key="tick")
                with html.Div(style="max-height: 150px; overflow-y: auto; column-count: 2;", v_show="legend.swatches.length"):
                    with html.Div(v_for="item in legend.swatches", key="item.name", classes="text-body-2"):
                        html.Span(classes="jrs-swatch", style=("{ background: item.colour }",))
                        html.Span("{{ item.name }}")
                html.Div("{{ legend.text }}", classes="text-body-2 mt-1")


def _metrics(v: Any, html: Any) -> None:
    with v.VCard(flat=True, title="Metrics", v_show="metrics.rows.length", id="jrs-metrics"):
        with v.VCardText(classes="pb-1 px-2"):
            with v.VTable(density="compact", classes="jrs-metrics"):
                with html.Thead():
                    with html.Tr():
                        html.Th("{{ column }}", v_for="column in metrics.columns", key="column")
                with html.Tbody():
                    with html.Tr(v_for="row in metrics.rows", key="row.title", v_show="row.main || all_rows", title=("row.meaning",)):
                        html.Td("{{ row.title }}")
                        html.Td("{{ value }}", v_for="(value, i) in row.values", key="i", classes="text-right")
            v.VCheckbox(label="Per-structure rows", v_model=("all_rows", False), density="compact", hide_details=True)
            with html.Div(classes="d-flex flex-wrap ga-2"):
                html.A(
                    "Download {{ item.title }} (zip)", v_for="item in downloads", key="item.href", href=("item.href",),
                    download=("item.file",), classes="jrs-download text-body-2",
                )


def _scene_and_log(v: Any, html: Any) -> None:
    with v.VCard(flat=True, title="Scene"):
        with v.VCardText(classes="pb-1"):
            html.Div("{{ name }}", v_for="name in scene_nodes", key="name", classes="text-caption jrs-scene-node")
    with v.VCard(flat=True, title="Log"):
        with v.VCardText():
            html.Pre("{{ log }}", classes="jrs-log", id="jrs-log")
