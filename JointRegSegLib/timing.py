"""Where the seconds of one call go: named steps timed by one stopwatch (the call profile).

Each method times its own steps under the names below, so the worker's provenance and the call
profile (`experiments.call_profile`) break every method's call down the same way:

- ``network grid``: the images (and label maps) resampled onto the network grid and normalised;
- ``weights``: the network built and its weights read and checked;
- ``affine stage``: an affine fitted by optimisation (tto, hof, segreg; segreg's includes pre-aligning
  the moving image and label map on its fine grid);
- ``regions``: segreg's region plan and crops;
- ``network``: the forward passes;
- ``test-time optimisation``, ``refinement`` (tto), ``optimisation`` (segreg's iterative variant);
- ``field to fixed grid``: the whole mapping composed and sampled at the fixed image's voxels;
- ``warping``: the moving image and its label map warped at their full resolution;
- ``segmentation``, ``segmentation scores``, ``brain mask``: the method's own segmentations (and jers'
  mask) brought onto the images' grids, and uresnet's scores of them.

The worker adds ``start-up`` (the interpreter and imports, before the job starts), ``reading``,
the evaluation's steps (``evaluation: ...``) and the writing's (``writing: ...``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    """Seconds spent in named steps (a step timed twice adds up), in the order they first ran: wall-clock
    ``seconds`` and ``cpu_seconds``, the CPU time of the whole process (all its threads) meanwhile,
    which a busy machine changes much less than the wall-clock time. Steps timed on two threads at
    once (the worker's background writing) both count the CPU time of that while."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._lock = threading.Lock()  # steps may be timed on a background thread too

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block under ``name``."""
        tick, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - tick, time.process_time() - cpu)

    def add(self, name: str, seconds: float, cpu_seconds: float | None = None) -> None:
        """Count ``seconds`` (and ``cpu_seconds``, where known) more for ``name``."""
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)
            if cpu_seconds is not None:
                self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + float(cpu_seconds)


def process_age() -> float | None:
    """Seconds since this process started, from /proc (Linux); None where there is no /proc."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
