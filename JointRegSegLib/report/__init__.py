"""Pictures of registration results as PNG: orthogonal views, checkerboard, Jacobian and PMM maps, contours."""

from ..colour_scales import (
    JACOBIAN_FOLDING_RGB,
    JACOBIAN_RANGE,
    jacobian_control_points,
    pmm_control_points,
    robust_window,
)
from .colormaps import JacobianNorm, jacobian_colormap, jacobian_rgba, pmm_colormap
from .figures import save_individual_pictures, save_registration_figure, save_segmentation_picture, save_slices_png
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
    "jacobian_colormap",
    "jacobian_control_points",
    "jacobian_rgba",
    "lps_axis_map",
    "orthogonal_aspects",
    "orthogonal_slices",
    "pmm_colormap",
    "pmm_control_points",
    "robust_window",
    "save_individual_pictures",
    "save_registration_figure",
    "save_segmentation_picture",
    "save_slices_png",
    "to_lps_canonical",
]
