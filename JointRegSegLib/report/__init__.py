"""Pictures of registration results as PNG: orthogonal views, checkerboard, Jacobian and PMM maps, contours.

What they show (`rows`, `slices`) needs numpy alone; the drawing (`figures`, `colormaps`) needs matplotlib,
imported when one of its names is first asked for here, so a process that only cuts the slices (a run whose
pictures a child process draws, `worker.beside`) never imports it.
"""

from importlib import import_module
from typing import Any

from ..colour_scales import (
    JACOBIAN_FOLDING_RGB,
    JACOBIAN_RANGE,
    jacobian_control_points,
    pmm_control_points,
    robust_window,
)
from .rows import Picture, Row, individual_pictures, registration_picture, segmentation_picture
from .slices import (
    canonical_index,
    checkerboard,
    default_index,
    lps_axis_map,
    orthogonal_aspects,
    orthogonal_slices,
    to_lps_canonical,
)

__all__ = [
    "JACOBIAN_FOLDING_RGB",
    "JACOBIAN_RANGE",
    "JacobianNorm",
    "canonical_index",
    "checkerboard",
    "default_index",
    "draw_picture",
    "draw_pictures",
    "individual_pictures",
    "jacobian_colormap",
    "jacobian_control_points",
    "jacobian_rgba",
    "lps_axis_map",
    "orthogonal_aspects",
    "orthogonal_slices",
    "Picture",
    "pmm_colormap",
    "pmm_control_points",
    "registration_picture",
    "robust_window",
    "Row",
    "save_slices_png",
    "segmentation_picture",
    "to_lps_canonical",
]

_DRAWING = {
    "colormaps": ("JacobianNorm", "jacobian_colormap", "jacobian_rgba", "pmm_colormap"),
    "figures": ("draw_picture", "draw_pictures", "save_slices_png"),
}


def __getattr__(name: str) -> Any:
    """The drawing's names (`_DRAWING`), imported from their module when first asked for."""
    for module, names in _DRAWING.items():
        if name in names:
            return getattr(import_module(f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
