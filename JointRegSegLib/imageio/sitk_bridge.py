"""Conversion between `Volume` and SimpleITK images (the only place that transposes axes)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .geometry import Geometry, Volume


def geometry_of(image: sitk.Image) -> Geometry:
    """The grid of a 3D SimpleITK image."""
    return Geometry(
        shape=image.GetSize(),
        spacing=image.GetSpacing(),
        origin=image.GetOrigin(),
        direction=np.array(image.GetDirection()).reshape(3, 3),
    )


def from_sitk(image: sitk.Image) -> Volume:
    """A `Volume` ([i, j, k(, c)] array) from a 3D scalar or vector SimpleITK image."""
    array = sitk.GetArrayFromImage(image)
    axes = (2, 1, 0, 3) if image.GetNumberOfComponentsPerPixel() > 1 else (2, 1, 0)
    return Volume(np.ascontiguousarray(array.transpose(axes)), geometry_of(image))


def to_sitk(volume: Volume) -> sitk.Image:
    """A SimpleITK image (vector image when the array has a 4th axis) with the volume's grid."""
    is_vector = volume.array.ndim == 4
    axes = (2, 1, 0, 3) if is_vector else (2, 1, 0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array.transpose(axes)), isVector=is_vector)
    image.SetSpacing(volume.geometry.spacing)
    image.SetOrigin(volume.geometry.origin)
    image.SetDirection(tuple(volume.geometry.direction.ravel()))
    return image


def reference_image(geometry: Geometry) -> sitk.Image:
    """An empty image carrying a grid, for use as a SimpleITK resampling reference."""
    image = sitk.Image([int(s) for s in geometry.shape], sitk.sitkUInt8)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(tuple(geometry.direction.ravel()))
    return image
