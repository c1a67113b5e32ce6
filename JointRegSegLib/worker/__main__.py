"""``python -m JointRegSegLib.worker JOB.json``: run one job, streaming JSON events on stdout.

Exit codes: 0 success, 2 a problem with the inputs, options or weights (the `error` event says
what to do), 1 an unexpected internal error, 143 cancelled by SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from ..errors import InputError, WeightsError
from .events import EventWriter
from .job import parse_job
from .staging import ACTIVE

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
EXIT_CANCELLED = 143


def install_cancel_handler(events: EventWriter) -> None:
    """SIGTERM cancels at once: a dedicated thread waits for it, removes the staging folder, exits.

    Waiting in a thread (with SIGTERM blocked elsewhere) answers within milliseconds even while the
    main thread is inside a long torch or SimpleITK call, where a Python signal handler would wait.
    """
    if not hasattr(signal, "pthread_sigmask"):
        signal.signal(signal.SIGTERM, lambda *_: _cancel(events))
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        signal.sigwait({signal.SIGTERM})
        _cancel(events)

    threading.Thread(target=wait, name="cancel", daemon=True).start()


def _cancel(events: EventWriter) -> None:
    for staging in list(ACTIVE):
        staging.discard()
    events.emit("error", message="cancelled by the user; no output was written.", kind="cancelled")
    os._exit(EXIT_CANCELLED)


def main(argv: list[str] | None = None) -> int:
    """Run the job file named on the command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    events = EventWriter(sys.stdout)
    sys.stdout = sys.stderr  # anything printed by libraries must not corrupt the event stream
    install_cancel_handler(events)
    try:
        if len(argv) != 1:
            raise InputError("usage: python -m JointRegSegLib.worker JOB.json")
        path = Path(argv[0])
        try:
            text = path.read_text()
        except OSError as error:
            raise InputError(f"cannot read the job file {path}: {error.strerror}.") from error
        job = parse_job(text, source=f"job file {path}")
        from .run import run_job

        run_job(job, events)
        return 0
    except (InputError, WeightsError) as error:
        events.emit("error", message=str(error), kind=type(error).__name__)
        return EXIT_BAD_INPUT
    except Exception as error:
        message = out_of_memory_message(error) or f"unexpected {type(error).__name__}: {error}. Please report it with the log."
        events.emit("error", message=message, kind="internal", traceback=traceback.format_exc())
        return EXIT_BAD_INPUT if out_of_memory_message(error) else EXIT_INTERNAL


def out_of_memory_message(error: BaseException) -> str | None:
    """A user-facing message for running out of (GPU) memory, else None."""
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return (
            "ran out of memory. On a GPU, run again with device 'cpu' (slower, uses main memory), close "
            "other programs using the GPU, or lower the method's resolution/iterations."
        )
    return None


if __name__ == "__main__":
    sys.exit(main())
