"""Reading and writing volumes: NIfTI, NRRD, MetaImage through SimpleITK; FreeSurfer MGH/MGZ through nibabel.

Every reader returns a `Volume` whose geometry is in ITK's LPS convention; nibabel's RAS affine is
converted with ``LPS = diag(-1, -1, 1) @ RAS``.
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import stat
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener

from ..errors import InputError, OutputError
from .geometry import Geometry, Volume
from .gzip_parallel import gzip_parts
from .sitk_bridge import from_sitk, geometry_of, to_sitk
from .validate import check_3d, check_finite, check_geometry, check_image, check_labels

SITK_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NIBABEL_EXTENSIONS = (".mgz", ".mgh")
SUPPORTED_EXTENSIONS = SITK_EXTENSIONS + NIBABEL_EXTENSIONS

# LPS <-> RAS: flip the first two physical axes (the matrix is its own inverse).
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Single-file formats that SimpleITK can compress internally (.nii.gz is compressed by its name).
_COMPRESSED_ON_WRITE = (".nrrd", ".mha")
_READ_ERRORS = (RuntimeError, OSError, EOFError, ValueError, zlib.error, ImageFileError)
_CHUNK = 1 << 22
_LOW_SPACE = 1 << 20  # bytes free below which a write that failed without a reason counts as a full disk


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
        f"{name} '{path}' is unreadable or corrupt{': ' + detail if detail else ''}. "
        "Check that it is a complete image file (re-export or copy it again)."
    )


def file_kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    for test, kind in (
        (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device (such as /dev/null)"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def check_readable_file(path: Path, name: str) -> None:
    """``path`` is a readable, non-empty regular file, else an InputError that says what it is instead."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise InputError(
                f"{name} '{path}' is a broken symbolic link: it points to '{os.readlink(path)}', which does not exist. "
                "Fix the link or give the image file itself."
            ) from None
        raise InputError(f"{name} '{path}' is missing: no such file. Check the path.") from None
    except OSError as error:
        reasons = {
            errno.ELOOP: "is a symbolic link loop (its links lead back to themselves). Give the image file itself",
            errno.EACCES: "cannot be read: permission denied. Check the file's permissions",
            errno.ENOTDIR: "is missing: a part of its path is a file, not a folder. Check the path",
            errno.ENAMETOOLONG: "has a name too long for the file system. Check the path",
        }
        raise InputError(f"{name} '{path}' {reasons.get(error.errno, 'cannot be opened: ' + str(error.strerror))}.") from None
    kind = file_kind(info.st_mode)
    if kind is not None:
        raise InputError(f"{name} '{path}' is {kind}, not an image file. Give the path of the image file.")
    if info.st_size == 0:
        raise InputError(f"{name} '{path}' is an empty file (0 bytes). Check that it was copied or exported completely.")
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise InputError(f"{name} '{path}' cannot be read: {error.strerror}. Check the file's permissions.") from None


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


def nifti_bytes_missing(path: Path) -> int:
    """How many bytes of image data a NIfTI file lacks (0 when complete; ITK zero-fills the rest silently)."""
    header = nib.load(path).header
    needed = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    return max(0, needed - _nifti_data_bytes_present(path))


def _check_nifti(path: Path, name: str, geometry: Geometry | None) -> None:
    """What ITK's NIfTI reader does not report: a zero voxel size (read as 1 mm), NaN and inf voxels (read as 0),
    a truncated file (zero-filled), and a header whose sform/qform and pixdim disagree (placed differently by
    other programs)."""
    nifti = nib.load(path)
    header = nifti.header
    with ImageOpener(path) as stream:  # nibabel's loaded header has zero voxel sizes replaced by 1 already
        stored = type(header).from_fileobj(stream, check=False)
    spatial = min(3, len(header.get_data_shape()))
    pixdim = np.asarray(stored["pixdim"][1 : 1 + spatial], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim == 0):
        raise InputError(
            f"{name} '{path}' has voxel size(s) {', '.join(f'{v:g}' for v in pixdim)} in its header (pixdim); every voxel "
            "size must be a positive number of mm. Fix the header (e.g. fslchpixdim) or export the image again."
        )
    scaled = any(v is not None and not (np.isfinite(v) and v in (0, 1)) for v in header.get_slope_inter())
    if header.get_data_dtype().kind in "fc" or scaled:
        check_finite(np.asanyarray(nifti.dataobj), f"{name} '{path}'")
    elif (missing := nifti_bytes_missing(path)) > 0:
        raise _corrupt(path, name, f"the file is truncated ({missing} bytes of image data missing)")
    if geometry is not None:
        ours = _geometry_to_ras_affine(geometry)
        if np.abs(ours - nifti.affine).max() > 1e-4 * (1.0 + np.abs(nifti.affine).max()):
            raise InputError(
                f"{name} '{path}' has an inconsistent header: its voxel sizes (pixdim) and orientation (sform/qform) "
                "disagree, so programs place its voxels differently. Fix the header (e.g. load and save it in 3D Slicer)."
            )


def _itk_read_error(path: Path, name: str, error: RuntimeError) -> Exception:
    """A clear error for what ITK reports while reading."""
    text = str(error)
    if "orthonormal" in text:
        return InputError(
            f"{name} '{path}' has a sheared (non-orthogonal) orientation in its header, which ITK-based tools "
            "(3D Slicer, JointRegSeg) cannot represent. Resample it onto an orthogonal grid first."
        )
    if "Zero-valued spacing" in text:
        return InputError(f"{name} '{path}' has a voxel size of 0 in its header; fix the header or export the image again.")
    if "allocate" in text.lower() or "bad_alloc" in text:
        return MemoryError(f"reading {name} '{path}' needs {_image_bytes(path)} of memory")
    return _corrupt(path, name)


def _image_bytes(path: Path) -> str:
    """The memory an image file's pixels need, from its header, in words."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return "more"
    count = int(np.prod(reader.GetSize())) * reader.GetNumberOfComponents()
    size = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bytes_per = 8 if "64" in size or "double" in size else 4 if "32" in size or "float" in size else 2 if "16" in size else 1
    return f"{count * bytes_per / 2**30:.1f} GiB"


def _ras_affine_to_geometry(affine: np.ndarray, shape: tuple[int, ...], zooms: tuple[float, ...]) -> Geometry:
    lps = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.asarray(zooms[:3], dtype=np.float64)
    return Geometry(shape=shape[:3], spacing=spacing, origin=lps[:3, 3], direction=lps[:3, :3] / spacing)


def _geometry_to_ras_affine(geometry: Geometry) -> np.ndarray:
    return _RAS_TO_LPS @ geometry.index_to_physical_matrix


def _read_raw(path: Path, name: str) -> tuple[np.ndarray, Geometry | None]:
    """Array in ``[i, j, k(, ...)]`` order (any dimensionality) and, for a 3D grid, its checked geometry."""
    check_readable_file(path, name)
    try:
        extension = extension_of(path)
    except InputError as error:
        raise InputError(f"{name} {error}") from None
    try:
        if extension in NIBABEL_EXTENSIONS:
            image = nib.MGHImage.from_filename(str(path))
            array = np.asarray(image.dataobj)  # MGH always stores (I, J, K) or (I, J, K, frames)
            with np.errstate(divide="ignore", invalid="ignore"):
                geometry = _ras_affine_to_geometry(image.affine, array.shape, image.header.get_zooms())
        else:
            try:
                image = sitk.ReadImage(str(path))
            except RuntimeError as error:
                raise _itk_read_error(path, name, error) from None
            geometry = geometry_of(image) if image.GetDimension() == 3 else None
            if extension in (".nii", ".nii.gz"):
                _check_nifti(path, name, geometry)
    except (InputError, MemoryError):
        raise
    except _READ_ERRORS as error:
        raise _corrupt(path, name) from error
    if extension in NIBABEL_EXTENSIONS:
        return _checked(array, geometry, f"{name} '{path}'")
    if image.GetDimension() == 3:
        volume = from_sitk(image)
        return _checked(volume.array, volume.geometry, f"{name} '{path}'")
    array = sitk.GetArrayFromImage(image)
    spatial = image.GetDimension()
    order = tuple(reversed(range(spatial))) + tuple(range(spatial, array.ndim))
    return array.transpose(order), None


def _checked(array: np.ndarray, geometry: Geometry | None, label: str) -> tuple[np.ndarray, Geometry | None]:
    if geometry is not None:
        check_geometry(geometry, label)
    return array, geometry


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


def compact_labels(volume: Volume) -> Volume:
    """A label map in the smallest of int8, int16 and int32 that holds its values (`read_labels` reads any as int32):
    FreeSurfer's codes fit int16, half the bytes of the int32 maps are written and read as. Other arrays as they are."""
    array = volume.array
    if not np.issubdtype(array.dtype, np.signedinteger) or array.dtype.itemsize <= 1 or not array.size:
        return volume
    low, high = int(array.min()), int(array.max())
    for kind in (np.int8, np.int16):
        if np.dtype(kind).itemsize < array.dtype.itemsize and np.iinfo(kind).min <= low and high <= np.iinfo(kind).max:
            return volume.with_array(array.astype(kind))
    return volume


def write_volume(volume: Volume, path: str | Path, threads: int | None = None) -> None:
    """Write a 3D scalar or vector volume; the extension picks the format (see `SUPPORTED_EXTENSIONS`).

    A 3D NIfTI file is written by `write_nifti` (fast compression for ``.nii.gz``, on ``threads``
    threads); other formats, and vector volumes, through SimpleITK, and checked after writing
    (`check_written`): ITK can leave a truncated NIfTI on a full disk without reporting it.
    """
    path = Path(path)
    extension = extension_of(path)
    if volume.array.ndim not in (3, 4):
        raise InputError(
            f"cannot write an array with {volume.array.ndim} dimensions to '{path}': need 3D or 3D + components."
        )
    if extension in (".nii", ".nii.gz") and volume.array.ndim == 3:
        write_nifti(path, _sitk_array(volume.array), volume.geometry.index_to_ras_matrix, threads=threads)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if extension in NIBABEL_EXTENSIONS:
            nib.save(nib.MGHImage(_mgh_array(volume.array), _geometry_to_ras_affine(volume.geometry)), str(path))
        else:
            image = to_sitk(volume.with_array(_sitk_array(volume.array)))
            sitk.WriteImage(image, str(path), useCompression=extension in _COMPRESSED_ON_WRITE)
    except (RuntimeError, OSError, ValueError) as error:
        raise write_error(path, error) from error
    check_written(path)


def write_nifti(
    path: str | Path,
    array: np.ndarray,
    ras_affine: np.ndarray,
    intent: int = 0,
    units: tuple[str, str] = ("mm", "sec"),
    codes: tuple[int, int] = (1, 1),
    threads: int | None = None,
    negated: tuple[int, ...] = (),
) -> None:
    """A NIfTI-1 file of ``array`` (``[i, j, k, ...]``, i fastest in the file) with the voxel-to-RAS ``ras_affine``;
    the components ``negated`` (indices of the last axis) are stored with their signs flipped (a displacement field's
    LPS x and y as RAS: each a contiguous block of the file, flipped there after the copy instead of in a copy of
    the array).

    The header is the one ITK writes (qform and sform codes ``codes`` = scanner, units mm and s);
    ``intent`` is NIfTI's intent code (1006 for a displacement field). ``.nii.gz`` is compressed by
    `gzip_parallel.gzip_parts` on ``threads`` threads, ``.nii`` written as it is. The file is written
    by this process, so a full disk raises; its size is checked against what was written.
    """
    path = Path(path)
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header.set_qform(ras_affine, code=codes[0])
    header.set_sform(ras_affine, code=codes[1])
    header.set_xyzt_units(*units)
    if intent:
        header.set_intent(intent)
    offset = 352  # the 348-byte header and the 4-byte extension flag (no extensions)
    header["vox_offset"] = offset
    buffer = bytearray(offset + array.nbytes)
    buffer[:348] = header.binaryblock
    stored = np.frombuffer(buffer, dtype=header.get_data_dtype(), offset=offset).reshape(array.shape, order="F")
    copy_in_tiles(stored, array)  # one copy, straight into the file's voxel order
    for component in negated:
        np.negative(stored[..., component], out=stored[..., component])
    parts = gzip_parts(buffer, threads=threads) if path.name.lower().endswith(".gz") else [buffer]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as stream:
            for part in parts:
                stream.write(part)
        written = path.stat().st_size
    except OSError as error:
        raise write_error(path, error) from error
    if written != sum(len(part) for part in parts):
        raise write_error(path)


TILE = 32
"""`copy_in_tiles`: the edge (voxels) of the tiles of the first and third axes copied at a time."""


def copy_in_tiles(target: np.ndarray, source: np.ndarray) -> None:
    """``target[...] = source`` for 3D arrays (or 3D + components) of opposite memory orders (the file's i fastest,
    the array's k fastest), `TILE` x `TILE` voxels of the first and third axes at a time: what one tile reads and
    writes stays in the cache (numpy's plain copy walks one array against its order: about twice the time)."""
    first, third = target.shape[0], target.shape[2]
    for i in range(0, first, TILE):
        for k in range(0, third, TILE):
            target[i : i + TILE, :, k : k + TILE] = source[i : i + TILE, :, k : k + TILE]


def write_error(path: Path, error: BaseException | None = None) -> OutputError:
    """The error for a file that could not be written, with the system's reason where there is one."""
    reason = getattr(error, "strerror", None) or ("the file came out incomplete" if error is None else "the write failed")
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    no_space = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space" in str(error)
    if no_space or free is not None and free < _LOW_SPACE and not isinstance(error, OSError):  # ITK does not say why
        reason = "no space left on the disk"
    return OutputError(f"could not write '{path}': {reason}. Free some space or choose another output folder; nothing was kept.")


def check_written(path: Path) -> None:
    """A NIfTI file just written holds all its image data (ITK may truncate one silently on a full disk)."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    try:
        missing = nifti_bytes_missing(path)
    except (OSError, EOFError, ValueError, zlib.error, ImageFileError) as error:
        raise write_error(path) from error
    if missing:
        raise write_error(path)
