"""OpenMP's wait policy in a process that runs one job (`JointRegSegLib.openmp`), as libgomp itself reports it.

``OMP_DISPLAY_ENV=VERBOSE`` makes libgomp print the settings it took when it is loaded (with torch), so these tests read
what the OpenMP runtime runs with, not our own variable: how long a waiting thread spins before it sleeps
(``GOMP_SPINCOUNT``: 0 with the passive policy; libgomp shows the policy itself as 'PASSIVE' when none was set too).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

SCRIPT = "from JointRegSegLib.openmp import sleeping_threads; {before}print(sleeping_threads()); import torch; torch.ones(8).sum()"


def _spin_count(stderr: str) -> int:
    """How many times libgomp's waiting threads spin before they sleep, as it reports it."""
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", stderr)
    if found is None:
        pytest.skip("this torch's OpenMP runtime does not report its settings (not GNU libgomp)")
    return int(found.group(1))


def _run(script: str, **env: str) -> tuple[str, str]:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"OMP_DISPLAY_ENV": "VERBOSE"} | env
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=120, check=True)
    return done.stdout.strip(), done.stderr


def test_the_threads_sleep_when_asked_before_torch_loads():
    said, report = _run(SCRIPT.format(before=""))
    assert said == "True" and _spin_count(report) == 0


def test_a_policy_the_user_set_is_kept():
    said, report = _run(SCRIPT.format(before=""), OMP_WAIT_POLICY="ACTIVE")
    assert said == "False" and _spin_count(report) > 0


def test_asking_after_torch_loaded_says_it_had_no_effect():
    said, report = _run(SCRIPT.format(before="import torch; "))
    assert said == "False" and _spin_count(report) > 0


def test_the_worker_runs_its_job_with_sleeping_threads(tmp_path):
    """A worker started ahead of its job (the Slicer module's) loads torch in `prepare`, after asking."""
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"OMP_DISPLAY_ENV": "VERBOSE"}
    done = subprocess.run(
        [sys.executable, "-m", "JointRegSegLib.worker", "--wait"], input="", capture_output=True, text=True,
        env=environment, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0 and '"ready"' in done.stdout, done.stderr[-2000:]
    assert _spin_count(done.stderr) == 0


def test_a_registration_on_the_command_line_runs_with_sleeping_threads(tmp_path, sample_pair):
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"OMP_DISPLAY_ENV": "VERBOSE"}
    command = [
        sys.executable, "-m", "JointRegSegLib.cli", "register", "--fixed", str(sample_pair["fixed"]),
        "--moving", str(sample_pair["moving"]), "--method", "uresnet", "--no-pictures", "--out", str(tmp_path / "run"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _spin_count(done.stderr) == 0
