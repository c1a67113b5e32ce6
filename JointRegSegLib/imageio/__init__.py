"""Image input/output, validation, and resampling onto and off the network grid.

The names of the modules that need SimpleITK or nibabel (``io``, ``network_grid``, ``sitk_bridge``)
are imported on first use (PEP 562), so `Geometry`, `Volume` and `normalise_intensity` come without
them: the training path runs on machines that have torch and numpy alone (`training.all`, GPU run).
"""

from importlib import import_module
from typing import Any

from .geometry import Geometry, Volume
from .intensity import normalise_intensity
from .validate import check_3d, check_image, check_labels, check_same_grid

_LAZY = {
    **dict.fromkeys(("SUPPORTED_EXTENSIONS", "extension_of", "read_image", "read_labels", "read_volume", "write_volume"), "io"),
    **dict.fromkeys(("RAS_DIRECTION", "corner_points", "from_network", "network_geometry", "resample", "to_network"), "network_grid"),
    **dict.fromkeys(("from_sitk", "geometry_of", "reference_image", "to_sitk"), "sitk_bridge"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Geometry",
    "Volume",
    "from_sitk",
    "to_sitk",
    "geometry_of",
    "reference_image",
    "SUPPORTED_EXTENSIONS",
    "extension_of",
    "read_image",
    "read_labels",
    "read_volume",
    "write_volume",
    "check_3d",
    "check_image",
    "check_labels",
    "check_same_grid",
    "RAS_DIRECTION",
    "corner_points",
    "network_geometry",
    "resample",
    "to_network",
    "from_network",
    "normalise_intensity",
]
