"""What every training script shares: where the data is, crash-safe files, loss logs and their curves."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from ..device import resolve_device
from ..errors import InputError
from ..weights import weights_dir

Config = TypeVar("Config")

History = list[dict[str, Any]]
"""One row per logged iteration: ``{"iteration": n, "loss": ..., <term>: ...}`` (numbers, and
strings for non-numeric columns such as a stage name)."""


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
    """The loss log as CSV (columns in order of first appearance; a row without a column leaves
    its cell empty); nothing for an empty log."""
    if not history:
        return
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, text.getvalue().encode())


def _parse(text: Any) -> Any:
    """A CSV cell as written by `write_history`: int, else float, else the text itself."""
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_history(path: Path) -> History:
    """A loss log written by `write_history` ([] where there is none): numbers as int or float,
    other cells (a stage name, an empty cell) as strings, so a log reads back as it was written."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (training runs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_running_mean(axis: Any, iterations: np.ndarray, values: np.ndarray, label: str, window: int = 25, raw: bool = True) -> None:
    """``values`` against ``iterations`` on ``axis`` as a ``window``-point running mean and, with
    ``raw``, the raw values faintly in the same colour."""
    width = min(window, len(values))
    running = np.convolve(values, np.ones(width) / width, mode="valid")
    line = axis.plot(iterations[width - 1:], running, label=label)[0]
    if raw:
        axis.plot(iterations, values, color=line.get_color(), alpha=0.2, linewidth=0.8)


def save_figure(figure: Any, path: Path, dpi: int = 100) -> Path:
    """Lay ``figure`` out, write it as a PNG at ``path`` (whole or not at all) and close it."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_histories(histories: dict[str, History], path: Path, window: int = 25) -> Path | None:
    """One panel per log (titled by its key): every column but ``iteration`` raw (faint) and as a
    ``window``-row running mean, written as a PNG at ``path``; None where every log is empty."""
    plt = pyplot()
    histories = {title: rows for title, rows in histories.items() if rows}
    if not histories:
        return None
    figure, axes = plt.subplots(1, len(histories), figsize=(6 * len(histories), 4), squeeze=False)
    for axis, (title, rows) in zip(axes[0], histories.items()):
        iterations = np.asarray([row.get("iteration", n) for n, row in enumerate(rows)])
        for key in (k for k in rows[0] if k != "iteration"):
            plot_running_mean(axis, iterations, np.asarray([row[key] for row in rows]), key, window)
        axis.set_title(title)
        axis.set_xlabel("iteration")
        axis.set_ylabel("loss (lower is better)")
        axis.grid(alpha=0.3)
        axis.legend()
    return save_figure(figure, path)


def device_name(device: torch.device) -> str:
    """The device as provenance records it: GPU model, or CPU type and thread count."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def config_from_dict(cls: type[Config], config: dict[str, Any], what: str) -> Config:
    """The settings dataclass ``cls`` from a plain dictionary (None values keep their defaults);
    InputError naming ``what`` (e.g. "tto training") for unknown keys."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise InputError(f"unknown {what} setting(s) {unknown}; the settings are {sorted(known)}")
    return cls(**{k: v for k, v in config.items() if v is not None})


def as_shape(value: Any) -> tuple[int, ...]:
    """A training shape from a setting: one number (a cube) or one per axis."""
    shape = tuple(int(s) for s in np.atleast_1d(value))
    return shape * 3 if len(shape) == 1 else shape


def set_integers(config: Any, keys: tuple[str, ...], what: str = "training setting") -> None:
    """Make the settings ``keys`` of ``config`` ints: ``iterations`` >= 0, the others >= 1;
    InputError naming ``what`` and the key otherwise."""
    for key in keys:
        value = getattr(config, key)
        if int(value) != value or int(value) < (0 if key == "iterations" else 1):
            raise InputError(f"{what} '{key}' must be a positive integer; got {value!r}")
        setattr(config, key, int(value))


def set_floats(config: Any, keys: tuple[str, ...], what: str = "training setting", positive: bool = True) -> None:
    """Make the settings ``keys`` of ``config`` floats, > 0 (``positive``) or >= 0; InputError
    naming ``what`` and the key otherwise (NaN included)."""
    for key in keys:
        value = float(getattr(config, key))
        if not (value > 0 if positive else value >= 0):
            raise InputError(f"{what} '{key}' must be {'positive' if positive else '>= 0'}; got {getattr(config, key)!r}")
        setattr(config, key, value)


def check_time_limit(time_limit: float | None) -> None:
    """InputError unless ``time_limit`` is None or a positive number of seconds."""
    if time_limit is not None and not float(time_limit) > 0:
        raise InputError(f"'time_limit' must be a positive number of seconds; got {time_limit!r}")


class RunFiles(NamedTuple):
    """Where a training run writes (`run_files`)."""

    folder: Path
    weights: Path
    history: Path
    checkpoint: Path


def run_device(config: Any) -> torch.device:
    """Apply a run's ``threads`` setting (where given) and resolve its ``device`` setting."""
    if config.threads is not None:
        torch.set_num_threads(int(config.threads))
    return resolve_device(config.device)


def run_files(output: str | None, name: str, checkpoint: str | None = None) -> RunFiles:
    """The files of a run training the weights ``name``: in ``output`` (default
    `weights.weights_dir()`; created, with its ``checkpoints/`` folder) ``<name>.pt``,
    ``<name>_loss.csv`` and ``checkpoints/<checkpoint or name>.pt``."""
    folder = Path(output) if output else weights_dir()
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    return RunFiles(folder, folder / f"{name}.pt", folder / f"{name}_loss.csv", folder / "checkpoints" / f"{checkpoint or name}.pt")


def resume_checkpoint(path: Path, net: torch.nn.Module, map_location: Any = None) -> tuple[dict[str, Any], int, float]:
    """Load the network of the checkpoint written by `save_progress` into ``net``; returns the
    checkpoint (for its optimiser entries), its iteration and the wall seconds spent so far."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    net.load_state_dict(checkpoint["model"])
    return checkpoint, int(checkpoint["iteration"]), float(checkpoint["wall_seconds"])


def save_progress(
    net: torch.nn.Module,
    optimisers: dict[str, Any],
    iteration: int,
    wall_seconds: float,
    history: History,
    files: RunFiles,
) -> None:
    """The resumable checkpoint (network, the ``optimisers`` entries, iteration, wall time), the
    weights (a plain state dict) and the loss log, each written whole or not at all."""
    atomic_torch_save(
        {"model": net.state_dict(), **optimisers, "iteration": iteration, "wall_seconds": wall_seconds},
        files.checkpoint,
    )
    atomic_torch_save(net.state_dict(), files.weights)
    write_history(history, files.history)


def run_provenance(config: Any, device: torch.device) -> dict[str, Any]:
    """The provenance entries every training run records: its command line, its settings (the
    dataclass ``config``, tuples as lists), the device and the torch version."""
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "device": device_name(device),
        "torch": torch.__version__,
    }


def settings_from_argv(argv: list[str] | None = None) -> dict[str, Any]:
    """``KEY=JSON`` arguments (``sys.argv[1:]`` by default) as settings; a value that is not JSON stays a string."""
    config: dict[str, Any] = {}
    for item in sys.argv[1:] if argv is None else argv:
        key, _, value = item.partition("=")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return config
