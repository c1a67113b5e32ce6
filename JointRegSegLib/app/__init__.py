"""The Qt-free controller that every view (the Slicer module, the web page) shares.

Importing it loads no torch, matplotlib, nibabel, scipy or SimpleITK: a fresh Slicer can list the
methods and offer the install before any requirement is there.
"""

from .controller import OVERLAYS, Controller, Run
from .environment import Dependencies, slicer_python
from .request import AUTO_ITERATIONS, NO_TIME_LIMIT, RunRequest, panel_iterations, panel_time_budget
from .state import RunState, apply_button
from .texts import describe_method, device_label, format_duration, progress_text

__all__ = [
    "AUTO_ITERATIONS",
    "NO_TIME_LIMIT",
    "OVERLAYS",
    "Controller",
    "Dependencies",
    "Run",
    "RunRequest",
    "RunState",
    "apply_button",
    "describe_method",
    "device_label",
    "format_duration",
    "panel_iterations",
    "panel_time_budget",
    "progress_text",
    "slicer_python",
]
