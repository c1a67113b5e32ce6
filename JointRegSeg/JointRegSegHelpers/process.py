"""A background process streaming JSON events, polled without blocking, cancelled with its whole tree.

The process starts in a process group of its own (a new session on POSIX, a new process group on
Windows), so `cancel` reaches every process it started: SIGTERM to the group first (the worker
removes its partial output and exits), SIGKILL to the group after a grace period. Two reader
threads move stdout and stderr lines into a queue; `poll` hands them over from any thread (the
Slicer module calls it from a QTimer on the GUI thread, so the GUI never waits on a pipe).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

GRACE_SECONDS = 5.0


@dataclass
class Output:
    """What `BackgroundProcess.poll` collected since the previous call."""

    events: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    finished: bool = False
    exit_code: int | None = None


def parse_event(line: str) -> dict[str, Any] | None:
    """The JSON object on a line of the worker's stdout, or None for any other text."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and "event" in data else None


class BackgroundProcess:
    """Run ``args`` in its own process group; collect its output through `poll`."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.args = list(args)
        options: dict[str, Any] = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            options["start_new_session"] = True
        self.process = subprocess.Popen(
            self.args,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **options,
        )
        self._queue: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._open_streams = 2
        self._cancel_started: float | None = None
        self._killed = False
        self._finished_reported = False
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True, name=f"jointregseg-{name}").start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self, name: str, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put((name, line.rstrip("\r\n")))
        stream.close()
        self._queue.put((name, None))

    def poll(self) -> Output:
        """Events and other lines since the last call; ``finished`` once the process ended and its output is read."""
        output = Output()
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._open_streams -= 1
                continue
            event = parse_event(line) if name == "stdout" else None
            if event is not None:
                output.events.append(event)
            elif line.strip():
                output.lines.append(line)
        if self._cancel_started is not None and not self._killed and time.monotonic() - self._cancel_started > GRACE_SECONDS:
            # The whole group, even when its leader already exited: a grandchild may ignore SIGTERM.
            kill_process_group(self.process.pid, force=True)
            self._killed = True
        if self._open_streams == 0 and self.process.poll() is not None and not self._finished_reported:
            self._finished_reported = True
            output.finished = True
            output.exit_code = self.process.returncode
        return output

    @property
    def running(self) -> bool:
        return not self._finished_reported

    def cancel(self) -> None:
        """Ask the whole process tree to stop (SIGTERM); `poll` escalates to SIGKILL after a grace period."""
        if self.process.poll() is None and self._cancel_started is None:
            self._cancel_started = time.monotonic()
            kill_process_group(self.process.pid, force=False)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> Output:
        """Block until the process finished (scripts and tests); returns everything not yet polled."""
        collected = Output()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            out = self.poll()
            collected.events += out.events
            collected.lines += out.lines
            if out.finished:
                collected.finished, collected.exit_code = True, out.exit_code
                return collected
            if deadline is not None and time.monotonic() > deadline:
                return collected
            time.sleep(interval)


def kill_process_group(pid: int, force: bool) -> None:
    """Stop the process group (POSIX) or process tree (Windows) led by ``pid``."""
    if os.name == "nt":
        command = ["taskkill", "/PID", str(pid), "/T"] + (["/F"] if force else [])
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        return
    try:
        os.killpg(pid, signal.SIGKILL if force else signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def python_environment(library_root: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which ``python -m JointRegSegLib...`` finds the library at ``library_root``."""
    env = dict(os.environ if base is None else base)
    paths = [library_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != library_root]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def worker_command(python: str, job_file: str) -> list[str]:
    """The command line that runs one job with the worker."""
    return [python, "-m", "JointRegSegLib.worker", str(job_file)]


def default_python() -> str:
    """This interpreter (outside Slicer; the module passes Slicer's PythonSlicer instead)."""
    return sys.executable
