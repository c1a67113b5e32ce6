"""What every training script shares: where the data is, crash-safe files, loss logs and their curves."""

from __future__ import annotations

import csv
import io
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

History = list[dict[str, float]]
"""One row per logged iteration: ``{"iteration": n, "loss": ..., <term>: ...}``."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temporary sibling renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` that never leaves a half-written file behind."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_history(history: History, path: Path) -> None:
    """The loss log as CSV (columns from the first row); nothing for an empty log."""
    if not history:
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, text.getvalue().encode())


def read_history(path: Path) -> History:
    """A loss log written by `write_history` ([] where there is none)."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def plot_histories(histories: dict[str, History], path: Path, window: int = 25) -> Path | None:
    """One panel per log (titled by its key): every column but ``iteration`` raw (faint) and as a
    ``window``-row running mean, written as a PNG at ``path``; None where every log is empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {title: rows for title, rows in histories.items() if rows}
    if not histories:
        return None
    figure, axes = plt.subplots(1, len(histories), figsize=(6 * len(histories), 4), squeeze=False)
    for axis, (title, rows) in zip(axes[0], histories.items()):
        iterations = np.asarray([row.get("iteration", n) for n, row in enumerate(rows)])
        for key in (k for k in rows[0] if k != "iteration"):
            values = np.asarray([row[key] for row in rows])
            width = min(window, len(values))
            running = np.convolve(values, np.ones(width) / width, mode="valid")
            line = axis.plot(iterations[width - 1:], running, label=key)[0]
            axis.plot(iterations, values, color=line.get_color(), alpha=0.2, linewidth=0.8)
        axis.set_title(title)
        axis.set_xlabel("iteration")
        axis.set_ylabel("loss (lower is better)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def device_name(device: torch.device) -> str:
    """The device as provenance records it: GPU model, or CPU type and thread count."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
