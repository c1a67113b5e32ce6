"""Warping, displacement/velocity fields, affine matrices and physical (LPS mm) displacement fields.

One convention everywhere: voxel fields ``(B, 3, I, J, K)`` on the network grid, pull warping
``out(p) = image(p + u(p))`` through `warp`; physical fields are `Volume` ``(I, J, K, 3)`` LPS mm
on the fixed grid (ITK convention).
"""

from importlib import import_module
from typing import Any

from .affine import (
    affine_displacement_at,
    affine_from_radians,
    affine_jacobian,
    affine_matrix,
    affine_to_displacement,
    compose_affines,
    fit_to_points,
    index_affine_to_normalised,
    index_affine_to_physical,
    normalised_affine_to_index,
    to_sitk_affine,
)
from .fields import compose, integrate_velocity, rescale_field
from .physical import physical_to_voxel_field, regrid_voxel_field, voxel_to_physical_field, warp_volume
from .warp import check_field, identity_grid, sample_at_indices, warp

_FIELD_IO = ("read_displacement_field", "to_sitk_transform", "write_displacement_field")


def __getattr__(name: str) -> Any:
    """The field file functions (SimpleITK) are imported on first use, so warping and fields need torch alone."""
    if name not in _FIELD_IO:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(".field_io", __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "affine_displacement_at",
    "affine_from_radians",
    "affine_jacobian",
    "affine_matrix",
    "fit_to_points",
    "affine_to_displacement",
    "check_field",
    "compose",
    "compose_affines",
    "identity_grid",
    "index_affine_to_normalised",
    "index_affine_to_physical",
    "integrate_velocity",
    "normalised_affine_to_index",
    "physical_to_voxel_field",
    "read_displacement_field",
    "regrid_voxel_field",
    "rescale_field",
    "sample_at_indices",
    "to_sitk_affine",
    "to_sitk_transform",
    "voxel_to_physical_field",
    "warp",
    "warp_volume",
    "write_displacement_field",
]
