"""Ending a finished process at once, without the interpreter's tear-down.

After a registration the interpreter's normal exit frees every module, tensor and thread pool one by
one: 0.5-0.7 s of a 7-9 s ``jointregseg register`` on the benchmark pair (2 cores), time the user (and
the Slicer module, which loads the results only once the worker has exited) waits for nothing. Once
the work is done and its files are closed, `exit_now` flushes the standard streams and ends the
process with ``os._exit``. Where another non-daemon thread still runs (it may be writing something),
the normal exit waits for it as usual.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Flush stdout and stderr and end the process with ``code``, skipping the interpreter's tear-down."""
    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate() if thread is not threading.main_thread()):
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
                pass
    os._exit(code)
