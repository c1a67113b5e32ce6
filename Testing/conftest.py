"""Shared test fixtures: the bundled sample pair, the optional shared data folder, worker runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    """../shared/data (or $JRS_SHARED_DATA) when present."""
    path = Path(os.environ.get("JRS_SHARED_DATA", REPO.parent / "shared" / "data"))
    return path if path.is_dir() else None


@pytest.fixture
def shared_data_dir() -> Path:
    path = shared_data()
    if path is None:
        pytest.skip("../shared/data is absent (set JRS_SHARED_DATA): this check needs the real data")
    return path


@pytest.fixture(scope="session")
def sample_pair() -> dict[str, Path]:
    from JointRegSegLib.sample_data import sample_pair as pair

    return pair()


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` of a child that a test stops with SIGINT: Ctrl-C reaches it as it reaches a terminal's
    foreground job (a test run started in the background, ``pytest &``, passes SIGINT on ignored, and Python
    keeps an ignored SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_worker(job: dict, tmp_path: Path, env: dict | None = None, timeout: float = 300) -> tuple[int, list[dict], str]:
    """Run ``python -m JointRegSegLib.worker`` on a job; returns exit code, parsed events, stderr."""
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run(
        [sys.executable, "-m", "JointRegSegLib.worker", str(job_file)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    return proc.returncode, events, proc.stderr


@pytest.fixture(scope="module")
def one_thread():
    """Small volumes run several times faster on one thread than on a busy 2-core pool; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
