"""The Slicer module without Slicer: its .ui file, its bindings, its imports, and its helpers.

Static: the .ui parses; every ``self.ui.<name>`` the module uses exists in it; every parameter-node
field is bound to a widget through ``SlicerParameterName`` (of a kind that can show that type) and
every ``SlicerParameterName`` names a field; node selectors get the scene; the module file and its
helpers import nothing heavy (torch, numpy, JointRegSegLib) when Slicer loads them; the module's
CMakeLists lists every script and resource. Behaviour (plain Python, no Slicer): the helpers' process
runner, state machine, method descriptions and requirement checks.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "JointRegSeg"
MODULE_FILE = MODULE_DIR / "JointRegSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "JointRegSeg.ui"
HELPERS = MODULE_DIR / "JointRegSegHelpers"
HEAVY = {"torch", "monai", "numpy", "scipy", "SimpleITK", "nibabel", "matplotlib", "JointRegSegLib"}

sys.path.insert(0, str(MODULE_DIR))

from JointRegSegHelpers import process as helper_process  # noqa: E402
from JointRegSegHelpers.environment import (  # noqa: E402
    DESCRIBE_SCRIPT,
    describe_method,
    library_root,
    missing_requirements,
    protected_constraints,
    read_requirements,
)
from JointRegSegHelpers.process import BackgroundProcess, parse_event, python_environment  # noqa: E402
from JointRegSegHelpers.runstate import (  # noqa: E402
    BUSY,
    RunState,
    RunStateMachine,
    apply_button,
    format_duration,
    progress_text,
)


@pytest.fixture(scope="module")
def ui() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


@pytest.fixture(scope="module")
def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


def _widgets(ui: ET.Element) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ui.iter("widget")}


def _parameter_names(ui: ET.Element) -> dict[str, ET.Element]:
    """``{SlicerParameterName: widget element}``."""
    bound = {}
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget
    return bound


def _parameter_fields(tree: ast.Module) -> dict[str, str]:
    """``{field: annotation source}`` of the class decorated with ``parameterNodeWrapper``."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in JointRegSeg.py")


def test_ui_parses_as_a_module_widget(ui):
    assert ui.tag == "ui"
    top = ui.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "JointRegSeg"
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    used = {w.get("class") for w in ui.iter("widget")}
    assert {c for c in used if not c.startswith("Q")} <= declared


def test_every_ui_name_the_module_uses_exists(ui, module_tree):
    names = set(_widgets(ui)) | {e.get("name") for e in ui.iter() if e.tag in ("layout", "spacer")}
    used = {
        node.attr
        for node in ast.walk(module_tree)
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self.ui"
    }
    assert used, "the module uses no self.ui names?"
    assert used <= names, f"not in JointRegSeg.ui: {sorted(used - names)}"


def test_every_parameter_is_bound_to_a_fitting_widget(ui, module_tree):
    fields = _parameter_fields(module_tree)
    bound = _parameter_names(ui)
    assert set(fields) == set(bound), (sorted(set(fields) - set(bound)), sorted(set(bound) - set(fields)))
    for name, annotation in fields.items():
        widget_class = bound[name].get("class")
        item_data = any(p.get("name") == "JointRegSegItemData" and p.findtext("bool") == "true" for p in bound[name].findall("property"))
        if "vtkMRML" in annotation:
            expected = "qMRMLNodeComboBox"
        elif item_data:
            assert annotation == "str", (name, annotation)
            expected = "ctkComboBox"
        elif "Choice" in annotation:
            expected = "QComboBox"
        else:
            base = re.match(r"(?:Annotated\[)?(\w+)", annotation).group(1)
            expected = {"int": "QSpinBox", "float": "QDoubleSpinBox", "str": "QLineEdit", "bool": "QCheckBox"}[base]
        assert widget_class == expected, (name, annotation, widget_class)
        if expected == "qMRMLNodeComboBox":
            types = {s.text for s in bound[name].find("property[@name='nodeTypes']").iter("string")}
            assert types == set(re.findall(r"vtkMRML\w+", annotation)), name


def test_node_selectors_get_the_scene(ui):
    selectors = {name for name, w in _widgets(ui).items() if w.get("class") == "qMRMLNodeComboBox"}
    connected = {
        c.findtext("receiver")
        for c in ui.iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert selectors and selectors == connected


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported (module level, including top-level try/if blocks)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()

    def visit(statements):
        for statement in statements:
            if isinstance(statement, ast.Import):
                found.update(alias.name for alias in statement.names)
            elif isinstance(statement, ast.ImportFrom) and statement.level == 0:
                found.add(statement.module)
            elif isinstance(statement, (ast.If, ast.Try, ast.With)):
                visit(statement.body)
                visit(getattr(statement, "orelse", []))
                for handler in getattr(statement, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return found


def test_module_and_helpers_import_nothing_heavy_at_load():
    for path in [MODULE_FILE, *sorted(HELPERS.glob("*.py"))]:
        roots = {name.split(".")[0] for name in _top_level_imports(path)}
        assert not roots & HEAVY, (path.name, sorted(roots & HEAVY))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import JointRegSegHelpers.environment, JointRegSegHelpers.process, JointRegSegHelpers.runstate;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in sys.argv[2].split(',')))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR), ",".join(HEAVY)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_names_the_module_imports_from_its_helpers_exist(module_tree):
    for node in module_tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("JointRegSegHelpers."):
            helper = ast.parse((HELPERS / (node.module.split(".")[1] + ".py")).read_text())
            defined = {n.name for n in helper.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defined |= {t.id for n in helper.body if isinstance(n, (ast.Assign, ast.AnnAssign)) for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
            missing = {alias.name for alias in node.names} - defined
            assert not missing, (node.module, missing)


def test_cmake_lists_every_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    listed = set(re.findall(r"^\s+([\w/${}.]+\.py)\s*$", text.replace("${MODULE_NAME}", "JointRegSeg"), re.M))
    assert scripts == listed, (scripts ^ listed)
    for resource in re.findall(r"^\s+(Resources/[\w/${}.]+)\s*$", text.replace("${MODULE_NAME}", "JointRegSeg"), re.M):
        assert (MODULE_DIR / resource).is_file(), resource
    top = (REPO / "CMakeLists.txt").read_text()
    assert "add_subdirectory(JointRegSeg)" in top and 'EXTENSION_DEPENDS "PyTorch"' in top


def test_requirements_never_touch_what_slicer_or_pytorch_provide():
    requirements = read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    names = {re.match(r"[A-Za-z0-9._-]+", line).group(0).lower() for line in requirements}
    assert names and not names & {"torch", "numpy", "simpleitk"}


# Behaviour of the helpers (no Slicer needed)


def test_missing_requirements_checks_presence_and_versions():
    assert missing_requirements(["pytest>=1", "no-such-package-jointregseg>=1", "pytest<1"]) == [
        "no-such-package-jointregseg>=1",
        "pytest<1",
    ]
    assert all(pin.count("==") == 1 for pin in protected_constraints())


def test_library_root_is_the_repository_in_a_source_checkout():
    assert (library_root(MODULE_DIR) / "JointRegSegLib" / "__init__.py").is_file()


def test_state_machine_allows_only_the_documented_transitions():
    machine = RunStateMachine()
    seen = []
    machine.listeners.append(lambda old, new: seen.append((old, new)))
    for state in (RunState.STARTING, RunState.RUNNING, RunState.LOADING, RunState.IDLE):
        machine.go(state)
    assert seen[-1] == (RunState.LOADING, RunState.IDLE) and len(seen) == 4
    with pytest.raises(RuntimeError, match="cannot go"):
        machine.go(RunState.LOADING)
    machine.go(RunState.STARTING)
    machine.go(RunState.RUNNING)
    machine.go(RunState.CANCELLING)
    assert machine.busy and apply_button(machine.state) == ("Cancelling...", False)
    machine.go(RunState.IDLE)
    assert not machine.busy
    assert apply_button(RunState.RUNNING) == ("Cancel", True) and apply_button(RunState.FAILED) == ("Apply", True)
    assert BUSY == {RunState.STARTING, RunState.RUNNING, RunState.CANCELLING, RunState.LOADING}


def test_progress_texts():
    assert format_duration(None) == "" and format_duration(45.4) == "45 s"
    assert format_duration(185) == "3 min 05 s" and format_duration(3720) == "1 h 02 min"
    assert progress_text("optimising", 185) == "optimising: %p%, about 3 min 05 s left"
    assert progress_text("optimising", None) == "optimising: %p%"


def test_method_description_says_what_it_needs_and_gives():
    text = describe_method({"name": "x", "needs_segmentations": True, "gives_affine": True, "gives_brain_mask": True, "supports_tto": True})
    assert "label maps of both" in text and "affine part" in text and "brain mask" in text and "iterations" in text
    assert "atlas" not in text and "atlas" in describe_method({"needs_atlas": True})


def test_event_lines_and_other_lines():
    assert parse_event('{"event": "progress", "fraction": 0.5}') == {"event": "progress", "fraction": 0.5}
    assert parse_event("Warning: something") is None and parse_event('{"no": "event"}') is None and parse_event("{broken") is None


_TREE = """
import json, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
print(json.dumps({"event": "log", "message": "child", "pid": child.pid}), flush=True)
print("a line that is not an event", flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_cancel_stops_the_whole_process_tree(monkeypatch):
    """A child that ignores SIGTERM is still stopped: SIGTERM to the group, then SIGKILL after the grace period."""
    monkeypatch.setattr(helper_process, "GRACE_SECONDS", 0.5)
    runner = BackgroundProcess([sys.executable, "-c", _TREE])
    events, lines = [], []
    deadline = time.monotonic() + 30
    while not events and time.monotonic() < deadline:
        out = runner.poll()
        events += out.events
        lines += out.lines
        time.sleep(0.02)
    child = events[0]["pid"]
    assert _alive(child) and runner.running
    runner.cancel()
    out = runner.wait(timeout=20)
    assert out.finished and out.exit_code == -15
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the grandchild survived the cancel"
    assert "a line that is not an event" in lines + out.lines


def test_describe_reports_methods_and_devices_through_the_worker_python():
    runner = BackgroundProcess([sys.executable, "-c", DESCRIBE_SCRIPT], env=python_environment(str(REPO)), cwd=str(REPO.parent))
    out = runner.wait(timeout=120)
    assert out.exit_code == 0, out.lines[-20:]
    (answer,) = [e for e in out.events if e["event"] == "describe"]
    assert "tto" in [m["name"] for m in answer["methods"]] and answer["devices"][0] == "cpu"
    tto = next(m for m in answer["methods"] if m["name"] == "tto")
    assert json.dumps(tto) and describe_method(tto).startswith("Needs the fixed and moving images")
