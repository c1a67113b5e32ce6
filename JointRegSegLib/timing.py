"""Where the seconds of one call go: named steps timed by one stopwatch (the call profile).

Each method times its own steps under the names below, so the worker's provenance and the call
profile (`experiments.call_profile`) break every method's call down the same way:

- ``network grid``: the images (and label maps) resampled onto the network grid and normalised;
- ``weights``: the network built and its weights read and checked;
- ``affine stage``: an affine fitted by optimisation (tto, hof, segreg);
- ``network``: the forward passes;
- ``optimisation``: test-time optimisation and refinement (tto), the iterative variant's fitting (segreg);
- ``field to fixed grid``: the whole mapping composed and sampled at the fixed image's voxels;
- ``warping``: the moving image and its label map warped at their full resolution;
- ``segmentation``: the method's own segmentations brought onto the images' grids;
- anything else a method does under its own name.

The worker adds ``start-up`` (the interpreter and imports, before the job starts), ``reading``,
the evaluation's steps (``evaluation: ...``) and the writing's (``writing: ...``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    """Seconds spent in named steps (a step timed twice adds up), in the order they first ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block under ``name``."""
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - tick)

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` more for ``name``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)


def process_age() -> float | None:
    """Seconds since this process started, from /proc (Linux); None where there is no /proc."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
