"""What JointRegSeg refuses, and how: bad files, geometry, labels, options, output folders, weights,
job files, signals, a full disk, memory and concurrent runs.

Every case asserts the exit code, exactly one ``error:`` line (or ``error`` event) that names the
problem, no traceback, and that nothing under the test's folder changed: the inputs keep their
checksums, no file of the user's is lost and no partial output is left (`tree` compares every
entry's kind, permissions and content before and after).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import sigint_as_in_a_terminal

from JointRegSegLib.cli import main
from JointRegSegLib.errors import InputError
from JointRegSegLib.evaluation import check_result
from JointRegSegLib.imageio import Volume, read_image
from JointRegSegLib.methods.base import Inputs, Result
from JointRegSegLib.weights import weights_dir
from JointRegSegLib.worker.failures import describe_failure

FAST = ["--option", "tto=false", "--option", "affine=none", "--no-pictures"]
"""tto as the network predicts, without affine or optimisation: a finished run in seconds."""
FAST_JOB = {"options": {"tto": False, "affine": "none"}, "pictures": False}


# ----------------------------------------------------------------------------- helpers


def tree(root: Path) -> dict[str, tuple]:
    """Every entry below ``root``: kind, permission bits and content checksum (files) or target (links)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            entries[str(path.relative_to(root))] = ("link", os.readlink(path))
        elif stat.S_ISREG(info.st_mode):
            entries[str(path.relative_to(root))] = ("file", stat.S_IMODE(info.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            entries[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode))
    return entries


@pytest.fixture
def pair(tmp_path, sample_pair) -> dict[str, Path]:
    """A copy of the sample pair in the test's folder (so its checksums are part of `tree`)."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    return {key: Path(shutil.copy(path, folder)) for key, path in sample_pair.items()}


def register(pair: dict[str, Path], out: Path, *extra: str, fixed: Path | None = None, moving: Path | None = None) -> list[str]:
    """``jointregseg register`` arguments for the pair (one image swapped if given)."""
    return ["register", "--fixed", str(fixed or pair["fixed"]), "--moving", str(moving or pair["moving"]), "--out", str(out), *extra]


def segreg(pair: dict[str, Path], out: Path, *extra: str, fixed_seg: Path | None = None, moving_seg: Path | None = None) -> list[str]:
    return register(
        pair, out, "--method", "segreg", "--fixed-seg", str(fixed_seg or pair["fixed_seg"]),
        "--moving-seg", str(moving_seg or pair["moving_seg"]), *extra,
    )


def refused(capsys, root: Path, args: list[str], *words: str, code: int = 2) -> str:
    """Run the CLI; assert the exit code, one error line naming ``words``, no traceback, nothing changed under ``root``."""
    before = tree(root)
    got = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert got == code, err[-2000:]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-2000:]
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in errors[0].lower(), (word, errors[0])
    quoted = re.findall(r"'([^']+)'", errors[0])
    assert not [path for path in quoted if "/" in path and quoted.count(path) > 1], "a path named twice"
    assert tree(root) == before, "files changed, appeared or vanished"
    return errors[0]


def image(path: Path, array: np.ndarray, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None, vector: bool = False) -> Path:
    """An image file written by SimpleITK (array in [i, j, k] order)."""
    axes = (2, 1, 0, 3) if vector else tuple(reversed(range(array.ndim)))
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(axes)), isVector=vector)
    if img.GetDimension() == 3:
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        if direction is not None:
            img.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    sitk.WriteImage(img, str(path))
    return path


def moving_array(pair: dict[str, Path]) -> np.ndarray:
    return read_image(pair["moving"]).array


def like_moving(pair, path: Path, array: np.ndarray | None = None, **geometry) -> Path:
    """The moving image with another array or grid (``spacing``, ``origin``, ``direction``)."""
    volume = read_image(pair["moving"])
    g = volume.geometry
    settings = {"spacing": g.spacing, "origin": g.origin, "direction": g.direction, **geometry}
    return image(path, volume.array if array is None else array, **settings)


def nrrd_with_directions(pair, path: Path, change: Callable[[np.ndarray], np.ndarray]) -> Path:
    """The moving image as an uncompressed NRRD whose ``space directions`` (rows: the voxel axes' vectors, mm)
    are rewritten by ``change`` in the header text, as a hand-edited or foreign file would have them."""
    sitk.WriteImage(sitk.ReadImage(str(pair["moving"])), str(path), False)
    data = path.read_bytes()
    end = data.index(b"\n\n")
    lines = data[:end].decode().splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("space directions:"))
    vectors = np.array(re.findall(r"\(([^)]*)\)", lines[index])[:3], dtype=object)
    matrix = change(np.array([[float(v) for v in vector.split(",")] for vector in vectors]))
    lines[index] = "space directions: " + " ".join("(" + ",".join(f"{v:.17g}" for v in row) + ")" for row in matrix)
    path.write_bytes("\n".join(lines).encode() + data[end:])
    return path


# ----------------------------------------------------------------------------- cases: (builder, words)
# A builder takes (root, pair, out) and returns the CLI arguments; `refused` checks the outcome.

Builder = Callable[[Path, dict, Path], list[str]]


def _missing(root, pair, out):
    return register(pair, out, fixed=root / "nothere.nii.gz")


def _missing_moving(root, pair, out):
    return register(pair, out, moving=root / "gone.nrrd")


def _folder(root, pair, out):
    (root / "scan.nii.gz").mkdir()
    return register(pair, out, fixed=root / "scan.nii.gz")


def _dev_null(root, pair, out):
    return register(pair, out, moving=Path("/dev/null"))


def _fifo(root, pair, out):
    os.mkfifo(root / "pipe.nii.gz")
    return register(pair, out, moving=root / "pipe.nii.gz")


def _link_loop(root, pair, out):
    (root / "a.nii.gz").symlink_to(root / "b.nii.gz")
    (root / "b.nii.gz").symlink_to(root / "a.nii.gz")
    return register(pair, out, moving=root / "a.nii.gz")


def _dangling(root, pair, out):
    (root / "link.nii.gz").symlink_to(root / "deleted.nii.gz")
    return register(pair, out, moving=root / "link.nii.gz")


def _empty_file(root, pair, out):
    (root / "empty.nii.gz").write_bytes(b"")
    return register(pair, out, moving=root / "empty.nii.gz")


def _unsupported(root, pair, out):
    (root / "scan.png").write_bytes(b"\x89PNG not really")
    return register(pair, out, moving=root / "scan.png")


def _truncated_gz(root, pair, out):
    data = pair["moving"].read_bytes()
    (root / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return register(pair, out, moving=root / "cut.nii.gz")


def _truncated_nii(root, pair, out):
    raw = gzip.decompress(pair["moving"].read_bytes())
    (root / "cut.nii").write_bytes(raw[: len(raw) * 3 // 4])
    return register(pair, out, moving=root / "cut.nii")


def _garbage(root, pair, out):
    (root / "noise.nii.gz").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return register(pair, out, moving=root / "noise.nii.gz")


def _gzipped_garbage(root, pair, out):
    (root / "noise2.nii.gz").write_bytes(gzip.compress(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()))
    return register(pair, out, moving=root / "noise2.nii.gz")


def _broken_image_and_label_maps(root, pair, out):
    """The files are read side by side; the error names the first broken one in the order fixed, moving, labels."""
    garbage = np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    for name in ("bad_fixed.nii.gz", "bad_labels.nii.gz"):
        (root / name).write_bytes(garbage)
    labels = str(root / "bad_labels.nii.gz")
    return register(pair, out, "--fixed-seg", labels, "--moving-seg", labels, fixed=root / "bad_fixed.nii.gz")


def _four_d(root, pair, out):
    nib.save(nib.Nifti1Image(np.random.default_rng(2).random((20, 20, 20, 2)).astype(np.float32), np.eye(4)), root / "t.nii.gz")
    return register(pair, out, moving=root / "t.nii.gz")


def _two_d(root, pair, out):
    return register(pair, out, moving=image(root / "slice.nii.gz", np.random.default_rng(3).random((40, 30)).astype(np.float32)))


def _one_slice(root, pair, out):
    return register(pair, out, moving=image(root / "one.nrrd", np.random.default_rng(4).random((40, 30, 1)).astype(np.float32)))


def _zeros(root, pair, out):
    return register(pair, out, moving=like_moving(pair, root / "zeros.nii.gz", np.zeros_like(moving_array(pair))))


def _constant(root, pair, out):
    return register(pair, out, moving=like_moving(pair, root / "seven.nii.gz", np.full_like(moving_array(pair), 7.0)))


def _with(value: float, suffix: str) -> Builder:
    def build(root, pair, out):
        array = moving_array(pair).copy()
        array[10:12, 20, 30] = value
        if suffix == ".nii.gz":  # as nibabel writes it (ITK's NIfTI reader turns NaN into 0)
            nib.save(nib.load(pair["moving"]).__class__(array, nib.load(pair["moving"]).affine), root / f"bad{suffix}")
            return register(pair, out, moving=root / f"bad{suffix}")
        return register(pair, out, moving=like_moving(pair, root / f"bad{suffix}", array))

    return build


def _complex(root, pair, out):
    array = moving_array(pair).astype(np.complex64) * (1 + 1j)
    nib.save(nib.Nifti1Image(array, nib.load(pair["moving"]).affine), root / "complex.nii.gz")
    return register(pair, out, moving=root / "complex.nii.gz")


def _rgb(root, pair, out):
    array = np.repeat(moving_array(pair)[..., None], 3, axis=-1).astype(np.uint8)
    return register(pair, out, moving=image(root / "rgb.mha", array, vector=True))


def _zero_pixdim(root, pair, out):
    moving = nib.load(pair["moving"])
    img = nib.Nifti1Image(np.asanyarray(moving.dataobj), moving.affine)
    img.header["pixdim"][1] = 0.0  # ITK reads this as 1 mm
    nib.save(img, root / "flat.nii.gz")
    return register(pair, out, moving=root / "flat.nii.gz")


def _pixdim_disagrees(root, pair, out):
    moving = nib.load(pair["moving"])
    img = nib.Nifti1Image(np.asanyarray(moving.dataobj), moving.affine)
    img.header["pixdim"][1] = -4.0  # ITK reads a 4 mm voxel with the sform's direction; nibabel the sform's 2 mm
    nib.save(img, root / "negative.nii.gz")
    return register(pair, out, moving=root / "negative.nii.gz")


def _sheared_nrrd(root, pair, out):
    def shear(matrix):
        matrix[1] += 0.5 * matrix[0]  # the j axis leans towards the i axis
        return matrix

    return register(pair, out, moving=nrrd_with_directions(pair, root / "shear.nrrd", shear))


def _sheared_nifti(root, pair, out):
    affine = nib.load(pair["moving"]).affine.copy()
    affine[0, 1] = 1.0
    nib.save(nib.Nifti1Image(moving_array(pair), affine), root / "shear.nii.gz")
    return register(pair, out, moving=root / "shear.nii.gz")


def _zero_spacing_nrrd(root, pair, out):
    def flatten(matrix):
        matrix[0] = 0.0
        return matrix

    return register(pair, out, moving=nrrd_with_directions(pair, root / "zero.nrrd", flatten))


def _tiny(root, pair, out):
    return register(pair, out, moving=image(root / "tiny.nii.gz", np.random.default_rng(5).random((8, 8, 8)).astype(np.float32)))


def _far_away(root, pair, out):
    return register(pair, out, moving=like_moving(pair, root / "far.nii.gz", origin=(1000.0, 0.0, 0.0)))


def _flipped_axis(root, pair, out):
    g = read_image(pair["moving"]).geometry
    direction = g.direction.copy()
    direction[:, 0] *= -1  # the i axis now runs the other way from the same corner origin
    return register(pair, out, moving=like_moving(pair, root / "flipped.nii.gz", direction=direction))


def _jers_slab(root, pair, out):
    slab = image(root / "slab.nii.gz", np.random.default_rng(6).random((90, 100, 2)).astype(np.float32))
    return ["register", "--method", "jers", "--moving", str(slab), "--out", str(out)]


def _jers_thin_head(root, pair, out):
    volume = read_image(pair["moving"])
    thin = image(root / "thin.nii.gz", volume.array[:, :, 40:60], spacing=(2.0, 2.0, 2.0))
    return ["register", "--method", "jers", "--moving", str(thin), "--out", str(out)]


def _seg_other_grid(root, pair, out):
    labels = read_image(pair["fixed_seg"]).array.astype(np.uint8)
    return segreg(pair, out, fixed_seg=image(root / "seg.nii.gz", labels, spacing=(1.0, 1.0, 1.0)))


def _labels(name: str, change: Callable[[np.ndarray], np.ndarray], dtype=np.float32) -> Builder:
    def build(root, pair, out):
        labels = read_image(pair["moving_seg"]).array
        return segreg(pair, out, moving_seg=like_moving(pair, root / name, change(labels.astype(dtype))))

    return build


def _negative(labels):
    labels[5, 5, 5] = -3
    return labels


def _fractional(labels):
    return labels + 0.5


def _labels_nan(root, pair, out):
    labels = read_image(pair["moving_seg"]).array.astype(np.float32)
    labels[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(labels, nib.load(pair["moving_seg"]).affine), root / "nan_seg.nii.gz")
    return segreg(pair, out, moving_seg=root / "nan_seg.nii.gz")


def _labels_4d(root, pair, out):
    labels = read_image(pair["moving_seg"]).array
    nib.save(nib.Nifti1Image(np.stack([labels, labels], -1).astype(np.int16), nib.load(pair["moving_seg"]).affine), root / "seg4.nii.gz")
    return segreg(pair, out, moving_seg=root / "seg4.nii.gz")


def _no_shared_label(root, pair, out):
    labels = read_image(pair["moving_seg"]).array
    return segreg(pair, out, moving_seg=like_moving(pair, root / "shifted.nii.gz", np.where(labels > 0, labels + 900, 0).astype(np.int16)))


def _segreg_without_labels(root, pair, out):
    return register(pair, out, "--method", "segreg")


def _fixed_seg_alone(root, pair, out):
    return register(pair, out, "--fixed-seg", str(pair["fixed_seg"]))


def _option(*values: str, method: str = "tto") -> Builder:
    def build(root, pair, out):
        flags = [item for value in values for item in ("--option", value)]
        return segreg(pair, out, *flags) if method == "segreg" else register(pair, out, "--method", method, *flags)

    return build


def _flags(*values: str) -> Builder:
    return lambda root, pair, out: register(pair, out, *values)


def _earlier_output_of_the_user(root, pair, out):
    out.mkdir()
    (out / "provenance.json").write_text('{"written": "by hand"}')
    (out / "notes.txt").write_text("my notes")
    (out / "scans").mkdir()
    (out / "scans" / "t1.nii.gz").write_bytes(pair["fixed"].read_bytes())
    out.chmod(0o755)
    return register(pair, out)


def _input_inside_output(root, pair, out):
    out.mkdir()
    shutil.copy(pair["moving"], out / "warped.nii.gz")
    (out / "result.json").write_text(json.dumps({"warped": "warped.nii.gz"}))
    return register(pair, out, moving=out / "warped.nii.gz")


def _user_file_named_like_an_output(root, pair, out):
    out.mkdir()
    shutil.copy(pair["moving"], out / "warped.nii.gz")  # not listed in a result.json: the user's
    return register(pair, out, "--overwrite")


def _out_is_a_file(root, pair, out):
    out.write_text("a report")
    return register(pair, out)


def _out_is_dev_null(root, pair, out):
    return register(pair, Path("/dev/null"))


def _out_is_a_fifo(root, pair, out):
    os.mkfifo(out)
    return register(pair, out)


def _out_parent_missing(root, pair, out):
    return register(pair, root / "no" / "such" / "folder")


def _out_link_loop(root, pair, out):
    out.symlink_to(root / "loop2")
    (root / "loop2").symlink_to(out)
    return register(pair, out)


def _out_unwritable(root, pair, out):
    return register(pair, Path("/proc/jointregseg-out"))


CASES: dict[str, tuple[Builder, tuple[str, ...]]] = {
    # files
    "missing fixed image": (_missing, ("fixed image", "nothere.nii.gz", "missing")),
    "missing moving image": (_missing_moving, ("moving image", "missing")),
    "image path is a folder": (_folder, ("is a folder",)),
    "image is /dev/null": (_dev_null, ("/dev/null", "character device")),
    "image is a FIFO": (_fifo, ("named pipe",)),
    "symbolic link loop": (_link_loop, ("symbolic link loop",)),
    "broken symbolic link": (_dangling, ("broken symbolic link", "deleted.nii.gz")),
    "empty file": (_empty_file, ("empty file",)),
    "unsupported file type": (_unsupported, ("moving image", "unsupported file type")),
    "truncated .nii.gz": (_truncated_gz, ("cut.nii.gz", "corrupt")),
    "truncated .nii": (_truncated_nii, ("cut.nii", "truncated")),
    "garbage bytes": (_garbage, ("corrupt",)),
    "gzip of garbage": (_gzipped_garbage, ("corrupt",)),
    "broken image and label maps": (_broken_image_and_label_maps, ("fixed image", "bad_fixed.nii.gz", "corrupt")),
    "4D image": (_four_d, ("4 dimensions",)),
    "2D image": (_two_d, ("2 dimensions",)),
    "single slice": (_one_slice, ("single slice",)),
    "all-zero image": (_zeros, ("all voxels are zero",)),
    "constant image": (_constant, ("constant",)),
    "NaN in NIfTI": (_with(np.nan, ".nii.gz"), ("non-finite", "NaN")),
    "inf in NIfTI": (_with(np.inf, ".nii.gz"), ("non-finite", "inf")),
    "NaN in NRRD": (_with(np.nan, ".nrrd"), ("NaN",)),
    "inf in MetaImage": (_with(-np.inf, ".mha"), ("inf",)),
    "complex voxels": (_complex, ("complex",)),
    "RGB image": (_rgb, ("4 dimensions",)),
    "zero voxel size in NIfTI": (_zero_pixdim, ("voxel size", "pixdim")),
    "pixdim and sform disagree": (_pixdim_disagrees, ("inconsistent header",)),
    "sheared NRRD": (_sheared_nrrd, ("sheared",)),
    "sheared NIfTI": (_sheared_nifti, ("sheared",)),
    "zero spacing in NRRD": (_zero_spacing_nrrd, ("voxel size of 0",)),
    "image too small": (_tiny, ("8x8x8", "at least 16")),
    # geometry
    "far-away origin": (_far_away, ("hardly overlap", "origin")),
    "flipped axis": (_flipped_axis, ("hardly overlap",)),
    "jers on a 2-slice slab": (_jers_slab, ("at least 16",)),
    "jers on a 40 mm slab": (_jers_thin_head, ("jers needs a whole head",)),
    "label map on another grid": (_seg_other_grid, ("not on the same voxel grid", "resample fixed label map onto the grid of fixed image")),
    # labels
    "negative labels": (_labels("neg.nii.gz", _negative), ("negative labels",)),
    "non-integer labels": (_labels("frac.nii.gz", _fractional), ("non-integer",)),
    "empty label map": (_labels("none.nii.gz", np.zeros_like, np.uint8), ("empty",)),
    "NaN in a label map": (_labels_nan, ("non-finite",)),
    "4D label map": (_labels_4d, ("4 dimensions",)),
    "label maps sharing no label": (_no_shared_label, ("share no label",)),
    "segreg without label maps": (_segreg_without_labels, ("needs label maps",)),
    "fixed label map alone with tto": (_fixed_seg_alone, ("--moving-seg",)),
    # options
    "mi_bins=NaN": (_option("mi_bins=NaN"), ("'mi_bins'", "whole number from 2 to 256")),
    "mi_bins=1e999": (_option("mi_bins=1e999"), ("'mi_bins'",)),
    "affine_iterations=abc": (_option("affine_iterations=abc"), ("'affine_iterations'", "list of 3")),
    "segreg lr=abc": (_option("lr=abc", method="segreg"), ("segreg option 'lr'", "a number")),
    "segreg margin_mm={...}": (_option("margin_mm={...}", method="segreg"), ("'margin_mm'",)),
    "segreg integration_steps=x": (_option("integration_steps=x", method="segreg"), ("'integration_steps'",)),
    "segreg regions=0": (_option("regions=0", method="segreg"), ("'regions'", "'all'")),
    "segreg levels fine to coarse": (_option("levels=[2,4]", method="segreg"), ("coarse to fine",)),
    "tto lr=Infinity": (_option("lr=Infinity"), ("'lr'",)),
    "tto=maybe": (_option("tto=maybe"), ("'tto'", "true or false")),
    "network=big": (_option("network=big"), ("'network'", "'student'")),
    "unknown option": (_option("lamda_smooth=1"), ("unknown tto option", "lambda_smooth")),
    "option without =": (_option("spacing"), ("KEY=VALUE",)),
    "hof spacing=100": (_option("spacing=100", method="hof"), ("hof option 'spacing'", "from 1 to 8")),
    "seed too large": (_flags("--seed", str(2**40)), ("--seed", "4294967295")),
    "negative seed": (_flags("--seed", "-1"), ("--seed",)),
    "threads 0": (_flags("--threads", "0"), ("--threads", "from 1 to 1024")),
    "threads negative": (_flags("--threads", "-4"), ("--threads",)),
    "time budget NaN": (_flags("--time-budget", "nan"), ("--time-budget", "a number > 0")),
    "negative iterations": (_flags("--iterations", "-1"), ("--iterations",)),
    "iterations not a number": (_flags("--iterations", "ten"), ("--iterations", "invalid int")),
    "unknown method": (_flags("--method", "magic"), ("invalid choice", "magic")),
    "unknown device": (_flags("--device", "tpu"), ("unknown device",)),
    "malformed GPU number": (_flags("--device", "cuda:x"), ("cuda:x",)),
    # output folders
    "folder with the user's files and a provenance.json": (_earlier_output_of_the_user, ("did not write", "notes.txt", "--overwrite")),
    "input inside the output folder": (_input_inside_output, ("moving image", "lies inside the output folder")),
    "user file named like an output": (_user_file_named_like_an_output, ("warped.nii.gz", "not written by JointRegSeg")),
    "output is a file": (_out_is_a_file, ("not a folder",)),
    "output is /dev/null": (_out_is_dev_null, ("character device", "not a folder")),
    "output is a FIFO": (_out_is_a_fifo, ("named pipe", "not a folder")),
    "output's parent missing": (_out_parent_missing, ("does not exist",)),
    "output is a symbolic link loop": (_out_link_loop, ("symbolic link loop",)),
    "output not writable": (_out_unwritable, ("cannot write results",)),
}


@pytest.mark.parametrize("build, words", list(CASES.values()), ids=list(CASES))
def test_refused_with_one_clear_line(tmp_path, pair, capsys, build, words):
    out = tmp_path / "out"
    refused(capsys, tmp_path, build(tmp_path, pair, out), *words)


def test_gpu_requested_without_one(tmp_path, pair, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    refused(capsys, tmp_path, register(pair, tmp_path / "out", "--device", "cuda"), "no CUDA GPU", "--device cpu")


# ----------------------------------------------------------------------------- weights


def _weights(tmp_path: Path, name: str, state: dict | None = None, manifest_text: str | None = None) -> Path:
    """A weights folder holding only ``name`` (the shipped file, or ``state`` with its checksum recorded)."""
    folder = tmp_path / "weights"
    folder.mkdir()
    manifest = json.loads((weights_dir() / "manifest.json").read_text())
    entry = manifest[name]
    target = folder / entry["file"]
    if state is None:
        shutil.copy(weights_dir() / entry["file"], target)
    else:
        torch.save(state, target)
        entry = {**entry, "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(manifest_text if manifest_text is not None else json.dumps({name: entry}))
    return folder


def _shipped(name: str) -> dict:
    manifest = json.loads((weights_dir() / "manifest.json").read_text())
    return torch.load(weights_dir() / manifest[name]["file"], weights_only=True)


def _nan_state() -> dict:
    state = _shipped("tto_student")
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    return state


WEIGHT_CASES = {
    "truncated weights": (lambda tmp: _truncated_weights(tmp), ("checksum",)),
    "weights of another network": (lambda tmp: _weights(tmp, "tto_student", _shipped("tto_teacher")), ("do not fit", "another shape")),
    "NaN weights": (lambda tmp: _weights(tmp, "tto_student", _nan_state()), ("NaN",)),
    "weights file missing": (lambda tmp: _missing_weights(tmp), ("is missing",)),
    "manifest not JSON": (lambda tmp: _weights(tmp, "tto_student", manifest_text="{"), ("not valid JSON",)),
    "no such weights": (lambda tmp: _weights(tmp, "tto_teacher"), ("no weights named 'tto_student'",)),
}


def _truncated_weights(tmp: Path) -> Path:
    folder = _weights(tmp, "tto_student")
    weights = next(folder.glob("*.pt"))
    weights.write_bytes(weights.read_bytes()[:1000])
    return folder


def _missing_weights(tmp: Path) -> Path:
    folder = _weights(tmp, "tto_student")
    next(folder.glob("*.pt")).unlink()
    return folder


@pytest.mark.parametrize("make, words", list(WEIGHT_CASES.values()), ids=list(WEIGHT_CASES))
def test_bad_weights_are_refused(tmp_path, pair, capsys, monkeypatch, make, words):
    monkeypatch.setenv("JRS_WEIGHTS_DIR", str(make(tmp_path)))
    message = refused(capsys, tmp_path, register(pair, tmp_path / "out", *FAST), *words)
    assert "\n" not in message


# ----------------------------------------------------------------------------- job files (the worker)


JOB_CASES = {
    "job file not JSON": ('{"method": "tto", "output": ', "not valid JSON"),
    "job file not an object": ("[1, 2]", "JSON object"),
    "unknown job field": ('{"method": "tto", "output": "o", "colour": "red"}', "unknown field(s) ['colour']"),
    "job field of the wrong type": ('{"method": "tto", "output": "o", "seed": "one"}', "'seed' has the wrong type"),
    "job without output": ('{"method": "tto"}', "'output'"),
    "overwrite not a boolean": ('{"method": "tto", "output": "o", "overwrite": "yes"}', "'overwrite' has the wrong type"),
    "unknown Jacobian map": ('{"method": "tto", "output": "o", "jacobian": "both"}', "'jacobian' must be one of deformable, whole"),
}


@pytest.mark.parametrize("text, words", list(JOB_CASES.values()), ids=list(JOB_CASES))
def test_bad_job_files_are_refused(tmp_path, text, words):
    job = tmp_path / "job.json"
    job.write_text(text)
    before = tree(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "JointRegSegLib.worker", str(job)], capture_output=True, text=True, cwd=tmp_path)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 2 and [e["event"] for e in events] == ["error"]
    assert words in events[0]["message"] and "\n" not in events[0]["message"] and "Traceback" not in proc.stderr
    assert tree(tmp_path) == before


def test_unreadable_job_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "JointRegSegLib.worker", str(tmp_path)], capture_output=True, text=True)
    event = json.loads(proc.stdout.splitlines()[-1])
    assert proc.returncode == 2 and "cannot read the job file" in event["message"] and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- runs that start


def _job(pair: dict[str, Path], out: Path, **extra) -> dict:
    return {"method": "tto", "output": str(out), **{k: str(v) for k, v in pair.items()}, **FAST_JOB, **extra}


def _start(job: dict, folder: Path) -> subprocess.Popen:
    path = folder / "job.json"
    path.write_text(json.dumps(job))
    return subprocess.Popen(
        [sys.executable, "-m", "JointRegSegLib.worker", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(proc: subprocess.Popen, fraction: float) -> None:
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["fraction"] >= fraction:
            return
    raise AssertionError(f"the worker ended before {fraction:.0%}: {proc.stderr.read()[-2000:]}")


def _quiet_after(proc: subprocess.Popen, results: Path, timeout: float = 10.0) -> None:
    """Wait for the worker to end and its janitor to clear ``results``."""
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while any(results.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)


def test_sigint_cancels_the_worker_cleanly(tmp_path, pair):
    results = tmp_path / "results"
    results.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    before = tree(tmp_path / "inputs")
    proc = _start(_job(pair, results / "run", options={}, iterations=500, time_budget=120), work)
    _wait_for(proc, 0.05)  # inputs read, the method at work
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "cancelled" and "SIGINT" in events[-1]["message"]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    _quiet_after(proc, results)
    assert list(results.iterdir()) == [] and tree(tmp_path / "inputs") == before


@pytest.mark.parametrize("sig, name, code", [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "Ctrl-C", 130)])
def test_stopping_the_command_line_says_so_and_leaves_nothing(tmp_path, pair, sig, name, code):
    """``kill`` (SIGTERM) or Ctrl-C during a command-line run: one line saying the run was cancelled and that no
    output was written, the exit code of the worker's cancel, no traceback, nothing left in the results folder."""
    results = tmp_path / "results"
    results.mkdir()
    before = tree(tmp_path / "inputs")
    args = register(pair, results / "run", "--iterations", "500", "--time-budget", "120", "--no-pictures")
    proc = subprocess.Popen([sys.executable, "-m", "JointRegSegLib.cli", *args], stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_in_a_terminal)
    deadline = time.monotonic() + 120
    while not any(results.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the staging folder appears once the inputs are checked
    time.sleep(2.0)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == code, err[-2000:]
    assert err.rstrip().splitlines()[-1] == f"cancelled ({name}); no output was written.", err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    _quiet_after(proc, results)
    assert list(results.iterdir()) == [] and tree(tmp_path / "inputs") == before


def test_second_run_into_the_same_folder_fails_clearly(tmp_path, pair, capsys):
    results = tmp_path / "results"
    results.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    out = results / "run"
    proc = _start(_job(pair, out, options={}, iterations=500, time_budget=120), work)
    try:
        _wait_for(proc, 0.0)  # the first event comes after the output folder is locked
        message = refused(capsys, tmp_path / "inputs", register(pair, out, *FAST), "another JointRegSeg run", str(proc.pid))
        assert "\n" not in message
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    _quiet_after(proc, results)
    assert list(results.iterdir()) == [], "a staging folder, lock file or old folder remained"


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB file system for the output (tmpfs; needs root), or None where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _file_size_limit() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (3 * 2**20, 3 * 2**20))


def test_full_disk_fails_whole(tmp_path, pair, small_disk):
    """ENOSPC on a 3 MB tmpfs; without root, a 3 MB file-size limit (EFBIG) stands in for the full disk."""
    disk = small_disk or tmp_path / "disk"
    before = tree(tmp_path / "inputs")
    limit = None if small_disk else _file_size_limit

    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(_job(pair, disk / "out")))
    proc = subprocess.run(
        [sys.executable, "-m", "JointRegSegLib.worker", str(job_file)], capture_output=True, text=True, preexec_fn=limit, timeout=600
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    errors = [e for e in events if e["event"] == "error"]
    assert proc.returncode == 2 and len(errors) == 1 and events[-1] is errors[0], proc.stderr[-2000:]
    assert "could not write" in errors[0]["message"]
    assert small_disk is None or "no space left" in errors[0]["message"]
    assert "Traceback" not in proc.stderr
    deadline = time.monotonic() + 10
    while any(disk.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(disk.iterdir()) == [], "partial output left on the full disk"
    assert tree(tmp_path / "inputs") == before


def test_out_of_memory_says_how_much_and_what_to_change(tmp_path, pair):
    """A 0.5 mm network grid under a 2.5 GB address-space limit: numpy, ITK or torch fails to allocate."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2500 * 2**20, 2500 * 2**20))

    before = tree(tmp_path / "inputs")
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(_job(pair, tmp_path / "out", options={"spacing": 0.5, "tto": False, "affine": "none"})))
    proc = subprocess.run(
        [sys.executable, "-m", "JointRegSegLib.worker", str(job_file)], capture_output=True, text=True, preexec_fn=limit, timeout=600
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 2 and events[-1]["event"] == "error" and events[-1]["kind"] == "out_of_memory", proc.stdout[-2000:]
    assert "ran out of memory" in events[-1]["message"] and "spacing" in events[-1]["message"]
    assert not (tmp_path / "out").exists() and tree(tmp_path / "inputs") == before


def test_gpu_out_of_memory_message_names_the_size_and_the_cpu():
    """torch's own CUDA out-of-memory error (no GPU here to exhaust), as the worker reports it."""
    error = torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 8.00 GiB of which 1.20 GiB is free."
    )
    failure = describe_failure(error, "test-time optimisation")
    assert failure.exit_code == 2 and failure.kind == "out_of_memory"
    assert "GPU memory while test-time optimisation" in failure.message and "2.50 GiB" in failure.message
    assert "--device cpu" in failure.message and "\n" not in failure.message


# ----------------------------------------------------------------------------- output folders that are ours


def _run(capsys, args: list[str]) -> None:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]


def _listed(out: Path) -> set[str]:
    return set(json.loads((out / "result.json").read_text()).values()) | {"result.json"}


def _files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def test_our_folder_is_updated_and_the_users_files_are_kept(tmp_path, pair, capsys):
    out = tmp_path / "out"
    _run(capsys, register(pair, out, *FAST))
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask(), "a new folder gets the user's usual permissions"
    assert _files(out) == _listed(out)
    out.chmod(0o750)
    inode = out.stat().st_ino

    _run(capsys, register(pair, out, *FAST, "--seed", "1"))  # only our files there: updated in place
    assert (out.stat().st_ino, stat.S_IMODE(out.stat().st_mode)) == (inode, 0o750)
    assert json.loads((out / "provenance.json").read_text())["seed"] == 1 and _files(out) == _listed(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    (out / "notes.txt").write_text("reviewed by Dr. X")
    (out / "mine").mkdir()
    (out / "mine" / "scan.nii.gz").write_bytes(b"not ours")
    refused(capsys, tmp_path, register(pair, out, *FAST), "did not write", "notes.txt", "--overwrite")

    users = {name: (out / name).read_bytes() for name in ("notes.txt", "mine/scan.nii.gz")}
    _run(capsys, register(pair, out, *FAST, "--seed", "2", "--overwrite"))
    assert {name: (out / name).read_bytes() for name in users} == users
    assert json.loads((out / "provenance.json").read_text())["seed"] == 2
    assert _files(out) == _listed(out) | set(users)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failing_evaluation_and_pictures_keep_the_registration(tmp_path, pair, capsys, monkeypatch):
    """Faults injected into HD95 (its search for the nearest surface voxels runs out of memory) and matplotlib
    (a PNG cannot be rendered)."""
    import matplotlib.figure

    import JointRegSegLib.metrics.overlap as overlap

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 3.00 GiB for an array with shape (400000000, 2) and data type float64")

    def no_renderer(*args, **kwargs):
        raise RuntimeError("the renderer failed")

    monkeypatch.setattr(overlap, "surface_distances", no_memory)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_renderer)
    out = tmp_path / "out"
    args = register(pair, out, "--fixed-seg", str(pair["fixed_seg"]), "--moving-seg", str(pair["moving_seg"]), *FAST[:-1])
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    files = json.loads((out / "result.json").read_text())
    assert {"warped", "displacement", "affine", "metrics", "provenance"} <= set(files) and not any(k.startswith("picture") for k in files)
    failed = json.loads((out / "metrics.json").read_text())["failed_steps"]
    assert "ran out of memory" in failed["evaluation"] and "renderer failed" in failed["pictures"]
    assert "warning: the evaluation step failed" in captured.out and "Traceback" not in captured.err


def test_two_valued_image_is_registered_with_warnings(tmp_path, pair, capsys):
    """A mask given as the fixed image: registered, but the log says so and why NCC is undefined (null)."""
    volume = read_image(pair["fixed"])
    box = np.zeros(volume.array.shape, np.uint8)
    box[15:-15, 15:-15, 15:-15] = 1  # a convex mask: the fixed image is constant inside its own foreground
    g = volume.geometry
    mask = image(tmp_path / "mask.nii.gz", box, g.spacing, g.origin, g.direction)
    out = tmp_path / "out"
    code = main(register(pair, out, *FAST, fixed=mask))
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "fixed image has only two intensity values" in err and "ncc is undefined" in err
    assert json.loads((out / "metrics.json").read_text())["ncc"] is None


def test_result_checks_refuse_nan_and_empty_results(sample_pair):
    fixed, moving = read_image(sample_pair["fixed"]), read_image(sample_pair["moving"])
    zero_field = Volume(np.zeros(fixed.geometry.shape + (3,), np.float32), fixed.geometry)
    inputs = Inputs(fixed, moving)
    check_result(inputs, Result(zero_field, moving))  # the moving image as it lies: fine
    nan_field = zero_field.with_array(zero_field.array.copy())
    nan_field.array[10, 10, 10, 0] = np.nan
    with pytest.raises(InputError, match="diverged.*displacement field"):
        check_result(inputs, Result(nan_field, moving))
    with pytest.raises(InputError, match="covers only 0% of the fixed image's foreground"):
        check_result(inputs, Result(zero_field, fixed.with_array(np.zeros_like(fixed.array))))


def test_cross_contrast_pair_is_evaluated(shared_data_dir, tmp_path, capsys):
    """FLAIR onto the benchmark T1 (../shared/data): the PMM used to fail on chunks without scored patches."""
    out = tmp_path / "out"
    args = [
        "register", "--fixed", str(shared_data_dir / "pair" / "fixed_img.nii.gz"),
        "--moving", str(shared_data_dir / "flair" / "FLAIR.nii.gz"), "--out", str(out), *FAST,
    ]
    _run(capsys, args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "failed_steps" not in metrics and 0.0 < metrics["pmm_mean"] <= 1.0
