"""The Slicer module without Slicer: its .ui file, its parameter bindings, its imports, its Slicer API use.

No Slicer desktop runs here, so what the widget layer relies on is checked against Slicer's own rules:

- every ``SlicerParameterName`` binding gets a working GUI connector under the rule Slicer uses to choose
  one (`CONNECTORS`, read from ``Base/Python/slicer/parameterNodeWrapper/guiConnectors.py`` at the tags
  v5.8.1 and v5.10.0): ``createGuiConnector`` walks the connectors in registration order and calls
  ``create`` of the FIRST whose ``canRepresent(widget, type)`` is true; widget classes are compared
  exactly (``type(widget) in (...)``); ``create`` may still raise (a combo box bound to a plain ``str``
  without ``Choice``, a slider without bounds);
- every Slicer, CTK and MRML name the module and the MRML layer call is listed in docs/slicer_api.md
  with the file that defines it at both tags, and the one absent from 5.8 is only called behind a
  ``hasattr`` guard;
- the module and the library it runs in Slicer's process use no Python newer than Slicer 5.8's (3.9).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "JointRegSeg"
MODULE_FILE = MODULE_DIR / "JointRegSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "JointRegSeg.ui"
API_TABLE = REPO / "docs" / "slicer_api.md"
# What runs inside Slicer: the module and the MRML layer (mrml/core.py and mrml/screenshots.py build a
# headless slicer-core scene for tests and screenshots; Slicer's application does that itself).
SLICER_FACING = [MODULE_FILE] + [
    p for p in sorted((REPO / "JointRegSegLib" / "mrml").glob("*.py")) if p.name not in ("core.py", "screenshots.py")
]
HEAVY = ("torch", "monai", "matplotlib", "scipy", "SimpleITK", "nibabel")
HAND_BOUND = {"method", "device"}  # their lists are filled at run time; JointRegSeg.py binds them itself


@dataclass(frozen=True)
class Field:
    """A parameter-node field as the connectors see it: the type without annotations, and the annotations."""

    base: str
    choice: bool = False
    bounded: bool = False

    @staticmethod
    def parse(annotation: str) -> "Field":
        if "vtkMRML" in annotation:
            return Field("node")
        base = re.match(r"(?:Annotated\[)?(\w+)", annotation).group(1)
        return Field(base, "Choice(" in annotation, any(a in annotation for a in ("WithinRange(", "Minimum(", "Maximum(")))


@dataclass(frozen=True)
class Connector:
    """One registered GUI connector: when ``canRepresent`` is true and whether ``create`` then succeeds."""

    name: str
    widgets: tuple[str, ...]
    types: tuple[str, ...]
    create_fails: Optional[Callable[[str, Field], bool]] = None

    def can_represent(self, widget: str, field: Field) -> bool:
        return widget in self.widgets and field.base in self.types


_SLIDERS_NEED_BOUNDS = lambda widget, field: widget in ("ctkSliderWidget", "qMRMLSliderWidget") and not field.bounded  # noqa: E731
_PATHS = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
_FLOAT_WIDGETS = ("QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox", "qMRMLSpinBox")
_COMMON_HEAD = (
    Connector("QCheckBoxToBoolConnector", ("QCheckBox", "ctkCheckBox"), ("bool",)),
    Connector("QCheckablePushButtonToBoolConnector", ("QPushButton",), ("bool",)),
)
_COMMON_TAIL = (
    Connector("QComboBoxToStringableConnector", ("QComboBox", "ctkComboBox"), ("int", "float", "str", "bool"),
              lambda widget, field: not field.choice),
    Connector("QComboBoxToEnumConnector", ("QComboBox", "ctkComboBox"), ("enum",)),
    Connector("QLineEditToStrConnector", ("QLineEdit",), ("str",)),
    Connector("QLabelToStrConnector", ("QLabel",), ("str",)),
    Connector("QTextEditPlainTextToStrConnector", ("QTextEdit",), ("str",)),
    Connector("ctkRangeWidgetToRangeConnector", ("ctkRangeWidget", "ctkDoubleRangeSlider", "qMRMLRangeWidget"), ("FloatRange",)),
    Connector("ctkPathLineEditToPathConnector", ("ctkPathLineEdit",), _PATHS),
    Connector("ctkDirectoryButtonToPathConnector", ("ctkDirectoryButton",), _PATHS),
    Connector("qMRMLNodeComboBoxToNodeConnector", ("qMRMLNodeComboBox",), ("node",)),
)
_INT_CONNECTOR = Connector(
    "QSliderOrSpinBoxToIntConnector", ("QSlider", "QSpinBox"), ("int",), lambda widget, field: widget == "QSlider" and not field.bounded
)
CONNECTORS: dict[str, tuple[Connector, ...]] = {
    "v5.8.1": _COMMON_HEAD + (
        _INT_CONNECTOR,
        Connector("QDoubleSpinBoxCtkSliderWidgetToFloatConnector", _FLOAT_WIDGETS, ("float",), _SLIDERS_NEED_BOUNDS),
    ) + _COMMON_TAIL,
    "v5.10.0": _COMMON_HEAD + (
        Connector("ctkCheckablePushButtonToBoolConnector", ("ctkCheckablePushButton",), ("bool",)),
        _INT_CONNECTOR,
        Connector("QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector", _FLOAT_WIDGETS, ("float", "int"), _SLIDERS_NEED_BOUNDS),
    ) + _COMMON_TAIL + (Connector("ctkColorPickerButtonToQColorConnector", ("ctkColorPickerButton",), ("QColor",)),),
}


def connector_for(tag: str, widget: str, field: Field) -> tuple[Optional[str], str]:
    """What Slicer's createGuiConnector does at ``tag``: (connector name or None, why it fails or '')."""
    for connector in CONNECTORS[tag]:
        if connector.can_represent(widget, field):
            if connector.create_fails is not None and connector.create_fails(widget, field):
                return None, f"{connector.name} is chosen first and its create() raises"
            return connector.name, ""
    return None, "no connector can represent it (RuntimeError 'Unable to create GUI connector')"


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
    return {
        prop.findtext("string"): widget
        for widget in ui.iter("widget")
        for prop in widget.findall("property")
        if prop.get("name") == "SlicerParameterName"
    }


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
    used = {node.attr for node in ast.walk(module_tree) if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self.ui"}
    assert used, "the module uses no self.ui names?"
    assert used <= names, f"not in JointRegSeg.ui: {sorted(used - names)}"


@pytest.mark.parametrize("tag", sorted(CONNECTORS))
def test_every_binding_gets_a_working_connector_in_slicer(ui, module_tree, tag):
    fields = _parameter_fields(module_tree)
    bound = _parameter_names(ui)
    assert set(bound) == set(fields) - HAND_BOUND, (sorted(set(fields) - HAND_BOUND - set(bound)), sorted(set(bound) - set(fields)))
    for name, widget in bound.items():
        chosen, why = connector_for(tag, widget.get("class"), Field.parse(fields[name]))
        assert chosen is not None, f"Slicer {tag}: '{name}' ({fields[name]}) on a {widget.get('class')}: {why}"
        if chosen == "qMRMLNodeComboBoxToNodeConnector":
            types = {s.text for s in widget.find("property[@name='nodeTypes']").iter("string")}
            assert types == set(re.findall(r"vtkMRML\w+", fields[name])), name


@pytest.mark.parametrize("tag", sorted(CONNECTORS))
def test_the_rule_rejects_the_bindings_that_break_the_panel(tag):
    """The rule encoded above refuses what broke the panel: a ctkComboBox bound to a plain str."""
    assert connector_for(tag, "ctkComboBox", Field("str"))[0] is None
    assert connector_for(tag, "ctkComboBox", Field("str", choice=True))[0] == "QComboBoxToStringableConnector"
    assert connector_for(tag, "ctkSliderWidget", Field("float"))[0] is None
    assert connector_for(tag, "QDoubleSpinBox", Field("float"))[0] is not None


def test_hand_bound_fields_are_written_by_the_module(module_tree):
    written = {
        target.attr
        for node in ast.walk(module_tree)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Attribute) and ast.unparse(target.value) == "self._parameterNode"
    }
    assert HAND_BOUND <= written


def test_bindings_are_made_once_with_a_tag(module_tree):
    """connectGui returns no tag in 5.8 (so it could never be disconnected) and every connection adds an
    observer: the module binds through connectParametersToGui (a tag in both) and only for a new node."""
    calls = {node.func.attr for node in ast.walk(module_tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert "connectParametersToGui" in calls and "connectGui" not in calls


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

    visit(ast.parse(path.read_text(), filename=str(path)).body)
    return found


def test_module_loads_only_the_light_controller():
    roots = {name.split(".")[0] for name in _top_level_imports(MODULE_FILE)}
    assert not roots & set(HEAVY), sorted(roots & set(HEAVY))
    library = {name for name in _top_level_imports(MODULE_FILE) if name.startswith("JointRegSegLib")}
    assert library <= {"JointRegSegLib.app", "JointRegSegLib.app.environment", "JointRegSegLib.methods.catalogue"}, library
    code = "import sys, JointRegSegLib.app; print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))"
    out = subprocess.run([sys.executable, "-c", code, *HEAVY], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", f"importing the controller loads {out.stdout.strip()}"


def test_cmake_lists_every_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "JointRegSeg")
    scripts = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    listed = set(re.findall(r"^\s+([\w/${}.]+\.py)\s*$", text, re.M))
    assert scripts == listed, scripts ^ listed
    for resource in re.findall(r"^\s+(Resources/[\w/${}.]+)\s*$", text, re.M):
        assert (MODULE_DIR / resource).is_file(), resource
    top = (REPO / "CMakeLists.txt").read_text()
    assert "add_subdirectory(JointRegSeg)" in top and 'EXTENSION_DEPENDS "PyTorch"' in top


def test_requirements_never_touch_what_slicer_or_pytorch_provide():
    from JointRegSegLib.app.environment import read_requirements

    names = {re.match(r"[A-Za-z0-9._-]+", line).group(0).lower() for line in read_requirements(MODULE_DIR / "Resources" / "requirements.txt")}
    assert names and not names & {"torch", "numpy", "simpleitk"}


# Slicer API use


def _api_table() -> dict[str, tuple[str, str, str]]:
    """``{name: (defining file, in 5.8.1, in 5.10.0)}`` from docs/slicer_api.md."""
    rows = {}
    for line in API_TABLE.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] and cells[0] not in ("API", "---"):
            rows[cells[0]] = (cells[1], cells[2], cells[3])
    return rows


def _slicer_calls(path: Path) -> set[str]:
    """Slicer names ``path`` uses: CamelCase methods called on any object (MRML/VTK style), every
    ``slicer.<name>`` and ``slicer.<class>.<static method>``, ``slicer.util.*``/``slicer.app.*``, ``qt.*``/``ctk.*``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and re.match(r"^[A-Z][A-Za-z0-9]+$", node.func.attr):
            if not re.match(r"^(slicer\.(util|app|vtk\w+)|qt|ctk)$", ast.unparse(node.func.value)):
                names.add(node.func.attr)
        if isinstance(node, ast.Attribute):
            text = ast.unparse(node)
            if re.match(r"^(slicer\.(util|app)\.\w+|slicer\.vtk\w+(\.\w+)?|slicer\.q\w+|qt\.\w+|ctk\.\w+)$", text):
                names.add(text)
    return {name for name in names if not name.startswith(("slicer.vtkMRMLScene.", "slicer.mrmlScene"))}


def _ui_classes() -> set[str]:
    return {w.get("class") for w in ET.parse(UI_FILE).getroot().iter("widget") if not w.get("class").startswith("Q")}


def test_every_slicer_api_used_is_in_the_table_checked_at_both_tags():
    table = _api_table()
    used = set().union(_ui_classes(), *(_slicer_calls(path) for path in SLICER_FACING))
    missing = sorted(name for name in used if name not in table)
    assert not missing, f"add these to {API_TABLE.name} (with the Slicer file that defines them at v5.8.1 and v5.10.0): {missing}"
    for name, (source, in_58, in_510) in table.items():
        assert source and in_58 in ("yes", "no") and in_510 == "yes", (name, source, in_58, in_510)


def _guarded(tree: ast.Module, name: str) -> bool:
    """True when every call of ``.name(...)`` sits inside ``if hasattr(..., "name"):``."""
    guarded_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and 'hasattr(' in ast.unparse(node.test) and f"'{name}'" in ast.unparse(node.test):
            guarded_nodes |= {id(n) for n in ast.walk(node)}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == name]
    return all(id(call) in guarded_nodes for call in calls)


def test_calls_missing_from_slicer_58_are_guarded():
    only_510 = [name for name, (_, in_58, _) in _api_table().items() if in_58 == "no"]
    assert "SetColorDefined" in only_510
    for path in SLICER_FACING:
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in only_510:
            assert _guarded(tree, name), f"{path.name} calls {name} (absent from Slicer 5.8) without a hasattr guard"


# Python of Slicer 5.8 (3.9)


def test_library_and_module_need_no_python_newer_than_slicers():
    """Slicer 5.8 runs Python 3.9 (SuperBuild/External_python.cmake at v5.8.1), in its own process and the worker's."""
    sources = [str(REPO / "JointRegSegLib"), str(MODULE_DIR)]
    vermin = shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (pip install -e '.[test]')")
    out = subprocess.run([vermin, "--no-tips", "--target=3.9-", "--violations", *sources], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
    python39 = shutil.which("python3.9")
    if python39 is not None and subprocess.run([python39, "-c", "pass"], capture_output=True).returncode == 0:
        compiled = subprocess.run([python39, "-m", "compileall", "-q", *sources], capture_output=True, text=True)
        assert compiled.returncode == 0, compiled.stdout[-3000:]
