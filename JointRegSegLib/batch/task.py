"""One pair and one method: the registration worker in its own process, on a Dask worker.

``run_task`` is what the cohort runner submits to Dask. It writes the job file, runs
``python -m JointRegSegLib.worker JOB.json`` (through `bench.processes.spawn`: its own process
group, peak memory measured, stopped on a timeout or when the batch's stop file appears), retries a
failure once unless the worker reported a problem with the inputs or options (exit code 2: the same
inputs would fail the same way) or was cancelled by someone's SIGTERM, and moves a finished result
into place.

Layout under the batch folder ``DIR`` for pair ``ID`` and method folder ``M`` (`TaskPaths`)::

    DIR/ID/M/                  the worker's output folder (whole or absent)
    DIR/ID/.M.run/             where the worker writes; renamed to M/ once it succeeded
    DIR/ID/logs/M.job.json     the job file (run it again with python -m JointRegSegLib.worker)
    DIR/ID/logs/M.log          the worker's events and messages (M.attempt2.log for the retry)
    DIR/ID/logs/M.failed.json  the record of a failure (see `resume`)

The worker never writes into an existing folder: a rerun's result replaces the earlier one only
once it is complete, so a failed or stopped rerun keeps the earlier result. Only the standard
library and `bench.processes` are imported here, so a Dask worker process stays small.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bench.processes import child_environment, last_error, spawn
from ..worker.__main__ import EXIT_BAD_INPUT, EXIT_CANCELLED

LOGS = "logs"


@dataclass(frozen=True)
class TaskPaths:
    """Where one pair and method's result, logs and records live (see the module docstring)."""

    folder: Path

    @property
    def run_folder(self) -> Path:
        return self.folder.with_name(f".{self.folder.name}.run")

    @property
    def old_folder(self) -> Path:
        return self.folder.with_name(f".{self.folder.name}.old")

    @property
    def logs(self) -> Path:
        return self.folder.parent / LOGS

    @property
    def job_file(self) -> Path:
        return self.logs / f"{self.folder.name}.job.json"

    @property
    def failure_record(self) -> Path:
        return self.logs / f"{self.folder.name}.failed.json"

    def log(self, attempt: int = 1) -> Path:
        return self.logs / (f"{self.folder.name}.log" if attempt == 1 else f"{self.folder.name}.attempt{attempt}.log")

    def restore_interrupted_swap(self) -> None:
        """If a swap was interrupted between its two renames, put the earlier result back."""
        if self.old_folder.is_dir() and not self.folder.exists():
            os.replace(self.old_folder, self.folder)


@dataclass(frozen=True)
class TaskSpec:
    """What one task runs: the worker job (without its output folder) for one pair and method."""

    pair: str
    method: str
    folder: str
    job: dict[str, Any]
    threads: int | None = None
    timeout_s: float | None = None
    stop_file: str = ""
    retries: int = 1


@dataclass
class TaskOutcome:
    """How a task ended: ``done``, ``failed`` or ``cancelled``; with the worker's exit code, error
    message, process wall time and peak memory of the last attempt, and where it ran."""

    pair: str
    method: str
    status: str
    attempts: int = 0
    returncode: int | None = None
    error: str = ""
    process_s: float = float("nan")
    peak_rss_mb: float = float("nan")
    log: str = ""
    host: str = field(default_factory=socket.gethostname)


def run_task(spec: TaskSpec) -> TaskOutcome:
    """Run the worker on one pair and method (see the module docstring)."""
    paths = TaskPaths(Path(spec.folder))
    stop_file = Path(spec.stop_file) if spec.stop_file else None
    outcome = TaskOutcome(spec.pair, spec.method, "cancelled")
    if stop_file is not None and stop_file.exists():
        return outcome
    paths.logs.mkdir(parents=True, exist_ok=True)
    job = {**spec.job, "output": str(paths.run_folder)}
    if spec.threads is not None:
        job["threads"] = spec.threads
    paths.job_file.write_text(json.dumps(job, indent=2) + "\n")
    env = child_environment(spec.threads) if spec.threads is not None else dict(os.environ)
    command = [sys.executable, "-m", "JointRegSegLib.worker", str(paths.job_file)]
    errors = []
    for attempt in range(1, spec.retries + 2):
        shutil.rmtree(paths.run_folder, ignore_errors=True)
        log = paths.log(attempt)
        done = spawn(command, env, log, spec.timeout_s, stop=stop_file.exists if stop_file else None)
        outcome.attempts, outcome.returncode, outcome.log = attempt, done.returncode, str(log)
        outcome.process_s, outcome.peak_rss_mb = done.wall_s, done.peak_rss_mb
        if done.stopped == "stopped":
            outcome.status = "cancelled"
            return outcome
        if done.returncode == 0 and (paths.run_folder / "result.json").is_file():
            swap_into_place(paths)
            outcome.status, outcome.error = "done", ""
            return outcome
        if done.stopped == "timeout":
            errors.append(f"stopped after the time limit of {spec.timeout_s:g} s (--timeout)")
            break
        errors.append(f"{last_error(log)} (worker exit code {done.returncode})")
        if done.returncode in (EXIT_BAD_INPUT, EXIT_CANCELLED):
            break
    outcome.status = "failed"
    outcome.error = errors[0] if len(set(errors)) == 1 else "; ".join(f"attempt {n}: {e}" for n, e in enumerate(errors, 1))
    return outcome


def swap_into_place(paths: TaskPaths) -> None:
    """Make the finished run folder the result, replacing an earlier result only now."""
    shutil.rmtree(paths.old_folder, ignore_errors=True)
    if paths.folder.exists():
        os.replace(paths.folder, paths.old_folder)
    os.replace(paths.run_folder, paths.folder)
    shutil.rmtree(paths.old_folder, ignore_errors=True)

