"""Reading and writing physical displacement fields (ITK / ANTs / 3D Slicer grid-transform files).

A field is a float32 3-component vector image on the fixed grid holding LPS mm displacements.
NIfTI files are written as NIfTI's displacement-vector images (intent code 1006, NIFTI_INTENT_DISPVECT)
with the vectors in NIfTI's RAS frame, the form 3D Slicer writes and expects (it warns that a
transform "may be incorrect" for any other intent code); ITK, SimpleITK, ANTs and Slicer turn them
back into LPS on reading. NRRD and MetaImage files hold the LPS vectors as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..imageio.geometry import Volume
from ..imageio.io import write_nifti
from ..imageio.sitk_bridge import from_sitk, to_sitk

SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
DISPLACEMENT_INTENT = 1006  # NIFTI_INTENT_DISPVECT


def _check_field(field: Volume) -> None:
    if field.array.ndim != 4 or field.array.shape[3] != 3:
        raise InputError(f"a displacement field needs an (I, J, K, 3) array; got shape {field.array.shape}")


def _check_suffix(path: Path) -> None:
    if not str(path).lower().endswith(SUFFIXES):
        raise InputError(f"{path}: a displacement field file must end with one of {', '.join(SUFFIXES)}")


def write_displacement_field(field: Volume, path: str | Path, threads: int | None = None) -> None:
    """Write a physical field ``(I, J, K, 3)`` LPS mm as a float32 vector image (.nii.gz, .nrrd, .mha ...).

    NIfTI files are written by `imageio.io.write_nifti` (``.nii.gz`` compressed fast on ``threads``
    threads: most of a float field is stored, its mantissas do not compress).
    """
    _check_field(field)
    path = Path(path)
    _check_suffix(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: the folder {path.parent} does not exist; create it first")
    vectors = np.asarray(field.array, dtype=np.float32)
    if str(path).lower().endswith((".nii", ".nii.gz")):
        affine = field.geometry.index_to_ras_matrix
        write_nifti(  # LPS -> RAS components: x and y negated
            path, vectors[:, :, :, None, :], affine, intent=DISPLACEMENT_INTENT, units=("mm", "unknown"), codes=(0, 2),
            threads=threads, negated=(0, 1),
        )
        return
    sitk.WriteImage(to_sitk(field.with_array(vectors)), str(path), useCompression=True)


def read_displacement_field(path: str | Path) -> Volume:
    """Read a displacement field file written by `write_displacement_field`, ITK or ANTs (float32 array)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: displacement field file not found")
    _check_suffix(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"{path}: cannot be read as an image ({error})") from error
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 3:
        raise InputError(
            f"{path}: a displacement field must be a 3D image with 3 components per voxel; got "
            f"{image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} component(s)"
        )
    volume = from_sitk(image)
    return volume.with_array(volume.array.astype(np.float32, copy=False))


def to_sitk_transform(field: Volume) -> sitk.DisplacementFieldTransform:
    """A SimpleITK displacement-field transform (fixed physical point ``x`` -> ``x + u(x)``)."""
    _check_field(field)
    image = to_sitk(field.with_array(np.asarray(field.array, dtype=np.float64)))
    return sitk.DisplacementFieldTransform(image)
