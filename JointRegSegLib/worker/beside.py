"""Work done in a forked child process beside the run's own: the pictures, drawn while the metrics are computed.

Drawing the pictures (matplotlib, holding the GIL) and computing the metrics (numpy, HD95's search)
are independent once the quality maps exist; in one process they run one after the other, in a
thread they take turns at the GIL. A child forked from the run has every array already in memory
(copy-on-write, nothing is pickled on the way in) and draws on the other CPU core; only its return
value (the pictures' file names) or its exception comes back, pickled through a pipe.

Only on Linux, where ``fork`` is the platform's own way of starting processes; elsewhere (Windows
has no fork; macOS's system libraries are not fork-safe) the work runs in the run's process when
its result is asked for. The child runs nothing but the work and leaves with ``os._exit``: no
atexit handler, no buffered output of the parent's is flushed twice. The work must not use torch
(its OpenMP threads do not survive a fork) or take locks other threads of the run may hold; the
pictures need numpy, matplotlib and PIL alone. The child is in the run's process group, and SIGTERM
and SIGINT, which the worker blocks in favour of its cancel thread (`__main__`), end it at once.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def can_fork() -> bool:
    """Whether work may be forked off here (Linux)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


class Beside:
    """``work()`` started in a forked child (`can_fork`), else run when `result` is first asked for."""

    def __init__(self, work: Callable[[], Any]) -> None:
        self._work = work
        self._pid: int | None = None
        self._pipe: int | None = None
        if can_fork():
            self._start()

    def _start(self) -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        read, write = os.pipe()
        with warnings.catch_warnings():  # Python >= 3.12 warns of forking a threaded process: the child runs `work` alone
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            os.close(read)
            _child(self._work, write)
        os.close(write)
        self._pid, self._pipe = pid, read

    def result(self) -> Any:
        """What ``work()`` returned; raises what it raised (or `ChildFailed` when the child ended without an answer)."""
        if self._pid is None:
            return self._work()
        with os.fdopen(self._pipe, "rb") as pipe:
            self._pipe = None
            answer = pipe.read()
        status = self._reap()
        if not answer:
            raise ChildFailed(f"the process drawing them ended without an answer ({_describe(status)})")
        ok, value = pickle.loads(answer)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop the child if it still runs (the run failed or was cancelled before asking for the result)."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        if self._pid is not None:
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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


def _child(work: Callable[[], Any], write: int) -> None:
    """In the forked child: run ``work``, send ``(True, value)`` or ``(False, exception)``, leave at once."""
    try:
        for sig in _STOP_SIGNALS:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except ValueError:  # forked from a thread other than the main one: the blocking below still goes
                pass
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set(_STOP_SIGNALS))
        try:
            outcome: tuple[bool, Any] = (True, work())
        except BaseException as error:  # sent to the parent, which raises it
            outcome = (False, error)
        try:
            answer = pickle.dumps(outcome)
        except Exception:  # an exception (or value) that does not pickle: its text
            answer = pickle.dumps((False, RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}")))
        with os.fdopen(write, "wb") as pipe:
            pipe.write(answer)
    finally:
        os._exit(0)
