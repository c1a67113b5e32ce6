"""Reading and writing volumes: NIfTI, NRRD, MetaImage through SimpleITK; FreeSurfer MGH/MGZ through nibabel.

Every reader returns a `Volume` whose geometry is in ITK's LPS convention; nibabel's RAS affine is
converted with ``LPS = diag(-1, -1, 1) @ RAS``.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError

from ..errors import InputError
from .geometry import Geometry, Volume
from .sitk_bridge import from_sitk, to_sitk
from .validate import check_3d, check_image, check_labels

SITK_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NIBABEL_EXTENSIONS = (".mgz", ".mgh")
SUPPORTED_EXTENSIONS = SITK_EXTENSIONS + NIBABEL_EXTENSIONS

# LPS <-> RAS: flip the first two physical axes (the matrix is its own inverse).
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Single-file formats that SimpleITK can compress internally (.nii.gz is compressed by its name).
_COMPRESSED_ON_WRITE = (".nrrd", ".mha")
_READ_ERRORS = (RuntimeError, OSError, EOFError, ValueError, zlib.error, ImageFileError)
_CHUNK = 1 << 22


def extension_of(path: str | Path) -> str:
    """The supported extension ``path`` ends with (lower case), or raise `InputError`."""
    name = Path(path).name.lower()
    for extension in SUPPORTED_EXTENSIONS:
        if name.endswith(extension):
            return extension
    raise InputError(
        f"'{path}' has an unsupported file type; JointRegSeg reads and writes {', '.join(SUPPORTED_EXTENSIONS)}."
    )


def _corrupt(path: Path, name: str, detail: str = "") -> InputError:
    return InputError(
        f"{name} file '{path}' is unreadable or corrupt{': ' + detail if detail else ''}. "
        "Check that it is a complete image file (re-export or copy it again)."
    )


def _check_readable_file(path: Path, name: str) -> None:
    if not path.exists():
        raise InputError(f"{name} file '{path}' is missing: no such file. Check the path.")
    if not path.is_file():
        raise InputError(f"{name} path '{path}' is a folder, not an image file.")


def _nifti_data_bytes_present(path: Path) -> int:
    """Bytes in a NIfTI file after decompression (reading a truncated gzip stream raises EOFError)."""
    with path.open("rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    if not compressed:
        return path.stat().st_size
    total = 0
    with gzip.open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            total += len(chunk)
    return total


def _check_nifti_complete(path: Path, name: str) -> None:
    """ITK silently zero-fills a truncated NIfTI file, so compare its size with what the header promises."""
    header = nib.load(path).header
    needed = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    present = _nifti_data_bytes_present(path)
    if present < needed:
        raise _corrupt(path, name, f"the file is truncated ({present} of {needed} bytes)")


def _ras_affine_to_geometry(affine: np.ndarray, shape: tuple[int, ...], zooms: tuple[float, ...]) -> Geometry:
    lps = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.asarray(zooms[:3], dtype=np.float64)
    return Geometry(shape=shape[:3], spacing=spacing, origin=lps[:3, 3], direction=lps[:3, :3] / spacing)


def _geometry_to_ras_affine(geometry: Geometry) -> np.ndarray:
    return _RAS_TO_LPS @ geometry.index_to_physical_matrix


def _read_raw(path: Path, name: str) -> tuple[np.ndarray, Geometry | None]:
    """Array in ``[i, j, k(, ...)]`` order (any dimensionality) and, for a 3D grid, its geometry."""
    _check_readable_file(path, name)
    extension = extension_of(path)
    try:
        if extension in NIBABEL_EXTENSIONS:
            image = nib.MGHImage.from_filename(str(path))
            array = np.asarray(image.dataobj)  # MGH always stores (I, J, K) or (I, J, K, frames)
            return array, _ras_affine_to_geometry(image.affine, array.shape, image.header.get_zooms())
        image = sitk.ReadImage(str(path))
        if extension in (".nii", ".nii.gz"):
            _check_nifti_complete(path, name)
    except InputError:
        raise
    except _READ_ERRORS as error:
        raise _corrupt(path, name) from error
    if image.GetDimension() == 3:
        volume = from_sitk(image)
        return volume.array, volume.geometry
    array = sitk.GetArrayFromImage(image)
    spatial = image.GetDimension()
    order = tuple(reversed(range(spatial))) + tuple(range(spatial, array.ndim))
    return array.transpose(order), None


def read_volume(path: str | Path, name: str = "image") -> Volume:
    """A 3D scalar or vector (components last) volume in its stored voxel type, without content checks."""
    path = Path(path)
    label = f"{name} '{path}'"
    array, geometry = _read_raw(path, name)
    if geometry is None:
        check_3d(array, label)
    return Volume(array, geometry)


def read_image(path: str | Path, name: str = "image") -> Volume:
    """A validated 3D intensity image as float32 (see `check_image`)."""
    path = Path(path)
    array, geometry = _read_raw(path, name)
    check_image(array, f"{name} '{path}'")
    return Volume(array.astype(np.float32), geometry)


def read_labels(path: str | Path, name: str = "label map") -> Volume:
    """A validated 3D label map as int32 (see `check_labels`)."""
    path = Path(path)
    array, geometry = _read_raw(path, name)
    check_labels(array, f"{name} '{path}'")
    if np.issubdtype(array.dtype, np.floating):
        array = np.rint(array)
    return Volume(array.astype(np.int32), geometry)


def _mgh_array(array: np.ndarray) -> np.ndarray:
    """The array in a voxel type MGH stores: uint8, int16, int32 or float32."""
    if array.dtype in (np.bool_, np.uint8):
        return array.astype(np.uint8)
    if array.dtype in (np.int8, np.int16):
        return array.astype(np.int16)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InputError("values exceed the int32 range that MGH/MGZ files store; write .nii.gz instead.")
        return array.astype(np.int32)
    return array.astype(np.float32)


def _sitk_array(array: np.ndarray) -> np.ndarray:
    """The array in a voxel type SimpleITK writes (booleans as uint8, half floats as float32)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return array


def write_volume(volume: Volume, path: str | Path) -> None:
    """Write a 3D scalar or vector volume; the extension picks the format (see `SUPPORTED_EXTENSIONS`)."""
    path = Path(path)
    extension = extension_of(path)
    if volume.array.ndim not in (3, 4):
        raise InputError(
            f"cannot write an array with {volume.array.ndim} dimensions to '{path}': need 3D or 3D + components."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if extension in NIBABEL_EXTENSIONS:
            nib.save(nib.MGHImage(_mgh_array(volume.array), _geometry_to_ras_affine(volume.geometry)), str(path))
        else:
            image = to_sitk(volume.with_array(_sitk_array(volume.array)))
            sitk.WriteImage(image, str(path), useCompression=extension in _COMPRESSED_ON_WRITE)
    except (RuntimeError, OSError, ValueError) as error:
        raise InputError(
            f"could not write '{path}': check that the folder is writable and the disk is not full."
        ) from error
