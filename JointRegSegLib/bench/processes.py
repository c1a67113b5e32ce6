"""Child processes of the benchmark and the cohort runner: thread counts, launch, stop, peak memory.

Standard library only, so that a Dask worker process running `JointRegSegLib.batch` tasks does
not import torch just to launch the registration worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
STOP_POLL_S = 1.0
"""How often `spawn` asks its ``stop`` callable whether to stop the child."""


@dataclass
class Spawned:
    """A finished child process: exit code, wall time, peak resident memory, and why it was stopped
    ("" when it ended by itself, else "timeout" or "stopped")."""

    returncode: int
    wall_s: float
    peak_rss_mb: float
    stopped: str = ""


def child_environment(threads: int) -> dict[str, str]:
    """The environment of every child: this one with the thread variables set to ``threads``."""
    env = dict(os.environ)
    env.update({name: str(int(threads)) for name in THREAD_VARIABLES})
    return env


# Each tool is started by a small launcher that reports the tool's exit code and peak resident
# memory (ru_maxrss from os.wait4). On Linux, exec copies the peak resident size of the process
# image it replaces into the new program's ru_maxrss, so a tool started straight from this process
# (torch, images and maps loaded) would report our peak, not its own; started by the launcher (a
# bare Python) it inherits only the launcher's few megabytes. The launcher and the tool form their
# own process group, which is what a timeout or Ctrl-C stops. If the process that started the
# launcher dies (a killed benchmark, a Dask worker process that ended), the launcher stops the tool
# (SIGTERM: the worker removes its unfinished output) instead of leaving it running unattended.
_LAUNCHER = """
import json, os, signal, subprocess, sys, threading, time
parent = os.getppid()
child = subprocess.Popen(sys.argv[2:])
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
finished = threading.Event()
def watch_parent():
    while not finished.wait(1.0):
        if os.getppid() != parent:
            child.terminate()
            return
threading.Thread(target=watch_parent, daemon=True).start()
if hasattr(os, "wait4"):
    _, status, usage = os.wait4(child.pid, 0)
    code, peak = os.waitstatus_to_exitcode(status), usage.ru_maxrss
else:
    code, peak = child.wait(), None
finished.set()
with open(sys.argv[1], "w") as stream:
    json.dump([code, peak], stream)
"""


def spawn(
    command: list[str], env: dict[str, str], log: Path, timeout_s: float | None = None, stop: Callable[[], bool] | None = None
) -> Spawned:
    """Run ``command`` in ``log``'s folder with stdout and stderr into ``log``; stop it (SIGTERM, then
    SIGKILL) past ``timeout_s`` or once ``stop()`` (asked every `STOP_POLL_S`) returns true. The
    folder is the working directory because some tools write files there (transformix writes
    ``deformationField.nii``)."""
    report = log.with_name(log.name + ".exit.json")
    report.unlink(missing_ok=True)
    stopped = ""
    with log.open("w") as stream:
        start = time.perf_counter()
        launcher = subprocess.Popen(
            [sys.executable, "-S", "-c", _LAUNCHER, str(report), *command],
            stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=log.parent, start_new_session=True,
        )
        try:
            stopped = _wait(launcher, start, timeout_s, stop)
        except BaseException:
            _stop_group(launcher)
            raise
        if stopped:
            _stop_group(launcher)
            stream.write(f"\nstopped after {timeout_s:g} s (timeout)\n" if stopped == "timeout" else "\nstopped on request\n")
        wall = time.perf_counter() - start
    if not report.is_file():
        return Spawned(launcher.returncode or -1, wall, float("nan"), stopped)
    code, peak = json.loads(report.read_text())
    # Linux reports kilobytes, macOS bytes.
    peak_mb = float("nan") if peak is None else peak / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)
    return Spawned(int(code), wall, peak_mb, stopped)


def _wait(launcher: subprocess.Popen, start: float, timeout_s: float | None, stop: Callable[[], bool] | None) -> str:
    """Wait for the launcher; "" when it ended, "timeout" or "stopped" when it must be stopped."""
    while True:
        left = None if timeout_s is None else timeout_s - (time.perf_counter() - start)
        if left is not None and left <= 0:
            return "timeout"
        step = left if stop is None else (STOP_POLL_S if left is None else min(STOP_POLL_S, left))
        try:
            launcher.wait(step)
            return ""
        except subprocess.TimeoutExpired:
            if stop is not None and stop():
                return "stopped"


def _stop_group(launcher: subprocess.Popen) -> None:
    """SIGTERM to the tool's process group (the worker cancels cleanly), SIGKILL after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(launcher.pid, sig)
        except ProcessLookupError:
            return
        try:
            launcher.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def last_error(log: Path) -> str:
    """The worker's last ``error`` event, else the last non-empty line of a log."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("event") == "error":
            return str(event.get("message", ""))
    return lines[-1][:300] if lines else "no output"
