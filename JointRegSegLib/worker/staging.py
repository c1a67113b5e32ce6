"""Whole-or-nothing outputs: write into a hidden sibling folder, rename into place at the end.

A run that fails, is cancelled (SIGTERM) or is killed (SIGKILL) never leaves a partial output
folder: failures and SIGTERM remove the staging folder themselves; for a hard kill a small
janitor process, which holds the read end of a pipe from the worker, sees the pipe close when the
worker dies and removes the staging folder if it was not committed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import InputError

PROVENANCE = "provenance.json"

_JANITOR = (
    "import shutil, sys, time\n"
    "sys.stdin.buffer.read()\n"
    "for _ in range(50):\n"
    "    shutil.rmtree(sys.argv[1], ignore_errors=True)\n"
    "    time.sleep(0.1)\n"
)


ACTIVE: list["Staging"] = []
"""Staging folders of runs in progress in this process (the cancel handler discards them)."""


class Staging:
    """A staging folder next to ``output`` that becomes ``output`` on `commit`."""

    def __init__(self, output: Path) -> None:
        self.output = output.resolve()
        parent = self.output.parent
        if not parent.is_dir():
            raise InputError(f"cannot write results: the folder {parent} does not exist. Create it or choose another --out.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"cannot write results: the folder {parent} is not writable. Choose another --out.")
        if self.output.exists() and not _replaceable(self.output):
            raise InputError(
                f"{self.output} already exists and is not an earlier JointRegSeg output folder; "
                "choose a new --out or remove it."
            )
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.partial-", dir=parent))
        except OSError as error:
            raise InputError(f"cannot write results in {parent}: {error.strerror}. Choose another --out.") from error
        self._janitor = subprocess.Popen(
            [sys.executable, "-c", _JANITOR, str(self.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        ACTIVE.append(self)

    def commit(self) -> Path:
        """Move the finished staging folder into place (replacing an earlier output) and return it."""
        previous = None
        if self.output.exists():
            previous = self.path.with_name(f".{self.output.name}.old-{os.getpid()}")
            os.replace(self.output, previous)
        os.replace(self.path, self.output)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        self._release()
        return self.output

    def discard(self) -> None:
        """Remove the staging folder (failure or cancel)."""
        for _ in range(20):
            shutil.rmtree(self.path, ignore_errors=True)
            if not self.path.exists():
                break
            time.sleep(0.05)
        self._release()

    def _release(self) -> None:
        if self in ACTIVE:
            ACTIVE.remove(self)
        if self._janitor.stdin and not self._janitor.stdin.closed:
            self._janitor.stdin.close()


def _replaceable(folder: Path) -> bool:
    """An existing output may be replaced when it is empty or an earlier run's output."""
    return folder.is_dir() and (not any(folder.iterdir()) or (folder / PROVENANCE).exists())
