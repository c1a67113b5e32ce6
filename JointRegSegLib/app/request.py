"""What a user asks for (nodes, method, device, options) and why it cannot run yet, in the user's words."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import InputError
from ..methods.catalogue import MethodInfo
from ..methods.options import SETTINGS, validate_options, validate_setting


@dataclass
class RunRequest:
    """One press of Apply (or Compare): the input nodes and the settings. Nodes may be None."""

    fixed: Any = None
    moving: Any = None
    fixed_segmentation: Any = None
    moving_segmentation: Any = None
    atlas: Any = None
    atlas_segmentation: Any = None
    device: str = "cpu"
    iterations: Optional[int] = None
    time_budget: Optional[float] = None
    seed: int = 0
    output_folder: str = ""
    output_name: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    whole_jacobian: bool = False  # the det J map of the whole mapping instead of its deformable part


AUTO_ITERATIONS = -1
"""The panel's iteration count meaning "the method's default" (its spin box shows it as "auto")."""
NO_TIME_LIMIT = 0.0
"""The panel's time budget meaning "no limit" (its spin box shows it as "no limit")."""


def panel_iterations(value: int) -> Optional[int]:
    """The iteration cap a panel's spin box asks for: None (the method's default) at `AUTO_ITERATIONS` or below."""
    return None if value <= AUTO_ITERATIONS else int(value)


def panel_time_budget(value: float) -> Optional[float]:
    """The time budget a panel's spin box asks for: None (no limit) at `NO_TIME_LIMIT` or below."""
    return None if value <= NO_TIME_LIMIT else float(value)


def problem(request: RunRequest, info: MethodInfo) -> Optional[str]:
    """Why ``request`` cannot run with the method ``info`` describes (None when it can).

    The settings and the method's options are checked against their declared schema (`methods.options`),
    the one the worker and the command line check them with.
    """
    try:
        for name in (name for name in SETTINGS if hasattr(request, name)):
            validate_setting(name, getattr(request, name), name.replace("_", " ").capitalize())
        validate_options(info.name, request.options)
    except InputError as error:
        return str(error)
    if info.needs_atlas:  # the moving volume goes to the atlas (the shipped one unless one is chosen)
        if request.moving is None:
            return "Select the volume to register to the atlas (moving volume)."
        if (request.atlas is None) != (request.atlas_segmentation is None):
            return "Select both an atlas volume and its segmentation, or neither to use the shipped MNI152 atlas."
        return None
    if request.fixed is None or request.moving is None:
        return "Select a fixed and a moving volume."
    if request.fixed is request.moving or request.fixed.GetID() == request.moving.GetID():
        return "The fixed and moving volumes must be different volumes."
    if info.needs_segmentations and (request.fixed_segmentation is None or request.moving_segmentation is None):
        return f"{info.name} needs a segmentation (or label map) of both the fixed and the moving volume."
    return None
