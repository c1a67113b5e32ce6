"""`experiments.call_profile`: the command line of each run, and the Slicer module's job (``--as-module``)."""

from __future__ import annotations

import gzip
import sys

from JointRegSegLib.bench.pairs import PairSpec
from JointRegSegLib.experiments.call_profile import command, uncompressed_pair


def test_as_module_the_inputs_are_decompressed_copies_and_the_rest_stays(tmp_path):
    data = {"fixed": b"fixed image bytes" * 100, "moving_seg": b"\x00\x01\x02" * 1000}
    written = {key: gzip.compress(content) for key, content in data.items()}
    for key, packed in written.items():
        (tmp_path / f"{key}.nii.gz").write_bytes(packed)
    (tmp_path / "moving.nii").write_bytes(b"already plain")
    pair = PairSpec("pair", tmp_path / "fixed.nii.gz", tmp_path / "moving.nii", moving_seg=tmp_path / "moving_seg.nii.gz")
    plain = uncompressed_pair(pair, tmp_path / "nii")
    assert plain.fixed == tmp_path / "nii" / "fixed.nii" and plain.fixed.read_bytes() == data["fixed"]
    assert plain.moving_seg.read_bytes() == data["moving_seg"]
    assert plain.moving == pair.moving and plain.fixed_seg is None and plain.name == "pair"
    assert all((tmp_path / f"{key}.nii.gz").read_bytes() == packed for key, packed in written.items())  # inputs untouched


def test_the_command_registers_with_the_runs_choices(tmp_path):
    pair = PairSpec("pair", tmp_path / "f.nii", tmp_path / "m.nii", fixed_seg=tmp_path / "fs.nii", moving_seg=tmp_path / "ms.nii")
    line = command("segreg[variant=learned]", pair, tmp_path / "out", 2, pictures=False, compress=False)
    assert line[:4] == [sys.executable, "-m", "JointRegSegLib.cli", "register"]
    assert {f"--fixed={pair.fixed}", f"--moving={pair.moving}", f"--fixed-seg={pair.fixed_seg}", f"--moving-seg={pair.moving_seg}"} <= set(line)
    assert line[line.index("--method") + 1] == "segreg" and '--option=variant="learned"' in line
    assert "--no-pictures" in line and "--no-compress" in line and line[line.index("--threads") + 1] == "2"
    usual = command("uresnet", pair, tmp_path / "out", 2, pictures=True)
    assert "--no-pictures" not in usual and "--no-compress" not in usual
