"""Where each training iteration's time goes: data generation against the network step (`jointregseg train throughput`).

For every network of `all.SCHEDULE`, on one thread: the trainer is built (bank entries, validation
set), one iteration warms up, then ``iterations`` iterations are timed, each split into making the
batch (``batch``: bank maps deformed and rendered on the network grid) and the network step
(forward, loss, backward, optimiser). Both clocks are reported: process CPU seconds (what the work
costs, nearly independent of other jobs on a shared machine) and wall seconds. ``workers`` > 0 makes
the batches in DataLoader worker processes instead (`loop.fit`'s ``workers`` setting), so the wall
time of the data part is only the wait for the next batch.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..nets.layout import fast_layout
from . import make_trainer
from .all import SCHEDULE, label
from .loop import _batches


def measure(name: str, settings: dict[str, Any], iterations: int, workers: int = 0, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Seconds per iteration (CPU and wall) of data and step for one schedule entry."""
    config = {**(options or {}), **settings, "iterations": iterations + 1, "threads": 1, "workers": workers, "resume": False}
    tick = time.perf_counter()
    trainer = make_trainer(name, config)
    setup = time.perf_counter() - tick
    for module in trainer.modules().values():
        fast_layout(module, trainer.device).train()
    batches = _batches(trainer, 0)
    rows = []
    for n in range(iterations + 1):
        c0, w0 = time.process_time(), time.perf_counter()
        batch = next(batches)
        c1, w1 = time.process_time(), time.perf_counter()
        trainer.step(batch, n)
        c2, w2 = time.process_time(), time.perf_counter()
        if n:
            rows.append((c1 - c0, c2 - c1, w1 - w0, w2 - w1))
    data_cpu, step_cpu, data_wall, step_wall = (sum(r[k] for r in rows) / len(rows) for k in range(4))
    return {
        "network": label(name, settings), "batch": trainer.cfg.batch_size, "setup_s": round(setup, 1),
        "cpu_s_per_iteration": round(data_cpu + step_cpu, 3), "cpu_step_share": round(step_cpu / (data_cpu + step_cpu), 3),
        "data_cpu_s": round(data_cpu, 3), "step_cpu_s": round(step_cpu, 3),
        "wall_s_per_iteration": round(data_wall + step_wall, 3), "wall_step_share": round(step_wall / (data_wall + step_wall), 3),
        "pairs_per_cpu_s": round(trainer.cfg.batch_size / (data_cpu + step_cpu), 3),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The measurements as a Markdown table."""
    lines = [
        "| network | batch | CPU s / iteration | data (CPU s) | step (CPU s) | step share (CPU) | wall s / iteration | step share (wall) | samples / CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['network']} | {r['batch']} | {r['cpu_s_per_iteration']:.2f} | {r['data_cpu_s']:.2f} | {r['step_cpu_s']:.2f} | "
            f"{r['cpu_step_share']:.0%} | {r['wall_s_per_iteration']:.2f} | {r['wall_step_share']:.0%} | {r['pairs_per_cpu_s']:.2f} |"
        )
    return "\n".join(lines)


def run(iterations: int = 5, workers: int = 0, only: list[str] | None = None) -> list[dict[str, Any]]:
    """`measure` every schedule entry (or those whose label starts with one of ``only``)."""
    torch.set_num_threads(1)
    return [
        measure(name, settings, iterations, workers)
        for name, settings, _ in SCHEDULE
        if not only or any(label(name, settings).startswith(o) for o in only)
    ]
