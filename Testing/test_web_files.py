"""What the web page may read and write (`JointRegSegLib.web.files`): nothing outside its folders.

Paths outside the data folder (``../``, absolute paths, symlinks to files and folders outside) are
refused and never listed; uploads land only in the uploads folder, whole or not at all, capped in
size and checked with the command line's own reader, whose message the page shows (naming the
file by its page id, not by the server's paths).
"""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest

from JointRegSegLib.errors import InputError
from JointRegSegLib.imageio import read_image
from JointRegSegLib.web.files import DATA, SAMPLE, UPLOADS, FileStore
from JointRegSegLib.web.views import edge_letters

OUTSIDE_TEXT = b"a file outside every folder the page may read"


@pytest.fixture
def store(tmp_path, sample_pair):
    """A data folder with an image, a sub-folder, and links leading out of it and inside it."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    shutil.copy(sample_pair["fixed"], data / "sub" / "t1.nii.gz")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(sample_pair["moving"], outside / "secret.nii.gz")
    (outside / "notes.txt").write_bytes(OUTSIDE_TEXT)
    os.symlink(outside / "secret.nii.gz", data / "link_to_file.nii.gz")
    os.symlink(outside, data / "link_to_folder")
    os.symlink(data / "sub" / "t1.nii.gz", data / "link_inside.nii.gz")
    return FileStore(sample_pair["fixed"].parent, tmp_path / "work" / "uploads", data, max_upload_bytes=1_000_000)


@pytest.mark.parametrize(
    "file_id",
    [
        "data/../outside/secret.nii.gz",
        "../outside/secret.nii.gz",
        "data/sub/../../outside/secret.nii.gz",
        "uploads/../data/sub/t1.nii.gz",
        "sample/../../../../../../etc/passwd",
    ],
)
def test_dot_dot_is_refused(store, file_id):
    with pytest.raises(InputError, match="not inside a folder the page may read"):
        store.resolve(file_id)


def test_absolute_and_odd_names_are_refused(store, tmp_path):
    for file_id in (str(tmp_path / "outside" / "secret.nii.gz"), "/etc/passwd", "data", "", "data\\..\\outside", "data/sub/t1.nii.gz\x00", "elsewhere/t1.nii.gz"):
        with pytest.raises(InputError):
            store.resolve(file_id)


def test_symlinks_out_are_refused_and_not_listed(store):
    with pytest.raises(InputError, match="leads outside the data folder"):
        store.resolve("data/link_to_file.nii.gz")
    with pytest.raises(InputError, match="leads outside the data folder"):
        store.resolve("data/link_to_folder/secret.nii.gz")
    listed = {entry.id for entry in store.files()}
    assert "data/sub/t1.nii.gz" in listed and "data/link_inside.nii.gz" in listed
    assert not any("secret" in file_id or "link_to" in file_id for file_id in listed), listed
    assert {f"{SAMPLE}/fixed_img.nii.gz", f"{SAMPLE}/moving_seg.nii.gz"} <= listed


def test_files_inside_are_read(store):
    assert store.resolve("data/sub/t1.nii.gz") == store.roots[DATA] / "sub" / "t1.nii.gz"
    assert store.resolve("data/link_inside.nii.gz") == store.roots[DATA] / "sub" / "t1.nii.gz"
    assert store.check("sample/fixed_seg.nii.gz", labels=True).name == "fixed_seg.nii.gz"


def test_a_label_map_check_uses_the_command_lines_reader(store, tmp_path):
    """An image of fractional intensities is refused as a label map with read_labels' own message."""
    import SimpleITK as sitk

    from JointRegSegLib.imageio import read_labels

    path = store.roots[DATA] / "sub" / "fractions.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((8, 9, 10)).astype(np.float32) * 10), str(path))
    with pytest.raises(InputError) as refused:
        store.check("data/sub/fractions.nii.gz", labels=True, name="fixed label map")
    message = str(refused.value)
    assert "data/sub/fractions.nii.gz" in message and str(tmp_path) not in message
    with pytest.raises(InputError) as direct:
        read_labels(path, "fixed label map")
    assert message == str(direct.value).replace(str(path), "data/sub/fractions.nii.gz")


@pytest.mark.parametrize("name", ["../evil.nii.gz", "a/b.nii.gz", "..", ".hidden.nii.gz", "c:\\x.nii.gz", "notes.txt", ""])
def test_upload_names_that_are_not_plain_image_names_are_refused(store, name):
    with pytest.raises(InputError):
        store.save_upload(name, io.BytesIO(b"x" * 100))
    assert _left_in_uploads(store) == []


def test_text_named_nii_gz_is_refused_with_the_command_line_message(store, tmp_path):
    text = b"this is a text file, not an image\n" * 10
    with pytest.raises(InputError) as refused:
        store.save_upload("scan.nii.gz", io.BytesIO(text))
    (tmp_path / "scan.nii.gz").write_bytes(text)
    with pytest.raises(InputError) as direct:
        read_image(tmp_path / "scan.nii.gz", "image")
    assert str(refused.value) == str(direct.value).replace(str(tmp_path / "scan.nii.gz"), "uploads/scan.nii.gz")
    assert _left_in_uploads(store) == []


def test_uploads_over_the_cap_leave_nothing(store):
    with pytest.raises(InputError, match="larger than the upload limit"):
        store.save_upload("big.nii.gz", io.BytesIO(b"\0" * (store.max_upload_bytes + 1)))
    assert _left_in_uploads(store) == []


def test_a_good_upload_is_stored_whole_and_listed(store, sample_pair):
    content = sample_pair["moving"].read_bytes()
    file_id = store.save_upload("my scan.nii.gz", io.BytesIO(content))
    assert file_id == f"{UPLOADS}/my scan.nii.gz"
    assert store.resolve(file_id).read_bytes() == content
    assert file_id in {entry.id for entry in store.files()}
    assert _left_in_uploads(store) == ["my scan.nii.gz"]


def test_an_upload_replaces_a_link_never_writes_through_it(store, sample_pair, tmp_path):
    """A link planted in the uploads folder is replaced by the upload; the file it pointed to is untouched."""
    target = tmp_path / "outside" / "notes.txt"
    os.symlink(target, store.roots[UPLOADS] / "planted.nii.gz")
    store.save_upload("planted.nii.gz", io.BytesIO(sample_pair["fixed"].read_bytes()))
    assert target.read_bytes() == OUTSIDE_TEXT
    assert not (store.roots[UPLOADS] / "planted.nii.gz").is_symlink()


def test_a_missing_data_folder_is_a_clear_error(tmp_path, sample_pair):
    with pytest.raises(InputError, match="is not a folder"):
        FileStore(sample_pair["fixed"].parent, tmp_path / "uploads", tmp_path / "nowhere")


def _left_in_uploads(store: FileStore) -> list[str]:
    return sorted(p.name for p in store.roots[UPLOADS].iterdir())


# Orientation labels


def test_edge_letters_match_slicers_own_orientation_presets():
    """The letters on the view edges, read off slicer-core's axial, coronal and sagittal slice nodes, are
    Slicer's radiological convention: the patient's right on the viewer's left, anterior/superior up,
    and in the sagittal view anterior on the left."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (trame-slicer[standalone]) is not installed")
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    expected = {
        "Axial": {"left": "R", "right": "L", "top": "A", "bottom": "P"},
        "Coronal": {"left": "R", "right": "L", "top": "S", "bottom": "I"},
        "Sagittal": {"left": "A", "right": "P", "top": "S", "bottom": "I"},
    }
    for orientation, letters in expected.items():
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode")  # carries the scene's default presets
        node.SetOrientation(orientation)
        matrix = node.GetSliceToRAS()
        assert edge_letters(np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])) == letters, orientation


def test_edge_letters_of_a_rotated_view_follow_the_nearest_axis():
    angle = np.deg2rad(30)  # an axial view turned 30 degrees about S: still closest to R/L and A/P
    rotation = np.eye(4)
    rotation[:2, :2] = [[-np.cos(angle), -np.sin(angle)], [-np.sin(angle), np.cos(angle)]]
    assert edge_letters(rotation) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
