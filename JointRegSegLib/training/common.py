"""What every trainer shares: crash-safe files, loss logs and their curves, settings checks, Dice for validation."""

from __future__ import annotations

import csv
import io
import os
import platform
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ..device import resolve_device
from ..errors import InputError

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


def set_floats(config: Any, keys: tuple[str, ...], what: str = "training setting", positive: bool = True) -> None:
    """Make the settings ``keys`` of ``config`` floats, > 0 (``positive``) or >= 0; InputError
    naming ``what`` and the key otherwise (NaN included)."""
    for key in keys:
        value = float(getattr(config, key))
        if not (value > 0 if positive else value >= 0):
            raise InputError(f"{what} '{key}' must be {'positive' if positive else '>= 0'}; got {getattr(config, key)!r}")
        setattr(config, key, value)


def set_probabilities(config: Any, keys: tuple[str, ...], what: str = "training setting") -> None:
    """Make the settings ``keys`` of ``config`` floats in [0, 1]; InputError naming ``what`` and the key otherwise."""
    for key in keys:
        value = float(getattr(config, key))
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{what} '{key}' is a probability in [0, 1]; got {getattr(config, key)!r}")
        setattr(config, key, value)


def run_device(config: Any) -> torch.device:
    """Apply a run's ``threads`` setting (where given) and resolve its ``device`` setting."""
    if config.threads is not None:
        torch.set_num_threads(int(config.threads))
    return resolve_device(config.device)


def image_array(image: torch.Tensor) -> np.ndarray:
    """One image ``(1, I, J, K)`` or ``(1, 1, I, J, K)`` (a tensor on any device) as a numpy array ``(I, J, K)``."""
    return image.detach().float().cpu().reshape(image.shape[-3:]).numpy()


def dice_present(truth: torch.Tensor, predicted: torch.Tensor, labels: list[int]) -> float:
    """Mean Dice (`metrics.dice_per_label`) over the ``labels`` present in ``truth``; a label the prediction
    misses counts 0 (unlike `metrics.mean_dice`, which skips it). Integer maps of one shape."""
    from ..metrics.overlap import dice_per_label

    truth_np, predicted_np = image_array(truth).astype(np.int64), image_array(predicted).astype(np.int64)
    present = [c for c in labels if (truth_np == c).any()]
    scores = dice_per_label(truth_np, predicted_np, labels=present)
    return float(np.mean([scores.get(c, 0.0) for c in present])) if present else float("nan")


def with_real_pair(score: float, ncc_after: float, ncc_before: float) -> float:
    """A synthetic validation ``score`` plus what the registration of the held-apart real pair gains in NCC over the
    unregistered pair (negative where it aligns them worse): weights count as better only where the real pair agrees,
    not the synthetic volumes alone."""
    return float(score + (ncc_after - ncc_before))
