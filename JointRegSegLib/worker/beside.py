"""Work done in a child process beside the run's own: the pictures, drawn while the metrics are computed.

Drawing the pictures (matplotlib, holding the GIL) and computing the metrics (numpy, HD95's search)
are independent once the quality maps exist; in one process they run one after the other, in a
thread they take turns at the GIL. A `ForkedChild` forks its child process when it is made, as early as the
caller can (the command line: before torch is imported, while the process is small and one core
idles during the imports); the child runs its ``warm_up`` at once (matplotlib's imports) and then
waits. `submit` sends it the work later, pickled (a module-level function and its arguments, e.g.
the pictures' slices, `report.rows`) through a pipe, its length first (a child forked later holds the pipe
open too); its return value, or its exception, comes back pickled through another. Nothing of the run's later memory is shared, so the run's writes
cost no copy-on-write page faults, and forking a small process costs little.

Only on Linux, where ``fork`` is the platform's own way of starting processes; elsewhere (Windows
has no fork; macOS's system libraries are not fork-safe) the work runs in the run's process when
its result is asked for. The child runs nothing but the work and leaves with ``os._exit``: no
atexit handler, no buffered output of the parent's is flushed twice; when the pipe closes without
work (the run failed, or drew nothing) it leaves at once. The work must not use torch (its OpenMP
threads do not survive a fork). The child is in the run's process group, and SIGTERM and SIGINT,
which the worker blocks in favour of its cancel thread (`__main__`), end it at once; and it is killed when the
run's process ends (``PR_SET_PDEATHSIG``), so a cancelled run's pictures are not drawn into the folder its
cancel removed.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import threading
import warnings
from collections.abc import Callable
from contextlib import suppress
from typing import Any

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def can_fork() -> bool:
    """Whether work may be forked off here (Linux)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


class ForkedChild:
    """A child forked now (`can_fork`) that runs ``warm_up()`` and then the work `submit` sends it; elsewhere the
    work runs in this process when `result` is first asked for."""

    def __init__(self, warm_up: Callable[[], Any] | None = None) -> None:
        self._pid: int | None = None
        self._requests: int | None = None
        self._replies: int | None = None
        self._work: tuple[Callable[..., Any], tuple[Any, ...]] | None = None
        self._sending: threading.Thread | None = None
        if can_fork():
            self._start(warm_up)

    def _start(self, warm_up: Callable[[], Any] | None) -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        requests, replies = os.pipe(), os.pipe()
        parent = os.getpid()
        with warnings.catch_warnings():  # Python >= 3.12 warns of forking a threaded process: the child runs its work alone
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            _die_with(parent)
            os.close(requests[1])
            os.close(replies[0])
            _child(warm_up, requests[0], replies[1])
        os.close(requests[0])
        os.close(replies[1])
        self._pid, self._requests, self._replies = pid, requests[1], replies[0]

    def submit(self, work: Callable[..., Any], *args: Any) -> None:
        """Have the child run ``work(*args)`` (both pickled; sent on a thread, so a child still warming up does
        not hold the caller up)."""
        if self._work is not None:
            raise RuntimeError("a ForkedChild runs one piece of work")
        self._work = (work, args)
        if self._pid is None:
            return
        request = pickle.dumps(self._work, protocol=pickle.HIGHEST_PROTOCOL)
        request = struct.pack("<Q", len(request)) + request  # its length first: another child forked later may
        # hold this pipe open too, so the end of the request is not where the pipe ends
        requests, self._requests = self._requests, None
        self._sending = threading.Thread(target=_send, args=(requests, request), name="jointregseg-beside", daemon=True)
        self._sending.start()

    def result(self) -> Any:
        """What the work returned; raises what it raised (or `ChildFailed` when the child ended without an answer)."""
        if self._work is None:
            raise RuntimeError("nothing was submitted")
        if self._pid is None:
            work, args = self._work
            return work(*args)
        with os.fdopen(self._replies, "rb") as pipe:
            self._replies = None
            answer = pipe.read()
        self._sending.join()
        status = self._reap()
        if not answer:
            raise ChildFailed(f"the process drawing them ended without an answer ({_describe(status)})")
        ok, value = pickle.loads(answer)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop the child if it still runs (the run failed, was cancelled, or asked for no result)."""
        for pipe in (self._requests, self._replies):
            if pipe is not None:
                os.close(pipe)
        self._requests = self._replies = None
        if self._pid is not None:
            with suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            self._reap()

    def _reap(self) -> int:
        pid, self._pid = self._pid, None
        return os.waitpid(pid, 0)[1] if pid is not None else 0


class ChildFailed(RuntimeError):
    """The forked child ended (killed, out of memory) without sending its result."""


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent: int) -> None:
    """In the forked child: be killed when ``parent`` (the thread that forked, on Linux) ends; leave now if it has."""
    import ctypes  # here: the command line's --help needs none of it

    with suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:
        os._exit(0)


def _send(pipe: int, data: bytes) -> None:
    """Write ``data`` into ``pipe`` and close it (a child that died meanwhile: its missing answer tells)."""
    with suppress(BrokenPipeError), os.fdopen(pipe, "wb") as stream:
        stream.write(data)


def _child(warm_up: Callable[[], Any] | None, requests: int, replies: int) -> None:
    """In the forked child: warm up, wait for the work, run it, send ``(True, value)`` or ``(False, exception)``,
    leave at once (also when the pipe closes without work)."""
    try:
        for sig in _STOP_SIGNALS:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except ValueError:  # forked from a thread other than the main one: the blocking below still goes
                pass
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set(_STOP_SIGNALS))
        if warm_up is not None:
            with suppress(Exception):  # a failing import fails the work itself, which reports it
                warm_up()
        with os.fdopen(requests, "rb") as pipe:
            header = pipe.read(8)
            if len(header) < 8:  # closed without work
                return
            request = pipe.read(struct.unpack("<Q", header)[0])
        try:
            work, args = pickle.loads(request)
            outcome: tuple[bool, Any] = (True, work(*args))
        except BaseException as error:  # sent to the parent, which raises it
            outcome = (False, error)
        try:
            answer = pickle.dumps(outcome)
        except Exception:  # an exception (or value) that does not pickle: its text
            answer = pickle.dumps((False, RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}")))
        with os.fdopen(replies, "wb") as pipe:
            pipe.write(answer)
    finally:
        os._exit(0)
