"""The command line: register through the worker's job code, clear one-line errors, README/CI agreement."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

from JointRegSegLib.cli import PLAIN_EVERY_S, ProgressBar, main
from JointRegSegLib.methods.options import parse_options
from JointRegSegLib.errors import InputError


def test_register_writes_a_complete_output(tmp_path, sample_pair, capsys):
    out = tmp_path / "run"
    code = main([
        "register", "--fixed", str(sample_pair["fixed"]), "--moving", str(sample_pair["moving"]),
        "--fixed-seg", str(sample_pair["fixed_seg"]), "--moving-seg", str(sample_pair["moving_seg"]),
        "--iterations", "2", "--no-pictures", "--out", str(out),
    ])
    assert code == 0
    manifest = json.loads((out / "result.json").read_text())
    assert all((out / name).is_file() for name in manifest.values())
    printed = capsys.readouterr()
    assert "mean Dice" in printed.out
    # captured, stderr is no terminal: plain progress lines, no bar redrawn with carriage returns
    assert "\r" not in printed.err and "done: 100%" in printed.err.splitlines()[-1]


def test_demo_writes_the_overview_and_every_picture(tmp_path, capsys):
    """The README's first command: the bundled pair registered, the run's pictures drawn by one child process and
    the overview by another (`worker.beside`), every file listed in result.json present, the overview a picture of
    eight rows (taller than wide)."""
    from PIL import Image

    out = tmp_path / "demo"
    assert main(["demo", "--iterations", "2", "--out", str(out)]) == 0
    manifest = json.loads((out / "result.json").read_text())
    assert {"picture_overview", "picture_fixed", "picture_jacobian", "picture_warped_seg"} <= set(manifest)
    assert all((out / name).is_file() for name in manifest.values())
    width, height = Image.open(out / manifest["picture_overview"]).size
    assert height > 1.5 * width
    assert f"pictures in {out / 'pictures'}" in capsys.readouterr().out


def test_progress_without_a_terminal_is_a_line_per_stage_and_interval(capsys):
    """A stage's first event gives a line, then one per PLAIN_EVERY_S seconds while it lasts; the end gives one."""
    now = [0.0]
    bar = ProgressBar(interactive=False, clock=lambda: now[0])
    steps = [(0.0, 0.0, "reading"), (0.5, 0.02, "affine"), (1.0, 0.05, "affine"), (9.0, 0.3, "affine"),
             (11.0, 0.35, "affine"), (12.0, 0.5, "network"), (13.0, 1.0, "done")]
    for seconds, fraction, stage in steps:
        now[0] = seconds
        bar.progress(fraction, stage)
    lines = capsys.readouterr().err.splitlines()
    assert PLAIN_EVERY_S == 10.0
    assert lines == [
        "reading:   0%, 00:00 elapsed, time left not known yet",
        "affine:   2%, 00:00 elapsed, time left not known yet",
        "affine:  35%, 00:11 elapsed, about 20 s left",  # 11 s for 35 %: 11 * 0.65 / 0.35 s to go
        "network:  50%, 00:12 elapsed, about 12 s left",
        "done: 100%, 00:13 elapsed",
    ]


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, sample_pair, capsys):
    code = main(["register", "--fixed", str(tmp_path / "missing.nii.gz"), "--moving", str(sample_pair["moving"]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and errors[0] == err[-1] and "missing.nii.gz" in errors[0]
    assert not (tmp_path / "o").exists()


def test_parse_options_reads_json_values():
    assert parse_options(["tto=false", "spacing=3.5", "name=abc"]) == {"tto": False, "spacing": 3.5, "name": "abc"}
    with pytest.raises(InputError, match="KEY=VALUE"):
        parse_options(["novalue"])


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text().splitlines()
    marker = readme.index("<!-- test-command -->")
    readme_command = readme[marker + 2]
    extracted = subprocess.run(
        ["awk", "/<!-- test-command -->/{getline; getline; print; exit}", str(REPO / "README.md")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == readme_command and "pytest" in readme_command
    assert "<!-- test-command -->" in (REPO / ".ci" / "run").read_text()


def test_worker_module_runs_as_a_program(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "JointRegSegLib.worker"], capture_output=True, text=True)
    event = json.loads(proc.stdout.splitlines()[-1])
    assert proc.returncode == 2 and event["event"] == "error" and "usage" in event["message"]


def test_printed_wall_time_is_the_process_wall_time(tmp_path, sample_pair):
    """The summary's wall time (with its parts) is within 10 % of the process's wall time measured from outside."""
    import re
    import time

    command = [
        sys.executable, "-m", "JointRegSegLib.cli", "register", "--fixed", str(sample_pair["fixed"]),
        "--moving", str(sample_pair["moving"]), "--fixed-seg", str(sample_pair["fixed_seg"]),
        "--moving-seg", str(sample_pair["moving_seg"]), "--no-pictures", "--out", str(tmp_path / "run"),
    ]
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    measured = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if "wall time" in line)
    printed = float(re.search(r"wall time ([0-9.]+) s:", line).group(1))
    parts = dict((name, float(value)) for name, value in re.findall(r"([a-z-]+) ([0-9.]+)", line.split(":", 1)[1]))
    assert set(parts) == {"start-up", "reading", "registration", "evaluation", "writing"}
    assert sum(parts.values()) == pytest.approx(printed, abs=0.3)
    assert abs(printed - measured) <= 0.10 * measured, (printed, measured)
