"""Tests for JointRegSegLib.imageio: file formats, geometry, validation and the network grid."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from JointRegSegLib.errors import InputError
from JointRegSegLib.imageio import (
    RAS_DIRECTION,
    Geometry,
    Volume,
    check_image,
    check_labels,
    check_same_grid,
    corner_points,
    from_network,
    from_sitk,
    geometry_of,
    network_geometry,
    normalise_intensity,
    read_image,
    read_labels,
    read_volume,
    resample,
    to_network,
    write_volume,
)
from JointRegSegLib.imageio.network_grid import _on_lattice

SPACING = (0.8, 1.3, 2.1)
SHAPE = (30, 22, 14)
ORIGIN = (-12.3, 40.1, 7.7)
MARKER = (17, 9, 6)


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """Rodrigues' formula: rotation by ``degrees`` about ``axis``."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    angle = np.deg2rad(degrees)
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


OBLIQUE = Geometry(SHAPE, SPACING, ORIGIN, rotation((1.0, 2.0, 3.0), 27.0))
OBLIQUE_20 = Geometry((20, 20, 20), SPACING, ORIGIN, OBLIQUE.direction)

# A smooth test function of LPS position: f(x) = sum_a cos(2 pi x_a / L + phi_a) / 3.
WAVELENGTH = 30.0
PHASES = np.array([0.3, 1.1, 2.0])


def smooth(points: np.ndarray) -> np.ndarray:
    return np.cos(2 * np.pi * points / WAVELENGTH + PHASES).sum(axis=-1) / 3.0


def centres(geometry: Geometry) -> np.ndarray:
    """LPS positions (I, J, K, 3) of every voxel centre."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), axis=-1)
    return geometry.index_to_physical(index)


def smooth_volume(geometry: Geometry = OBLIQUE) -> Volume:
    return Volume((2.0 + smooth(centres(geometry))).astype(np.float32), geometry)


def marker_volume(geometry: Geometry = OBLIQUE) -> Volume:
    array = np.zeros(geometry.shape, dtype=np.float32)
    array[MARKER] = 100.0
    array[0, 0, 0] = 1.0
    return Volume(array, geometry)


def assert_geometry_close(a: Geometry, b: Geometry, atol: float = 1e-5) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=atol)


def physical_centroid(volume: Volume) -> np.ndarray:
    weights = np.clip(volume.array, 0, None)
    return (centres(volume.geometry) * weights[..., None]).sum(axis=(0, 1, 2)) / weights.sum()


# --- file formats -----------------------------------------------------------------------------------


def test_oblique_anisotropic_nifti_round_trip(tmp_path: Path) -> None:
    volume = smooth_volume()
    assert not np.allclose(np.abs(OBLIQUE.direction), np.eye(3), atol=0.1)  # a real rotation, not a permutation
    write_volume(volume, tmp_path / "img.nii.gz")
    back = read_image(tmp_path / "img.nii.gz")
    assert back.array.dtype == np.float32
    assert_geometry_close(back.geometry, OBLIQUE)  # within float32 NIfTI header precision
    np.testing.assert_array_equal(back.array, volume.array)
    # Independent check of the axis order: SimpleITK's own reading puts the marker at the same point.
    write_volume(marker_volume(), tmp_path / "marker.nii.gz")
    image = sitk.ReadImage(str(tmp_path / "marker.nii.gz"))
    kji = np.unravel_index(np.argmax(sitk.GetArrayViewFromImage(image)), image.GetSize()[::-1])
    point = image.TransformIndexToPhysicalPoint(tuple(int(v) for v in kji[::-1]))
    np.testing.assert_allclose(point, OBLIQUE.index_to_physical(np.array(MARKER)), atol=1e-4)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["img.nii.gz", "img.nii"])
def test_fast_nifti_writer_matches_what_simpleitk_writes(tmp_path: Path, dtype: type, name: str) -> None:
    # Our NIfTI writer (header, voxel order, parallel gzip) against SimpleITK's own writer, read by SimpleITK and nibabel.
    rng = np.random.default_rng(1)
    volume = Volume((rng.random(SHAPE) * 200).astype(dtype), OBLIQUE)
    write_volume(volume, tmp_path / name)
    ours = sitk.ReadImage(str(tmp_path / name))
    reference = sitk.ReadImage(str(_written_by_simpleitk(volume, tmp_path / f"itk_{name}")))
    assert ours.GetPixelID() == reference.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(reference))
    assert_geometry_close(geometry_of(ours), geometry_of(reference), atol=1e-6)
    ours_nib, reference_nib = nib.load(tmp_path / name), nib.load(tmp_path / f"itk_{name}")
    np.testing.assert_allclose(ours_nib.affine, reference_nib.affine, atol=1e-5)
    for key in ("sform_code", "qform_code", "xyzt_units", "datatype", "dim"):
        assert ours_nib.header[key].tolist() == reference_nib.header[key].tolist(), key
    np.testing.assert_array_equal(np.asanyarray(ours_nib.dataobj), volume.array)


@pytest.mark.parametrize("shape", [(70, 9, 45), (33, 5, 65, 3), (5, 4, 3)])
def test_tiled_copy_into_the_files_order_equals_numpys_copy(shape: tuple[int, ...]) -> None:
    # shapes whose first and third axes end in part of a tile, a vector volume, one smaller than a tile
    from JointRegSegLib.imageio.io import TILE, copy_in_tiles

    assert shape[0] % TILE or shape[2] % TILE
    source = np.random.default_rng(7).random(shape).astype(np.float32)
    target = np.zeros(shape, np.float32, order="F")
    copy_in_tiles(target, source)
    expected = np.zeros(shape, np.float32, order="F")
    expected[...] = source
    np.testing.assert_array_equal(target, expected)


def _written_by_simpleitk(volume: Volume, path: Path) -> Path:
    from JointRegSegLib.imageio import to_sitk

    sitk.WriteImage(to_sitk(volume), str(path), useCompression=True)
    return path


@pytest.mark.parametrize("library", ["isal.isal_zlib", "zlib"])
@pytest.mark.parametrize("size", [0, 5, (1 << 22) - 3, 3 * (1 << 22) + 12345])
def test_parallel_gzip_is_one_stream_every_reader_reads(size: int, library: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip
    import zlib

    from JointRegSegLib.imageio import gzip_parallel
    from JointRegSegLib.imageio.gzip_parallel import deflater, gzip_parts

    if library == "zlib":  # without python-isal installed
        monkeypatch.setattr(gzip_parallel, "_fast_zlib", None)
    assert deflater().__name__ == library

    rng = np.random.default_rng(size)
    # incompressible (stored) and compressible blocks in one file
    data = rng.random(size // 8 + 1).tobytes()[: size // 2] + bytes(np.arange(size - size // 2, dtype=np.int64) % 7)
    joined = b"".join(gzip_parts(data, threads=3))
    assert gzip.decompress(joined) == data
    stream = zlib.decompressobj(31)  # a single gzip member: nothing follows its end
    assert stream.decompress(joined) == data and stream.eof and stream.unused_data == b""


@pytest.mark.parametrize("extension", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_nifti_to_other_formats_is_exact(tmp_path: Path, extension: str) -> None:
    write_volume(smooth_volume(), tmp_path / "img.nii.gz")
    nifti = read_image(tmp_path / "img.nii.gz")
    write_volume(nifti, tmp_path / f"img{extension}")
    other = read_image(tmp_path / f"img{extension}")
    assert other.array.tobytes() == nifti.array.tobytes()
    assert_geometry_close(other.geometry, nifti.geometry)
    write_volume(other, tmp_path / "again.nii.gz")
    again = read_image(tmp_path / "again.nii.gz")
    assert again.array.tobytes() == nifti.array.tobytes()
    assert_geometry_close(again.geometry, nifti.geometry)


def test_labels_keep_integer_values(tmp_path: Path) -> None:
    labels = np.zeros(SHAPE, dtype=np.int32)
    labels[3:9, 4:10, 2:6] = 17
    labels[12:20, 5:15, 6:12] = 2035
    write_volume(Volume(labels, OBLIQUE), tmp_path / "seg.nrrd")
    back = read_labels(tmp_path / "seg.nrrd")
    assert back.array.dtype == np.int32
    np.testing.assert_array_equal(back.array, labels)
    # A label map stored as floats with integer values is accepted.
    write_volume(Volume(labels.astype(np.float32), OBLIQUE), tmp_path / "seg_float.nii.gz")
    np.testing.assert_array_equal(read_labels(tmp_path / "seg_float.nii.gz").array, labels)


@pytest.mark.parametrize("extension", [".nii.gz", ".mha", ".mgz"])
def test_vector_volume_written_as_vector(tmp_path: Path, extension: str) -> None:
    field = np.random.default_rng(0).normal(size=SHAPE + (3,)).astype(np.float32)
    write_volume(Volume(field, OBLIQUE), tmp_path / f"field{extension}")
    if extension != ".mgz":
        image = sitk.ReadImage(str(tmp_path / f"field{extension}"))
        assert image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 3
    else:
        assert nib.load(tmp_path / f"field{extension}").shape == SHAPE + (3,)
    back = read_volume(tmp_path / f"field{extension}")
    np.testing.assert_array_equal(back.array, field)
    assert_geometry_close(back.geometry, OBLIQUE, atol=1e-4)


def _ras_affine(geometry: Geometry) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.index_to_physical_matrix


def test_mgz_reading_agrees_with_simpleitk(tmp_path: Path) -> None:
    """The same data and RAS affine saved by nibabel as .mgz (read via nibabel) and .nii.gz (read via ITK)."""
    data = marker_volume().array
    affine = _ras_affine(OBLIQUE)
    nib.save(nib.MGHImage(data, affine), tmp_path / "marker.mgz")
    nifti = nib.Nifti1Image(data, affine)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    nib.save(nifti, tmp_path / "marker.nii.gz")

    mgz = read_image(tmp_path / "marker.mgz")
    itk = sitk.ReadImage(str(tmp_path / "marker.nii.gz"))
    assert_geometry_close(mgz.geometry, geometry_of(itk), atol=1e-4)
    np.testing.assert_array_equal(mgz.array, from_sitk(itk).array)
    kji = np.unravel_index(np.argmax(sitk.GetArrayViewFromImage(itk)), itk.GetSize()[::-1])
    itk_point = itk.TransformIndexToPhysicalPoint(tuple(int(v) for v in kji[::-1]))
    mgz_point = mgz.geometry.index_to_physical(np.array(np.unravel_index(np.argmax(mgz.array), mgz.array.shape)))
    np.testing.assert_allclose(mgz_point, itk_point, atol=1e-4)


def test_mgz_writing_agrees_with_simpleitk(tmp_path: Path) -> None:
    volume = marker_volume()
    write_volume(volume, tmp_path / "marker.mgz")
    write_volume(volume, tmp_path / "marker.nii.gz")
    stored = nib.load(tmp_path / "marker.mgz")
    np.testing.assert_allclose(stored.affine, _ras_affine(OBLIQUE), atol=1e-4)
    back = read_image(tmp_path / "marker.mgz")
    itk = from_sitk(sitk.ReadImage(str(tmp_path / "marker.nii.gz")))
    assert_geometry_close(back.geometry, itk.geometry, atol=1e-4)
    np.testing.assert_array_equal(back.array, itk.array)
    labels = (volume.array > 50).astype(np.int32) * 3
    write_volume(Volume(labels, OBLIQUE), tmp_path / "seg.mgh")
    np.testing.assert_array_equal(read_labels(tmp_path / "seg.mgh").array, labels)


def test_unsupported_extension(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"unsupported file type.*\.nii\.gz.*\.nrrd.*\.mgz"):
        write_volume(smooth_volume(), tmp_path / "img.png")
    (tmp_path / "img.tif").write_bytes(b"12345")
    with pytest.raises(InputError, match="unsupported file type"):
        read_image(tmp_path / "img.tif")


# --- the network grid -------------------------------------------------------------------------------


def test_network_geometry_of_an_axis_aligned_grid() -> None:
    """Analytic case: a 1 mm RAS grid of 20x30x40 centred at c becomes 32x32x48 centred at c."""
    source = Geometry((20, 30, 40), (1.0, 1.0, 1.0), (5.0, -3.0, 2.0), RAS_DIRECTION)
    grid = network_geometry(source)
    assert grid.shape == (32, 32, 48)
    centre = source.index_to_physical((np.array(source.shape) - 1) / 2)
    np.testing.assert_allclose(grid.index_to_physical((np.array(grid.shape) - 1) / 2), centre, atol=1e-9)
    # Voxel centres of the two grids coincide (offset (6, 1, 4) voxels).
    np.testing.assert_allclose(grid.physical_to_index(source.origin), [6, 1, 4], atol=1e-9)
    # An LPS-oriented grid of the same box gives the same shape, and an explicit shape wins.
    lps = Geometry((20, 30, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    assert network_geometry(lps).shape == (32, 32, 48)
    assert network_geometry(lps, multiple=1).shape == (20, 30, 40)
    cropped = network_geometry(lps, shape=(16, 16, 16))
    assert cropped.shape == (16, 16, 16)
    np.testing.assert_allclose(
        cropped.index_to_physical(np.full(3, 7.5)), lps.index_to_physical(np.array([9.5, 14.5, 19.5])), atol=1e-9
    )


def test_network_geometry_of_an_oblique_grid() -> None:
    grid = network_geometry(OBLIQUE)
    assert all(n % 16 == 0 for n in grid.shape)
    assert grid.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(grid.direction, np.diag([-1.0, -1.0, 1.0]))
    corners = grid.physical_to_index(corner_points(OBLIQUE))
    assert corners.min() >= -1e-9 and np.all(corners <= np.array(grid.shape) - 1 + 1e-9)  # covers the box
    np.testing.assert_allclose(
        grid.index_to_physical((np.array(grid.shape) - 1) / 2), corner_points(OBLIQUE).mean(axis=0), atol=1e-9
    )
    # Fewest voxels: without rounding up to 16, every axis is tight on the corner extent.
    tight = network_geometry(OBLIQUE, multiple=1)
    corner_index = tight.physical_to_index(corner_points(OBLIQUE))
    extent = corner_index.max(axis=0) - corner_index.min(axis=0)
    assert np.all(np.array(tight.shape) - 1 - extent < 1.0)


def test_marker_keeps_its_physical_position_on_the_network_grid() -> None:
    volume = marker_volume()
    volume.array[0, 0, 0] = 0.0
    grid = network_geometry(OBLIQUE)
    on_grid = Volume(to_network(volume, grid), grid)
    assert on_grid.array.max() > 0
    shift = physical_centroid(on_grid) - OBLIQUE.index_to_physical(np.array(MARKER))
    assert np.linalg.norm(shift) < 0.5 * min(grid.spacing)


def test_smooth_image_round_trip_through_network_grid(tmp_path: Path) -> None:
    write_volume(smooth_volume(), tmp_path / "img.nii.gz")
    original = read_image(tmp_path / "img.nii.gz")
    grid = network_geometry(original.geometry)
    back = from_network(to_network(original, grid), grid, original.geometry)
    assert back.geometry.same_as(original.geometry)
    # Trilinear interpolation error bound: |f - I_h f| <= sum_a h_a^2 / 8 * max|d^2 f / du_a^2|, and for this f
    # every directional second derivative is at most K = (2 pi / L)^2 / 3. Two interpolations: the first on
    # the original spacing, the second on the 1 mm network grid (linear interpolation does not amplify errors).
    k = (2 * np.pi / WAVELENGTH) ** 2 / 3
    bound = k / 8 * (sum(h**2 for h in SPACING) + sum(h**2 for h in grid.spacing))
    assert bound < 0.02  # tight enough to be a real check on values of 2 +- 1
    # The bound holds where every network neighbour used on the way back (within sqrt(3) network voxels) was
    # itself sampled inside the original grid (ITK interpolates up to half a voxel beyond the last centre);
    # in the rim outside that, the network grid's zero padding is mixed in.
    margin = np.ceil(np.sqrt(3) * grid.spacing[0] / np.array(SPACING) - 0.5).astype(int)
    interior = tuple(slice(m, n - m) for m, n in zip(margin, SHAPE))
    error = np.abs(back.array - original.array)[interior]
    assert error.size > 0.25 * np.prod(SHAPE)
    assert error.max() <= bound, (error.max(), bound)


def test_linear_fields_come_back_exactly_component_by_component() -> None:
    """Linear interpolation reproduces a linear function exactly: an (I, J, K, 3) field a . x + b."""
    grid = network_geometry(OBLIQUE)
    slopes = np.array([[0.3, -0.2, 0.1], [0.05, 0.4, -0.3], [-0.1, 0.2, 0.25]])
    offsets = np.array([1.0, -2.0, 0.5])
    on_grid = centres(grid) @ slopes.T + offsets
    back = from_network(on_grid, grid, OBLIQUE)
    assert back.geometry.same_as(OBLIQUE) and back.array.shape == SHAPE + (3,)
    np.testing.assert_allclose(back.array, centres(OBLIQUE) @ slopes.T + offsets, atol=1e-6)


def test_label_round_trip_through_network_grid() -> None:
    points = centres(OBLIQUE)
    labels = np.zeros(SHAPE, dtype=np.int32)
    for code, index, radius in ((4, (8, 8, 7), 5.0), (17, (20, 12, 6), 5.0), (42, (14, 15, 8), 4.0)):
        labels[np.linalg.norm(points - OBLIQUE.index_to_physical(np.array(index)), axis=-1) < radius] = code
    assert len(np.unique(labels)) == 4
    volume = Volume(labels, OBLIQUE)
    grid = network_geometry(OBLIQUE)
    on_grid = to_network(volume, grid, labels=True)
    assert on_grid.dtype == np.int32 and set(np.unique(on_grid)) == {0, 4, 17, 42}
    back = from_network(on_grid, grid, OBLIQUE, labels=True)
    assert back.geometry.same_as(OBLIQUE) and back.array.dtype == np.int32
    # Nearest neighbour twice moves only boundary voxels, by at most one voxel.
    assert np.mean(back.array == labels) > 0.99
    assert np.mean(back.array[labels > 0] == labels[labels > 0]) > 0.95
    assert set(np.unique(back.array)) == {0, 4, 17, 42}


def test_resample_interpolators_against_the_analytic_image() -> None:
    """Resample onto a 1 mm RAS grid lying inside the oblique grid and compare with f at its voxel centres."""
    centre = OBLIQUE.index_to_physical((np.array(SHAPE) - 1) / 2)
    inner = Geometry((8, 8, 8), (1.0, 1.0, 1.0), RAS_DIRECTION @ (RAS_DIRECTION @ centre - 3.5), RAS_DIRECTION)
    inside = OBLIQUE.physical_to_index(corner_points(inner))
    assert inside.min() > 3 and np.all(inside < np.array(SHAPE) - 4)
    truth = 2.0 + smooth(centres(inner))
    volume = smooth_volume()
    k = 2 * np.pi / WAVELENGTH
    linear = resample(volume, inner, "linear").array
    assert np.abs(linear - truth).max() <= k**2 / 3 / 8 * sum(h**2 for h in SPACING)  # trilinear bound
    # Cubic spline interpolation error: at most 5/384 h^4 max|f''''| per axis (Hall 1968): sum_a s_a^4 k^4 / 3.
    bspline = resample(volume, inner, "bspline").array
    assert np.abs(bspline - truth).max() <= 5 / 384 * k**4 / 3 * sum(h**4 for h in SPACING)
    nearest = resample(volume, inner, "nearest").array
    assert np.isin(nearest, volume.array).all()


LIA = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # FreeSurfer's conformed axes in LPS terms


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
@pytest.mark.parametrize("shift", [(0, 0, 0), (3, -2, 5), (-40, 0, 0)])
def test_resampling_between_grids_whose_voxel_centres_coincide_equals_simpleitk(interpolation, shift) -> None:
    """A LIA scan onto RAS grids of its spacing (axes reordered and flipped, a whole number of voxels off, partly or
    wholly outside): the values are moved instead of interpolated, and equal SimpleITK's resampling exactly."""
    rng = np.random.default_rng(7)
    source = Geometry((12, 10, 14), (1.5, 1.5, 1.5), (20.0, -7.5, 3.0), LIA)
    array = rng.normal(size=source.shape).astype(np.float32) if interpolation == "linear" else rng.integers(0, 50, source.shape).astype(np.int16)
    volume = Volume(array, source)
    centre = network_geometry(source, spacing=1.5, multiple=1)
    target = Geometry((16, 13, 9), (1.5, 1.5, 1.5), np.asarray(centre.origin) + RAS_DIRECTION @ (1.5 * np.asarray(shift, float)), RAS_DIRECTION)
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    image.SetSpacing(source.spacing)
    image.SetOrigin(source.origin)
    image.SetDirection(source.direction.ravel().tolist())
    reference = sitk.Image(list(target.shape), image.GetPixelID())
    reference.SetSpacing(target.spacing)
    reference.SetOrigin(target.origin)
    reference.SetDirection(target.direction.ravel().tolist())
    mode = sitk.sitkLinear if interpolation == "linear" else sitk.sitkNearestNeighbor
    expected = sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), mode, -3.0)).transpose(2, 1, 0)
    got = resample(volume, target, interpolation, default=-3.0).array
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert _on_lattice(array, source, target, -3.0) is not None  # moved, not interpolated


@pytest.mark.parametrize("origin_shift", [0.0, 1e-9])
def test_resampling_onto_the_same_grid_returns_the_values_never_the_input_array(origin_shift) -> None:
    """The very grid, or one within rounding of it: every voxel keeps its value, in an array of its own (writing to
    the result must not change the input)."""
    volume = smooth_volume()
    target = Geometry(SHAPE, SPACING, np.asarray(ORIGIN) + origin_shift, volume.geometry.direction)
    for interpolation in ("linear", "nearest"):
        out = resample(volume, target, interpolation).array
        assert np.array_equal(out, volume.array) and not np.shares_memory(out, volume.array)


def test_resample_rejects_unknown_interpolation() -> None:
    with pytest.raises(InputError, match="unknown interpolation"):
        resample(smooth_volume(), OBLIQUE, "cubic")


# --- validation -------------------------------------------------------------------------------------


def _write_sitk(array: np.ndarray, path: Path, is_vector: bool = False) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=is_vector), str(path))
    return path


def test_2d_image_is_rejected(tmp_path: Path) -> None:
    path = _write_sitk(np.ones((20, 30), np.float32), tmp_path / "slice.nii.gz")
    with pytest.raises(InputError, match=r"has 2 dimensions \(30x20\).*needs a single 3D volume"):
        read_image(path, "fixed image")
    path = _write_sitk(np.random.rand(1, 20, 30).astype(np.float32), tmp_path / "slice3.nrrd")
    with pytest.raises(InputError, match="single slice"):
        read_image(path)


def test_4d_and_multicomponent_images_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(64, 64, 64, 2).astype(np.float32), np.eye(4)), path)
    with pytest.raises(InputError, match=r"fixed image '.*x\.nii\.gz' has 4 dimensions \(64x64x64x2\)"):
        read_image(path, "fixed image")
    path = _write_sitk(np.random.rand(10, 9, 8, 3).astype(np.float32), tmp_path / "rgb.mha", is_vector=True)
    with pytest.raises(InputError, match=r"4 dimensions \(8x9x10x3\)"):
        read_image(path)
    with pytest.raises(InputError, match="4 dimensions"):
        check_image(np.zeros((4, 4, 4, 2)), "moving image")


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((8, 8, 8), np.float32), "all voxels are zero"),
        (np.full((8, 8, 8), 7.0, np.float32), "constant"),
        (np.where(np.eye(8, dtype=bool)[:, :, None], np.nan, 1.0).repeat(8, axis=2), "non-finite.*NaN"),
        (np.where(np.eye(8, dtype=bool)[:, :, None], np.inf, 1.0).repeat(8, axis=2), "non-finite.*inf"),
    ],
)
def test_bad_image_content_is_rejected(tmp_path: Path, array: np.ndarray, problem: str) -> None:
    # NRRD keeps NaN and inf; ITK's NIfTI reader (niftilib) silently replaces them by 0 when reading.
    path = _write_sitk(array.astype(np.float32), tmp_path / "bad.nrrd")
    with pytest.raises(InputError, match=problem):
        read_image(path)
    with pytest.raises(InputError, match=problem):
        check_image(array, "image")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"'.*nothere\.nii\.gz' is missing"):
        read_image(tmp_path / "nothere.nii.gz")
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        read_image(tmp_path / "dir.nii.gz")


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha", ".mgz"])
def test_truncated_file_is_reported_as_corrupt(tmp_path: Path, extension: str) -> None:
    path = tmp_path / f"img{extension}"
    write_volume(Volume(np.random.default_rng(1).random((20, 20, 20), dtype=np.float32), OBLIQUE_20), path)
    _truncate(path)
    with pytest.raises(InputError, match=f"'.*{re.escape(path.name)}' is unreadable or corrupt") as info:
        read_image(path)
    assert "sitk::ERROR" not in str(info.value) and ".cxx" not in str(info.value)



@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd", ".mgz"])
def test_garbage_file_is_reported_as_corrupt(tmp_path: Path, extension: str) -> None:
    path = tmp_path / f"garbage{extension}"
    path.write_bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="unreadable or corrupt") as info:
        read_labels(path)
    assert "sitk::ERROR" not in str(info.value)


def test_label_map_checks(tmp_path: Path) -> None:
    intensities = smooth_volume()
    write_volume(intensities, tmp_path / "t1.nii.gz")
    with pytest.raises(InputError, match=r"label map '.*t1\.nii\.gz' has non-integer values"):
        read_labels(tmp_path / "t1.nii.gz")
    negative = np.zeros(SHAPE, np.int16)
    negative[2, 3, 4] = -1
    with pytest.raises(InputError, match="negative labels"):
        check_labels(negative, "label map")
    with pytest.raises(InputError, match="empty"):
        check_labels(np.zeros(SHAPE, np.uint8), "label map")


def test_mismatched_grids() -> None:
    image = smooth_volume()
    check_same_grid(image, OBLIQUE, ("label map", "image"))
    nudged = Geometry(SHAPE, np.float32(SPACING), np.float32(ORIGIN), OBLIQUE.direction.astype(np.float32))
    check_same_grid(nudged, image, ("label map", "image"))  # float32 header precision is not a mismatch
    with pytest.raises(InputError, match=r"not on the same voxel grid \(shape 30x22x15 vs 30x22x14\)"):
        check_same_grid(Geometry((30, 22, 15), SPACING, ORIGIN, OBLIQUE.direction), image, ("label map", "image"))
    with pytest.raises(InputError, match="origin.*Resample label map onto the grid of image"):
        check_same_grid(Geometry(SHAPE, SPACING, (0.0, 0.0, 0.0), OBLIQUE.direction), image, ("label map", "image"))
    with pytest.raises(InputError, match="spacing"):
        check_same_grid(Geometry(SHAPE, (1.0, 1.0, 1.0), ORIGIN, OBLIQUE.direction), image, ("label map", "image"))
    with pytest.raises(InputError, match="direction"):
        check_same_grid(Geometry(SHAPE, SPACING, ORIGIN), image, ("label map", "image"))


# --- intensity normalisation ------------------------------------------------------------------------


def test_percentiles_equal_numpys_on_a_float64_copy() -> None:
    from JointRegSegLib.imageio.intensity import percentiles

    rng = np.random.default_rng(4)
    for trial in range(300):
        values = (rng.normal(size=int(rng.integers(1, 500))) * 50).astype([np.float32, np.float64, np.int16][trial % 3])
        q = [*rng.uniform(0, 100, 3), 0.0, 0.5, 1.0, 99.0, 99.5, 100.0]
        np.testing.assert_array_equal(percentiles(values, q), np.percentile(values.astype(np.float64), q))


def test_normalise_intensity_maps_percentiles_to_unit_range() -> None:
    array = np.arange(1001.0)
    # Percentile p of 0..1000 (linear interpolation between order statistics) is 10 p.
    out = normalise_intensity(array, low=0.5, high=99.5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[[0, 5, 500, 995, 1000]], [0.0, 0.0, (500 - 5) / 990, 1.0, 1.0], atol=1e-6)
    mask = array >= 500
    masked = normalise_intensity(array, mask=mask, low=0.0, high=100.0)
    np.testing.assert_allclose(masked[[400, 500, 750, 1000]], [0.0, 0.0, 0.5, 1.0], atol=1e-6)
    with pytest.raises(InputError, match="every voxel"):
        normalise_intensity(np.full(10, 3.0))


# --- real data --------------------------------------------------------------------------------------


def shared_data() -> Path:
    root = Path(os.environ.get("JRS_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"shared data folder {root} is absent (set JRS_SHARED_DATA or provide ../shared/data)")
    return root


def test_shared_data_pair_and_freesurfer_subject() -> None:
    root = shared_data()
    fixed = read_image(root / "pair" / "fixed_img.nii.gz", "fixed image")
    assert fixed.array.shape == (160, 192, 224)
    labels = read_labels(root / "pair" / "fixed_seg.nii.gz", "fixed label map")
    check_same_grid(labels, fixed, ("fixed label map", "fixed image"))
    # The pair is in FreeSurfer's conformed LIA orientation, so the RAS+ network grid swaps j and k.
    np.testing.assert_allclose(fixed.geometry.direction, [[1, 0, 0], [0, 0, -1], [0, -1, 0]], atol=1e-6)
    assert network_geometry(fixed.geometry).shape == (160, 224, 192)
    norm = read_image(root / "fs_subject" / "norm.mgz")
    assert norm.array.shape == (256, 256, 256)
    # FreeSurfer's conformed space is LIA: i -> Left, j -> Inferior, k -> Anterior, written here in LPS.
    np.testing.assert_allclose(norm.geometry.direction, [[1, 0, 0], [0, 0, -1], [0, -1, 0]], atol=1e-6)
    np.testing.assert_allclose(norm.geometry.spacing, 1.0)
    assert network_geometry(norm.geometry).shape == (256, 256, 256)


@pytest.mark.parametrize(
    "values, stored",
    [((0, 3), sitk.sitkInt8), ((0, 2035), sitk.sitkInt16), ((0, 200), sitk.sitkInt16), ((0, 14175), sitk.sitkInt16), ((0, 70000), sitk.sitkInt32)],
)
def test_label_maps_are_written_in_the_smallest_type_that_holds_them(tmp_path: Path, values: tuple[int, int], stored: int) -> None:
    from JointRegSegLib.imageio.io import compact_labels

    labels = np.zeros(SHAPE, dtype=np.int32)
    labels[2:6, 3:8, 1:4], labels[9:14, 4:9, 5:9] = values
    compact = compact_labels(Volume(labels, OBLIQUE))
    write_volume(compact, tmp_path / "seg.nii.gz")
    assert sitk.ReadImage(str(tmp_path / "seg.nii.gz")).GetPixelID() == stored
    back = read_labels(tmp_path / "seg.nii.gz")
    assert back.array.dtype == np.int32
    np.testing.assert_array_equal(back.array, labels)
    image = Volume(labels.astype(np.float32), OBLIQUE)
    assert compact_labels(image) is image  # not a label map: as it is
