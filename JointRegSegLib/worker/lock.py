"""One run at a time per output folder: an exclusive lock file next to the folder.

The lock is ``.NAME.jointregseg-lock`` in the output folder's parent (the folder itself may not
exist yet, or be replaced). POSIX: ``flock``, released by the kernel when the process dies, and
the file removed by its holder (a new holder checks that the file it locked is still the one on
disk, so removing it never lets two runs in). Windows: ``msvcrt.locking`` on the same file.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OutputError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


def lock_path(output: Path) -> Path:
    """The lock file of an output folder."""
    return output.parent / f".{output.name}.jointregseg-lock"


class FolderLock:
    """The exclusive right to write one output folder (`acquire` raises OutputError when another run holds it)."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = lock_path(output)
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise OutputError(
                    f"cannot write results in {self.output.parent}: {error.strerror}. Choose another output folder."
                ) from error
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputError(
                    f"another JointRegSeg run{holder} is writing to {self.output}; wait until it has finished or "
                    "choose another output folder."
                )
            if fcntl is None or _same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed this file after we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and give up the lock (idempotent)."""
        if self._fd is None:
            return
        if fcntl is not None:
            _unlink(self.path)
            os.close(self._fd)
        else:
            os.close(self._fd)
            _unlink(self.path)
        self._fd = None


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode().strip() if hasattr(os, "pread") else ""
    except OSError:
        return ""
    return f" (process {text})" if text.isdigit() else ""


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
