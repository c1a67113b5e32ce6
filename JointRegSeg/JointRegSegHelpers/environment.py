"""Where JointRegSegLib is, what the methods need and give, and which requirements are missing.

Nothing here imports torch or JointRegSegLib's numerical code: the module learns about methods
and devices by asking the worker's Python (`DESCRIBE_SCRIPT`), so torch is only ever loaded in
the background process, never in Slicer's own.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any

# Prints one JSON line: every registered method's MethodInfo and the devices torch can use.
DESCRIBE_SCRIPT = (
    "import dataclasses, json\n"
    "from JointRegSegLib.methods import get_method, method_names\n"
    "from JointRegSegLib.device import available_devices\n"
    "infos = [dataclasses.asdict(get_method(name).info) for name in method_names()]\n"
    "print(json.dumps({'event': 'describe', 'methods': infos, 'devices': available_devices()}), flush=True)\n"
)

# Packages Slicer ships and that must never be installed or upgraded into it (SLICER.md).
SLICER_OWN_PACKAGES = ("numpy", "SimpleITK")


def library_root(module_dir: Path) -> Path:
    """The folder holding the JointRegSegLib package: the installed one, else the repository's.

    In a built extension JointRegSegLib sits next to the module file; in a source checkout added to
    Slicer's module paths it is the module folder's parent (the repository root).
    """
    spec = importlib.util.find_spec("JointRegSegLib")
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parents[1]
    for candidate in (module_dir, module_dir.parent):
        if (candidate / "JointRegSegLib" / "__init__.py").is_file():
            return candidate
    raise FileNotFoundError(
        f"JointRegSegLib was not found next to {module_dir} or in its parent folder; reinstall the JointRegSeg extension."
    )


def describe_method(info: dict[str, Any]) -> str:
    """One line telling what a method (its MethodInfo as a dict) needs and gives."""
    needs = ["the fixed and moving images"]
    if info.get("needs_segmentations"):
        needs.append("label maps of both")
    if info.get("needs_atlas"):
        needs.append("an atlas image with its label map")
    gives = ["warped image", "transform", "Jacobian and PMM maps", "metrics"]
    if info.get("gives_affine"):
        gives.insert(2, "affine part")
    if info.get("gives_segmentation"):
        gives.append("segmentations")
    if info.get("gives_brain_mask"):
        gives.append("brain mask")
    text = f"Needs {', '.join(needs)}. Gives {', '.join(gives)}."
    if info.get("supports_tto"):
        text += " Adapts to the pair (iterations and time budget apply)."
    return text


_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$")


def read_requirements(path: Path) -> list[str]:
    """The requirement lines of a requirements.txt (comments and blank lines dropped)."""
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def missing_requirements(requirements: list[str]) -> list[str]:
    """Requirements not satisfied by the installed distributions (version specifiers checked when
    the ``packaging`` library is available, else presence only)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None
    missing = []
    for line in requirements:
        match = _REQUIREMENT.match(line)
        if match is None:
            continue
        name = match.group(1)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if Requirement is not None and not Requirement(line).specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def protected_constraints() -> list[str]:
    """pip constraints pinning the packages Slicer ships to their installed versions."""
    pins = []
    for name in SLICER_OWN_PACKAGES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins
