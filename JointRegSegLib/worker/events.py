"""The worker's event stream: one JSON object per line on stdout.

Events: ``progress`` (fraction in [0, 1], never decreasing; stage; seconds_left; elapsed), ``log``
(level, message), ``result`` (output folder, files, metrics) and ``error`` (message, kind).
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import IO, Any, Callable


MIN_FRACTION = 0.01
MIN_ELAPSED_S = 1.0


class EventWriter:
    """Writes events as JSON lines and turns stage fractions into one monotonic overall progress.

    Time left is ``t (1 - f) / f``: the run's average rate so far applied to what remains, ``t`` the
    seconds since the work began (the last progress event at fraction 0, else the writer's start):
    the interpreter's start-up and imports before the job's first event (seconds on a busy machine)
    are no part of the work the fractions measure. Unlike a rate measured over the last steps it
    does not jump when one step is slow (a busy machine, a stage whose share of the bar was guessed
    short), it is exact for a steady rate, it falls to 0 at the end, and once half the work is done
    it never exceeds the time already spent. None until 1 % is done and a second has passed
    (nothing to go on yet). ``elapsed`` in the events counts from the writer's start.
    """

    def __init__(self, stream: IO[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self.start = clock()
        self.work_start = self.start
        self.fraction = 0.0
        self.stage = "starting"
        self._lock = threading.Lock()

    def begin(self) -> None:
        """The job begins now (a worker started ahead of its job has just received it): ``elapsed`` counts from here."""
        self.start = self.work_start = self.clock()

    def emit(self, event: str, **fields: Any) -> None:
        """Write one event line and flush it."""
        line = json.dumps(to_json({"event": event, **fields}), allow_nan=False)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)

    def progress(self, fraction: float, stage: str) -> None:
        """Report overall progress; fractions are clamped so the stream never goes backwards."""
        now = self.clock()
        elapsed = now - self.start
        if self.fraction == 0.0 and float(fraction) <= 0.0:
            self.work_start = now  # the work begins (the job's first event)
        self.fraction = max(self.fraction, min(1.0, max(0.0, float(fraction))))
        self.stage = stage
        self.emit(
            "progress",
            fraction=round(self.fraction, 4),
            stage=stage,
            seconds_left=self.seconds_left(now - self.work_start),
            elapsed=round(elapsed, 2),
        )

    def seconds_left(self, working: float) -> float | None:
        """Time left (seconds) after ``working`` seconds of work at the current fraction (see the class docstring)."""
        if self.fraction >= 1.0:
            return 0.0
        if self.fraction < MIN_FRACTION or working < MIN_ELAPSED_S:
            return None
        return round(working * (1.0 - self.fraction) / self.fraction, 1)


def to_json(value: Any) -> Any:
    """A JSON-ready copy: numpy scalars and arrays to Python, paths to str, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if hasattr(value, "tolist"):
        return to_json(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
