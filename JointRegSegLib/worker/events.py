"""The worker's event stream: one JSON object per line on stdout.

Events: ``progress`` (fraction in [0, 1], never decreasing; stage; seconds_left; elapsed), ``log``
(level, message), ``result`` (output folder, files, metrics) and ``error`` (message, kind).
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import IO, Any


class EventWriter:
    """Writes events as JSON lines and turns stage fractions into one monotonic overall progress."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.start = time.monotonic()
        self.fraction = 0.0
        self._rate: float | None = None
        self._last: tuple[float, float] | None = None
        self._lock = threading.Lock()

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
        now = time.monotonic()
        elapsed = now - self.start
        self.fraction = max(self.fraction, min(1.0, max(0.0, float(fraction))))
        self.emit(
            "progress",
            fraction=round(self.fraction, 4),
            stage=stage,
            seconds_left=self._seconds_left(now),
            elapsed=round(elapsed, 2),
        )

    def _seconds_left(self, now: float) -> float | None:
        """Remaining time from a smoothed rate of progress (fraction per second)."""
        if self._last is not None:
            t0, f0 = self._last
            if now > t0 and self.fraction > f0:
                rate = (self.fraction - f0) / (now - t0)
                self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
        if self._last is None or self.fraction > self._last[1]:
            self._last = (now, self.fraction)
        if self.fraction >= 1.0:
            return 0.0
        if self._rate is None or self._rate <= 0:
            return None
        return round((1.0 - self.fraction) / self._rate, 1)


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
