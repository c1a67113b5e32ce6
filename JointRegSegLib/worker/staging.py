"""Whole-or-nothing outputs, and the rule for writing into an output folder that already exists.

The rule (README "Output folders"):

- A run writes into a staging folder and moves the finished files into place at the end, so a run
  that fails, is cancelled or is killed leaves nothing partial (a janitor process removes the
  staging folder of a killed run).
- A folder that does not exist is created whole (the staging folder renamed into place).
- An existing folder holding only what JointRegSeg wrote there (the files listed in its
  ``result.json``) or nothing is updated: the new files replace the old ones, old files of ours
  that this run does not write are removed. The folder itself (its permissions, anything else
  about it) is kept.
- A folder holding anything else is refused, with nothing changed, unless ``overwrite`` is set;
  then only JointRegSeg's own files (listed in ``result.json``) are replaced and everything else
  is kept. A file of the user's with the name of one of our outputs is refused even then.
- An input file inside the output folder is refused (a run could replace it).
- One run at a time per folder (`lock.FolderLock`): a second run into the same folder fails at once.

Updating an existing folder moves file by file; ``result.json`` is removed first and written last,
and ``.jointregseg-commit.json`` lists every file of ours meanwhile, so a folder caught half-way
(power cut) has no ``result.json`` (it does not load as a result) and a later run still knows
which files are ours.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from ..errors import OutputError
from ..imageio.io import file_kind, write_error
from .lock import FolderLock, lock_path

PROVENANCE = "provenance.json"
MANIFEST = "result.json"
"""The list of a run's files ({kind: path in the folder}): what an output folder holds of ours."""
JOURNAL = ".jointregseg-commit.json"
PARTIAL = ".jointregseg-partial-"

_JANITOR = (
    "import os, shutil, sys, time\n"
    "sys.stdin.buffer.read()\n"
    "for _ in range(50):\n"
    "    shutil.rmtree(sys.argv[1], ignore_errors=True)\n"
    "    if not os.path.exists(sys.argv[1]):\n"
    "        break\n"
    "    time.sleep(0.1)\n"
    "try:\n"
    "    import fcntl\n"
    "except ImportError:\n"
    "    sys.exit()\n"
    "for _ in range(100):\n"
    "    try:\n"
    "        fd = os.open(sys.argv[2], os.O_RDWR)\n"
    "    except OSError:\n"
    "        break\n"
    "    try:\n"
    "        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "    except OSError:\n"
    "        os.close(fd)\n"
    "        time.sleep(0.1)\n"
    "        continue\n"
    "    mine, disk = os.fstat(fd), os.stat(sys.argv[2])\n"
    "    if (mine.st_dev, mine.st_ino) == (disk.st_dev, disk.st_ino):\n"
    "        os.unlink(sys.argv[2])\n"
    "    os.close(fd)\n"
    "    break\n"
)
"""Run beside each worker: when the worker's end of the pipe closes (the worker died, even by SIGKILL)
it removes the staging folder, then the lock file once the lock is free (the kernel may wake this
process before it has released a killed worker's lock; a new run's lock is never taken away)."""

ACTIVE: list["Staging"] = []
"""Staging folders of runs in progress in this process (the cancel handler discards them)."""
FINISHED: list[Path] = []
"""Output folders this process has committed (what a late cancel reports as written)."""


def cancel_outcome() -> str:
    """What a cancel leaves, in the user's words: no output, or the folder already written."""
    return f"the results were already written to {FINISHED[-1]}" if FINISHED else "no output was written"


def resolve_output(output: Path) -> Path:
    """The absolute output folder, or OutputError when it cannot be one (a file, a device, a link loop)."""
    try:
        resolved = output.expanduser().resolve()
    except (OSError, RuntimeError):
        raise OutputError(f"the output folder '{output}' is a symbolic link loop; choose another output folder.") from None
    parent = resolved.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write results: the folder {parent} does not exist. Create it or choose another output folder.")
    try:
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        return resolved
    except OSError as error:
        raise OutputError(f"cannot use the output folder {resolved}: {error.strerror}. Choose another output folder.") from None
    kind = file_kind(mode)
    if kind == "a folder":
        return resolved
    raise OutputError(
        f"the output folder {resolved} is {kind or 'a file'}, not a folder. Give the path of a folder (it is created "
        "when missing)."
    )


def check_inputs_outside(output: Path, inputs: dict[str, Path]) -> None:
    """No input file lies inside the output folder (a run could replace it)."""
    for label, path in inputs.items():
        try:
            inside = Path(path).expanduser().resolve().is_relative_to(output)
        except (OSError, RuntimeError):
            continue  # an unreadable path is reported when it is read
        if inside:
            raise OutputError(
                f"the {label} '{path}' lies inside the output folder {output}, where this run writes; copy it elsewhere "
                "or choose another output folder."
            )


def own_files(folder: Path) -> set[str]:
    """Relative paths (POSIX) of what JointRegSeg wrote into ``folder``: its result.json and what that lists."""
    names = {MANIFEST, JOURNAL}
    for listing in (MANIFEST, JOURNAL):
        try:
            data = json.loads((folder / listing).read_text())
        except (OSError, ValueError):
            continue
        entries = data.values() if isinstance(data, dict) else data if isinstance(data, list) else []
        names.update(name for name in entries if _safe_relative(name))
    return names


def _safe_relative(name: object) -> bool:
    if not isinstance(name, str) or not name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and "\\" not in name and str(path) == name


def foreign_entries(folder: Path) -> list[str]:
    """What ``folder`` holds that JointRegSeg did not write: files not in `own_files`, links, empty folders.

    Staging folders of earlier runs (``.jointregseg-partial-*``) count as ours.
    """
    ours = own_files(folder)
    our_folders = {parent.as_posix() for name in ours for parent in PurePosixPath(name).parents}
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        for name in list(dirs):
            relative = (base / name).as_posix()
            if base == Path(".") and name.startswith(PARTIAL):
                dirs.remove(name)
            elif (Path(root) / name).is_symlink():
                dirs.remove(name)
                found.append(relative)
        found += [(base / name).as_posix() for name in files if (base / name).as_posix() not in ours]
        if not dirs and not files and base != Path(".") and base.as_posix() not in our_folders:
            found.append(base.as_posix() + "/")
    return sorted(found)


def _files_below(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def _listing(entries: list[str], most: int = 3) -> str:
    shown = ", ".join(entries[:most])
    return shown + (f" and {len(entries) - most} more" if len(entries) > most else "")


class Staging:
    """A staging folder for ``output`` (checked against the rule in the module docstring) that `commit` moves into place."""

    def __init__(
        self, output: Path, inputs: dict[str, Path] | None = None, overwrite: bool = False, reserved: tuple[str, ...] = ()
    ) -> None:
        """``inputs`` by what they are (for the message); ``reserved``: names the run will write (checked at once)."""
        self.output = resolve_output(output)
        check_inputs_outside(self.output, inputs or {})
        self.overwrite = overwrite
        self.committed = False
        self._mutex = threading.Lock()
        self._lock = FolderLock(self.output).acquire()
        try:
            if self.output.exists():
                foreign = foreign_entries(self.output)
                if foreign and not overwrite:
                    raise OutputError(
                        f"{self.output} already holds files JointRegSeg did not write ({_listing(foreign)}); nothing was "
                        "changed. Choose a new output folder, or give --overwrite to replace only JointRegSeg's own files "
                        "there (the others are kept)."
                    )
                check_free(self.output, reserved)
                self.path = self.output / f"{PARTIAL}{secrets.token_hex(4)}"
            else:
                self.path = self.output.parent / f".{self.output.name}.partial-{secrets.token_hex(4)}"
            os.mkdir(self.path)
        except OSError as error:
            self._lock.release()
            raise OutputError(f"cannot write results in {self.output}: {error.strerror}. Choose another output folder.") from error
        except BaseException:
            self._lock.release()
            raise
        self._janitor = subprocess.Popen(
            [sys.executable, "-c", _JANITOR, str(self.path), str(lock_path(self.output))],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        ACTIVE.append(self)

    def commit(self) -> Path:
        """Move the finished files into place (see the module docstring) and return the output folder."""
        with self._mutex:
            try:
                if not self.output.exists():
                    try:
                        os.rename(self.path, self.output)
                    except OSError:
                        if not self.output.exists():  # else it appeared meanwhile: update it like any existing folder
                            raise
                if self.path.exists():
                    self._update_existing()
            except OSError as error:
                raise OutputError(
                    f"could not finish writing {self.output}: {error.strerror}. It has no result.json until a run "
                    "finishes there; run again."
                ) from error
            self.committed = True
            FINISHED.append(self.output)
            self._release()
        return self.output

    def _update_existing(self) -> None:
        out, new = self.output, _files_below(self.path)
        check_free(out, new)
        old = {name for name in own_files(out) if (out / name).exists()}
        journal = self.path / JOURNAL
        try:
            journal.write_text(json.dumps(sorted(old | set(new))))
            os.replace(journal, out / JOURNAL)
        except OSError as error:
            journal.unlink(missing_ok=True)
            raise write_error(out / JOURNAL, error) from error
        (out / MANIFEST).unlink(missing_ok=True)
        for name in new:
            if name != MANIFEST:
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.path / name, out / name)
        for name in sorted(old - set(new) - {MANIFEST, JOURNAL}):
            (out / name).unlink(missing_ok=True)
            _remove_empty_parents(out, name)
        os.replace(self.path / MANIFEST, out / MANIFEST)
        (out / JOURNAL).unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)
        for stale in out.glob(f"{PARTIAL}*"):  # ours, and no other run is writing here (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging folder (failure or cancel); nothing when the run was committed."""
        with self._mutex:
            if self.committed:
                return
            for _ in range(20):
                shutil.rmtree(self.path, ignore_errors=True)
                if not self.path.exists():
                    break
                time.sleep(0.05)
            self._release()

    def _release(self) -> None:
        if self in ACTIVE:
            ACTIVE.remove(self)
        self._lock.release()
        if self._janitor.stdin and not self._janitor.stdin.closed:
            self._janitor.stdin.close()


def check_free(folder: Path, names: Iterable[str]) -> None:
    """None of ``names`` (relative paths) is taken in ``folder`` by something JointRegSeg did not write."""
    ours = own_files(folder)
    taken = [name for name in names if (name not in ours and os.path.lexists(folder / name)) or _blocked(folder, name)]
    if taken:
        raise OutputError(
            f"{folder} holds {_listing(taken)}, not written by JointRegSeg, where this run writes its results; move them "
            "away or choose another output folder. Nothing was changed."
        )


def _blocked(folder: Path, name: str) -> bool:
    """A parent of ``name`` inside ``folder`` exists and is not a folder."""
    return any((folder / parent).exists() and not (folder / parent).is_dir() for parent in PurePosixPath(name).parents if str(parent) != ".")


def _remove_empty_parents(folder: Path, name: str) -> None:
    for parent in PurePosixPath(name).parents:
        if str(parent) == ".":
            return
        try:
            (folder / parent).rmdir()
        except OSError:
            return
