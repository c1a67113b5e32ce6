"""What a failed run tells the user: one line that says what went wrong and what to change.

Shared by the worker (its ``error`` event) and the command line (its ``error:`` line).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError, WeightsError

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1

_OOM_SIGNS = ("out of memory", "can't allocate memory", "failed to allocate memory", "bad_alloc", "unable to allocate")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50, "EiB": 2**60}
_AMOUNTS = (
    re.compile(r"allocate (\d+) bytes"),  # torch on the CPU
    re.compile(r"allocate ([\d.]+) ?(B|KiB|MiB|GiB|TiB|PiB|EiB)"),  # torch on a GPU, numpy
    re.compile(r"needs ([\d.]+) ?(B|KiB|MiB|GiB|TiB|PiB|EiB)"),  # our reader (imageio.io)
)


@dataclass(frozen=True)
class Failure:
    """A failure as the user sees it: one-line message, kind (the error event's ``kind``) and exit code."""

    message: str
    kind: str
    exit_code: int


def describe_failure(error: BaseException, stage: str = "") -> Failure:
    """The user's view of ``error``, raised while the run was at ``stage``."""
    if isinstance(error, (InputError, WeightsError)):
        return Failure(_one_line(str(error)), type(error).__name__, EXIT_BAD_INPUT)
    memory = out_of_memory_message(error, stage)
    if memory is not None:
        return Failure(memory, "out_of_memory", EXIT_BAD_INPUT)
    detail = _one_line(str(error)) or "no details"
    return Failure(
        f"unexpected {type(error).__name__}{' while ' + stage if stage else ''}: {detail}. Please report it with the log.",
        "internal",
        EXIT_INTERNAL,
    )


def out_of_memory_message(error: BaseException, stage: str = "") -> str | None:
    """A one-line message for running out of memory (CPU or GPU; torch, numpy, ITK), else None."""
    text = str(error)
    if not isinstance(error, MemoryError) and not any(sign in text.lower() for sign in _OOM_SIGNS):
        return None
    gpu = "cuda" in text.lower() or "gpu" in text.lower() or type(error).__name__ == "OutOfMemoryError"
    needed = needed_bytes(text)
    amount = f" (an allocation of {needed / 2**30:.2f} GiB failed)" if needed else ""
    where = f" while {stage}" if stage else ""
    if gpu:
        advice = (
            "Run again on the CPU (--device cpu; slower, uses main memory), close other programs using the GPU, "
            "or use a coarser network grid (a larger 'spacing' option)."
        )
    else:
        advice = (
            "Use a coarser network grid (a larger 'spacing' option), close other programs, or use a machine with "
            "more memory."
        )
    return f"ran out of {'GPU ' if gpu else ''}memory{where}{amount}. {advice}"


def needed_bytes(text: str) -> int | None:
    """The allocation an out-of-memory message reports, in bytes (None when it names none)."""
    for pattern in _AMOUNTS:
        match = pattern.search(text)
        if match:
            value = float(match.group(1))
            return int(value * (_UNITS[match.group(2)] if match.lastindex and match.lastindex > 1 else 1))
    return None


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
