"""The controller's parts that need no scene: state machine, texts, processes, dependencies.

(Whole flows with the real worker and a real MRML scene are in test_app.py.)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from JointRegSegLib.app.environment import (
    DESCRIBE_SCRIPT,
    dependencies,
    library_root,
    missing_requirements,
    protected_constraints,
    slicer_python,
    worker_environment,
)
from JointRegSegLib.app.process import BackgroundProcess, parse_event
from JointRegSegLib.app.request import RunRequest, problem
from JointRegSegLib.app.state import BUSY, TRANSITIONS, RunState, RunStateMachine, apply_button
from JointRegSegLib.app.texts import describe_method, device_label, format_duration, progress_text
from JointRegSegLib.methods.catalogue import CATALOGUE

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "JointRegSeg" / "Resources" / "requirements.txt"


def test_state_machine_allows_only_the_documented_transitions():
    machine = RunStateMachine()
    seen = []
    machine.listeners.append(lambda old, new: seen.append((old, new)))
    for state in (RunState.STARTING, RunState.RUNNING, RunState.LOADING, RunState.IDLE):
        machine.go(state)
    assert seen[-1] == (RunState.LOADING, RunState.IDLE) and len(seen) == 4
    with pytest.raises(RuntimeError, match="cannot go"):
        machine.go(RunState.LOADING)
    with pytest.raises(RuntimeError, match="cannot go"):
        RunStateMachine().go(RunState.CANCELLING)  # nothing to cancel when idle
    machine.go(RunState.INSTALLING)
    with pytest.raises(RuntimeError, match="cannot go"):
        machine.go(RunState.CANCELLING)  # an install cannot be cancelled
    machine.go(RunState.IDLE)
    assert set(TRANSITIONS) == set(RunState) and BUSY == set(RunState) - {RunState.IDLE, RunState.FAILED}


def test_the_button_is_cancel_only_while_the_worker_runs():
    enabled_cancel = [state for state in RunState if apply_button(state) == ("Cancel", True)]
    assert enabled_cancel == [RunState.RUNNING]
    for state in (RunState.INSTALLING, RunState.STARTING, RunState.CANCELLING, RunState.LOADING):
        assert apply_button(state)[1] is False, state
    assert apply_button(RunState.IDLE) == apply_button(RunState.FAILED) == ("Apply", True)


def test_progress_texts():
    assert format_duration(None) == "" and format_duration(float("nan")) == "" and format_duration(45.4) == "45 s"
    assert format_duration(185) == "3 min 05 s" and format_duration(3720) == "1 h 02 min"
    assert progress_text("optimising", 185) == "optimising: %p%, about 3 min 05 s left"
    assert progress_text("optimising", None) == "optimising: %p%"
    assert device_label("cpu") == "CPU" and device_label("cuda:1") == "GPU (cuda:1)"


def test_method_description_says_what_it_needs_and_gives():
    segreg = describe_method(CATALOGUE["segreg"])
    assert "segmentations of both" in segreg and "affine part" in segreg and "brain mask" not in segreg
    jers = describe_method(CATALOGUE["jers"])
    assert "atlas" in jers and "brain mask" in jers and "fixed and moving" not in jers
    assert "iterations" in describe_method(CATALOGUE["tto"]) and "iterations" not in describe_method(CATALOGUE["uresnet"])


def test_requests_are_checked_against_the_option_schema():
    """The panels' settings and options get the worker's own messages (methods.options) before anything starts."""
    tto = CATALOGUE["tto"]
    assert problem(RunRequest(seed=2**40), tto) == "Seed must be a whole number from 0 to 4294967295; got 1099511627776."
    assert problem(RunRequest(iterations=-1), tto) == "Iterations must be a whole number from 0 to 10000000; got -1."
    assert problem(RunRequest(time_budget=float("nan")), tto) == "Time budget must be a number > 0 and <= 10000000; got nan."
    assert problem(RunRequest(options={"mi_bins": "abc"}), tto) == "tto option 'mi_bins' must be a whole number from 2 to 256; got 'abc'."
    assert problem(RunRequest(options={"variant": "learned"}), tto).startswith("unknown tto option(s) variant;")
    assert problem(RunRequest(options={"mi_bins": "64"}, seed=7), tto) == "Select a fixed and a moving volume."


def test_event_lines_and_other_lines():
    assert parse_event('{"event": "progress", "fraction": 0.5}') == {"event": "progress", "fraction": 0.5}
    assert parse_event("Warning: something") is None and parse_event('{"no": "event"}') is None and parse_event("{broken") is None


_TREE = """
import json, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
print(json.dumps({"event": "log", "message": "child", "pid": child.pid}), flush=True)
print("a line that is not an event", flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_cancel_stops_the_whole_process_tree_without_polling():
    """A grandchild that ignores SIGTERM is still stopped: SIGTERM to the group, then SIGKILL after the
    grace period by the watchdog, although nobody polls after the cancel."""
    runner = BackgroundProcess([sys.executable, "-c", _TREE])
    events, lines = [], []
    deadline = time.monotonic() + 60
    while not events and time.monotonic() < deadline:
        out = runner.poll()
        events, lines = events + out.events, lines + out.lines
        time.sleep(0.02)
    child = events[0]["pid"]
    assert _alive(child) and runner.running
    runner.cancel(grace=0.5)
    runner.process.wait(timeout=30)
    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the grandchild survived the cancel"
    out = runner.wait(timeout=20)
    assert out.finished and out.exit_code == -15
    assert "a line that is not an event" in lines + out.lines


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_stop_waits_until_the_process_ended():
    runner = BackgroundProcess([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('x', flush=True); time.sleep(600)"])
    deadline = time.monotonic() + 60
    while not runner.poll().lines and time.monotonic() < deadline:
        time.sleep(0.02)
    runner.stop(timeout=2.0)
    assert runner.process.poll() == -9


def test_describe_reports_torch_and_devices_through_the_worker_python():
    runner = BackgroundProcess([sys.executable, "-c", DESCRIBE_SCRIPT], env=worker_environment(), cwd=str(REPO.parent))
    out = runner.wait(timeout=300)
    assert out.exit_code == 0, out.lines[-20:]
    (answer,) = [e for e in out.events if e["event"] == "describe"]
    import torch

    assert answer["torch"] == torch.__version__ and answer["devices"][0] == "cpu"
    found = dependencies(REQUIREMENTS, answer)
    assert found.ready and found.checked_devices and "PyTorch " + torch.__version__ in found.summary()


def test_dependencies_say_what_is_missing(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\npytest>=1\nno-such-package-jointregseg>=1  # why\n")
    found = dependencies(requirements)
    assert found.missing == ["no-such-package-jointregseg>=1"] and not found.ready
    assert "Missing: no-such-package-jointregseg>=1." in found.summary()
    assert missing_requirements(["pytest<1"]) == ["pytest<1"]
    assert all(pin.count("==") == 1 for pin in protected_constraints())


def test_worker_environment_finds_this_library_first():
    env = worker_environment({"PYTHONPATH": os.pathsep.join(["/elsewhere", str(library_root())])})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(library_root()), "/elsewhere"]
    assert (library_root() / "JointRegSegLib" / "__init__.py").is_file()


def test_slicer_python_is_found_or_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="Reinstall 3D Slicer"):
        slicer_python(str(tmp_path))
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / name).write_text("")
    assert slicer_python(str(tmp_path)) == str(tmp_path / "bin" / name)



def test_panel_spin_boxes_special_values_mean_the_method_defaults():
    """The panels' "auto" iterations and "no limit" time budget (the spin boxes' lowest values) reach the worker
    as unset (None), so a run from the panel gets the same defaults as one from the command line."""
    from JointRegSegLib.app import AUTO_ITERATIONS, NO_TIME_LIMIT, panel_iterations, panel_time_budget
    from JointRegSegLib.methods.options import validate_setting

    assert panel_iterations(AUTO_ITERATIONS) is None and panel_time_budget(NO_TIME_LIMIT) is None
    assert panel_iterations(0) == 0 and panel_iterations(250) == 250 and panel_time_budget(90.0) == 90.0
    assert validate_setting("iterations", panel_iterations(AUTO_ITERATIONS), "Iterations") is None
