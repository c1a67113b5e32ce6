"""The worker's Python and what it has installed: requirements, torch, the devices torch can use.

Nothing here imports torch: whether torch is installed is read from package metadata, and which
devices it can use is asked of the worker's Python in a background process (`DESCRIBE_SCRIPT`), so
Slicer's own process never loads torch and never waits for it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import JointRegSegLib

# Prints one JSON line: torch's version and the devices it can use (CPU first).
DESCRIBE_SCRIPT = (
    "import json, torch\n"
    "from JointRegSegLib.device import available_devices\n"
    "print(json.dumps({'event': 'describe', 'torch': torch.__version__, 'cuda': torch.version.cuda,"
    " 'devices': available_devices()}), flush=True)\n"
)

# Packages Slicer ships and that must never be installed or upgraded into it (SLICER.md).
SLICER_OWN_PACKAGES = ("numpy", "SimpleITK")
TORCH_REQUIREMENT = "torch>=2.1"

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$")


def library_root() -> Path:
    """The folder holding the JointRegSegLib package (put on the worker's PYTHONPATH)."""
    return Path(JointRegSegLib.__file__).resolve().parents[1]


def worker_environment(base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """An environment in which ``python -m JointRegSegLib.worker`` finds this library first."""
    env = dict(os.environ if base is None else base)
    root = str(library_root())
    paths = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def worker_command(python: str, job_file: Optional[Path] = None) -> list[str]:
    """The command line that runs one job with the worker; without ``job_file``, a worker that loads
    everything a job needs and then reads the job file's path from stdin (``--wait``)."""
    return [python, "-m", "JointRegSegLib.worker", "--wait" if job_file is None else str(job_file)]


def slicer_python(slicer_home: str) -> str:
    """Slicer's own Python launcher (PythonSlicer), which runs the worker with Slicer's packages.

    Slicer's ``sys.executable`` is the Slicer launcher itself (unless Slicer runs a script), so there
    is no safe fallback: a clear error says what is wrong instead.
    """
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidate = Path(slicer_home) / "bin" / name
    if candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(
        f"JointRegSeg runs its computation with Slicer's Python ({name}), which was not found in "
        f"{candidate.parent}. Reinstall 3D Slicer; a build tree needs its 'bin' folder."
    )


def read_requirements(path: Path) -> list[str]:
    """The requirement lines of a requirements.txt (comments and blank lines dropped)."""
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def installed_version(name: str) -> Optional[str]:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


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
        installed = installed_version(match.group(1))
        if installed is None:
            missing.append(line)
        elif Requirement is not None and not Requirement(line).specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def protected_constraints() -> list[str]:
    """pip constraints pinning the packages Slicer ships to their installed versions."""
    return [f"{name}=={version}" for name in SLICER_OWN_PACKAGES if (version := installed_version(name))]


@dataclass
class Dependencies:
    """What the worker's Python has: torch (version, CUDA, devices) and the other requirements."""

    torch: Optional[str]
    missing: list[str]
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    cuda: Optional[str] = None
    checked_devices: bool = False
    problem: Optional[str] = None

    @property
    def ready(self) -> bool:
        return self.torch is not None and not self.missing

    def summary(self) -> str:
        """A few lines for the Dependencies panel."""
        if self.torch is None:
            torch_line = "PyTorch: not installed."
        elif not self.checked_devices:
            torch_line = f"PyTorch {self.torch}: checking which devices it can use..."
        else:
            gpus = [d for d in self.devices if d != "cpu"]
            where = f"GPU available ({', '.join(gpus)}, CUDA {self.cuda})" if gpus else "CPU only (no usable GPU)"
            torch_line = f"PyTorch {self.torch}: {where}."
        others = f"Missing: {', '.join(self.missing)}." if self.missing else "Other requirements: installed."
        lines = [torch_line, others]
        if self.problem:
            lines.append(self.problem)
        return "\n".join(lines)


def dependencies(requirements_file: Path, describe: Optional[dict[str, Any]] = None, problem: Optional[str] = None) -> Dependencies:
    """The state of the dependencies, with the worker's own answer (``describe`` event) where there is one."""
    torch = installed_version("torch")
    found = Dependencies(torch=torch, missing=missing_requirements(read_requirements(requirements_file)), problem=problem)
    if describe is not None:
        found.torch = str(describe.get("torch") or torch)
        found.cuda = describe.get("cuda")
        found.devices = [str(d) for d in describe.get("devices") or ["cpu"]]
        found.checked_devices = True
    return found
