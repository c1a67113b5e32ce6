"""``python -m JointRegSegLib.worker JOB.json``: run one job, streaming JSON events on stdout.

``python -m JointRegSegLib.worker --wait``: a worker started ahead of its job (the controller keeps one
ready while the user chooses the inputs): it loads everything a job needs (torch, the methods; about
2 s), says ``ready``, then reads the job file's path from one line of stdin and runs it as above; at
the end of stdin without a path (the controller or Slicer gone) it exits with 0 and does nothing.
The job's start-up time is then the imports' time, not the time spent waiting.

Exit codes: 0 success (a failed evaluation or picture step is reported in the ``result`` event's
``failed_steps``), 2 a problem the user can act on (inputs, options, weights, output folder, full
disk, memory; the ``error`` event says what to do), 1 an unexpected internal error, 143 cancelled
by SIGTERM, 130 by SIGINT (Ctrl-C).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from ..allocator import keep_freed_memory
from ..errors import InputError
from ..openmp import sleeping_threads
from ..quick_exit import exit_now
from ..timing import process_age
from .beside import ForkedChild
from .events import EventWriter
from .failures import EXIT_BAD_INPUT, describe_failure
from .job import parse_job
from .pictures import warm_up

EXIT_CANCELLED = 143
EXIT_INTERRUPTED = 130
_EXIT_ON = {signal.SIGTERM: EXIT_CANCELLED, signal.SIGINT: EXIT_INTERRUPTED}


def install_cancel_handler(events: EventWriter) -> None:
    """SIGTERM and SIGINT cancel at once: a dedicated thread waits for them, removes the staging folder, exits.

    Waiting in a thread (with the signals blocked elsewhere) answers within milliseconds even while the
    main thread is inside a long torch or SimpleITK call, where a Python signal handler would wait, and
    no KeyboardInterrupt traceback ever reaches the user. Call it before numpy, torch or ITK start
    threads of their own (they inherit the blocked signals); should one still receive a signal, the
    Python handler hands the cancel to a new thread (the interrupted main thread may hold the event
    stream's lock).
    """
    for sig in _EXIT_ON:
        signal.signal(sig, lambda number, _frame: threading.Thread(target=_cancel, args=(events, signal.Signals(number))).start())
    if not hasattr(signal, "pthread_sigmask"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, set(_EXIT_ON))

    def wait() -> None:
        _cancel(events, signal.Signals(signal.sigwait(set(_EXIT_ON))))

    threading.Thread(target=wait, name="cancel", daemon=True).start()


_CANCELLING = threading.Lock()


def _cancel(events: EventWriter, sig: signal.Signals) -> None:
    if not _CANCELLING.acquire(blocking=False):
        return
    from .staging import ACTIVE, cancel_outcome

    for staging in list(ACTIVE):
        staging.discard()
    events.emit("error", message=f"cancelled by the user ({sig.name}); {cancel_outcome()}.", kind="cancelled")
    os._exit(_EXIT_ON[sig])


def main(argv: list[str] | None = None) -> int:
    """Run the job file named on the command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    events = EventWriter(sys.stdout)
    sys.stdout = sys.stderr  # anything printed by libraries must not corrupt the event stream
    install_cancel_handler(events)
    keep_freed_memory()
    sleeping_threads()
    try:
        if len(argv) != 1:
            raise InputError("usage: python -m JointRegSegLib.worker JOB.json | --wait")
        startup = None
        if argv[0] == "--wait":
            startup = prepare()
            events.emit("ready", startup_s=startup)
            line = sys.stdin.readline().strip()
            if not line:
                return 0
            events.begin()
            argv = [line]
        path = Path(argv[0])
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"cannot read the job file {path}: {getattr(error, 'strerror', None) or error}.") from error
        job = parse_job(text, source=f"job file {path}")
        painter = ForkedChild(warm_up) if job.pictures else None  # before the imports, where none were made (`beside`)
        try:
            from .run import run_job

            run_job(job, events, startup=startup, painter=painter)
        finally:
            if painter is not None:
                painter.close()
        return 0
    except Exception as error:
        failure = describe_failure(error, events.stage)
        extra = {"traceback": traceback.format_exc()} if failure.kind == "internal" else {}
        events.emit("error", message=failure.message, kind=failure.kind, **extra)
        return failure.exit_code


def prepare() -> float | None:
    """Import what every job needs (the run, torch, each method's module); the seconds since the process started."""
    from ..methods import get_method, method_names
    from .run import run_job  # noqa: F401  (torch, numpy, SimpleITK, the evaluation)

    for name in method_names():
        get_method(name)
    return process_age()


if __name__ == "__main__":
    exit_now(main())


__all__ = ["EXIT_BAD_INPUT", "EXIT_CANCELLED", "EXIT_INTERRUPTED", "main"]  # the exit codes batch reads
