"""Image input/output, validation, and resampling onto and off the network grid."""

from .geometry import Geometry, Volume
from .intensity import normalise_intensity
from .io import SUPPORTED_EXTENSIONS, extension_of, read_image, read_labels, read_volume, write_volume
from .network_grid import RAS_DIRECTION, corner_points, from_network, network_geometry, resample, to_network
from .sitk_bridge import from_sitk, geometry_of, reference_image, to_sitk
from .validate import check_3d, check_image, check_labels, check_same_grid

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
