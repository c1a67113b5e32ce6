"""The Qt-free controller that every view (the Slicer module, the web page) shares.

Importing it loads no torch, matplotlib, nibabel, scipy or SimpleITK: a fresh Slicer can list the
methods and offer the install before any requirement is there.
"""

from .controller import OVERLAYS, Controller, Run
from .environment import Dependencies, slicer_python
from .request import RunRequest
from .state import RunState, apply_button
from .texts import describe_method, device_label, format_duration, progress_text

__all__ = [
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
    "progress_text",
    "slicer_python",
]
