"""A background process streaming JSON events, read without blocking, stopped with its whole tree.

The process starts in a process group of its own (a new session on POSIX, a new process group on
Windows), so a stop reaches every process it started. On POSIX `cancel` sends SIGTERM to the group
(the worker removes its partial output and exits) and a watchdog thread sends SIGKILL to the group
after a grace period, whether or not anybody still polls. On Windows a process without a console
cannot be asked to stop (``taskkill`` without ``/F`` only posts a window message), so the tree is
ended at once with ``taskkill /T /F``; the worker's janitor removes its partial output then.
Two reader threads move stdout and stderr lines into a queue that `poll` empties, so the caller
(a Qt timer on Slicer's GUI thread, the web server's loop, a test) never waits on a pipe. With
``stdin=True`` the process reads what `send` writes (a worker started ahead of its job reads the job's
path there); otherwise its stdin is empty.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Dict, List, Optional, Tuple

GRACE_SECONDS = 5.0


@dataclass
class Output:
    """What `BackgroundProcess.poll` collected since the previous call."""

    events: List[Dict[str, Any]] = field(default_factory=list)
    lines: List[str] = field(default_factory=list)
    finished: bool = False
    exit_code: Optional[int] = None


def parse_event(line: str) -> Optional[Dict[str, Any]]:
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

    def __init__(
        self, args: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None, stdin: bool = False
    ) -> None:
        self.args = list(args)
        options: Dict[str, Any] = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            options["start_new_session"] = True
        self.process = subprocess.Popen(
            self.args,
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **options,
        )
        self._queue: "queue.Queue[Tuple[str, Optional[str]]]" = queue.Queue()
        self._open_streams = 2
        self._watchdog: Optional[threading.Timer] = None
        self._finished_reported = False
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True, name=f"jointregseg-{name}").start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        """True until `poll` has reported the end (process exited and its output read)."""
        return not self._finished_reported

    @property
    def cancelling(self) -> bool:
        return self._watchdog is not None

    def send(self, line: str) -> None:
        """Write one line to the process's stdin (started with ``stdin=True``) and close it: the process gets no more."""
        if self.process.stdin is None:
            raise ValueError("this process was started without a stdin to write to")
        self.process.stdin.write(line + "\n")
        self.process.stdin.close()

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
        if self._open_streams == 0 and self.process.poll() is not None and not self._finished_reported:
            self._finished_reported = True
            output.finished = True
            output.exit_code = self.process.returncode
            if self._watchdog is not None:
                self._watchdog.cancel()
        return output

    def cancel(self, grace: float = GRACE_SECONDS) -> None:
        """Ask the whole tree to stop now; it is killed after ``grace`` seconds if any of it is still there."""
        if self._watchdog is not None or self._finished_reported:
            return
        self._watchdog = threading.Timer(grace, kill_process_group, args=(self.process.pid, True))
        self._watchdog.daemon = True
        self._watchdog.start()
        kill_process_group(self.process.pid, force=False)

    def stop(self, timeout: float = GRACE_SECONDS + 5.0) -> None:
        """Stop the tree and wait until the process has exited (for clean-up on close and exit)."""
        self.cancel(grace=min(GRACE_SECONDS, timeout / 2))
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_group(self.process.pid, force=True)
            self.process.wait(timeout=timeout)

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> Output:
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
    """Stop the process group (POSIX: SIGTERM, or SIGKILL with ``force``) or process tree (Windows) led by ``pid``.

    On POSIX the whole group is signalled even when its leader already exited: a grandchild may
    still run (and may ignore SIGTERM).
    """
    if os.name == "nt":
        subprocess.run(
            ["taskkill", "/PID", str(pid), "/T", "/F"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
        )
        return
    try:
        os.killpg(pid, signal.SIGKILL if force else signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
