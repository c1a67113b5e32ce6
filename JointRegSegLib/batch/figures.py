"""One PNG per method across the cohort: Dice before and after, folding, and the slowest pairs.

``figures/<method>.png`` has three panels: the mean Dice of each pair before and after
registration (boxes with every pair as a point; NCC where the pairs have no label maps), the
percentage of folding voxels (non-positive Jacobian determinant) per pair, and the slowest pairs
by the worker's whole run time. Matplotlib through `Figure` + `FigureCanvasAgg` (no pyplot state).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..bench.runner import folder_name
from .summary import FAILED, Row

SLOWEST = 10


def _values(rows: list[Row], key: str) -> np.ndarray:
    values = [(row.metrics or {}).get(key, float("nan")) for row in rows]
    return np.asarray([v for v in values if not math.isnan(v)], dtype=float)


def _boxes(axes, groups: dict[str, np.ndarray], ylabel: str, seed: int = 0) -> None:
    """Boxes with every value drawn as a jittered point (a single value shows as a line)."""
    names = [name for name, values in groups.items() if values.size]
    if not names:
        axes.text(0.5, 0.5, "no values", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return
    axes.boxplot([groups[name] for name in names], tick_labels=names, widths=0.5, showfliers=False)
    jitter = np.random.default_rng(seed)
    for position, name in enumerate(names, start=1):
        values = groups[name]
        axes.scatter(position + jitter.uniform(-0.12, 0.12, values.size), values, s=12, alpha=0.7, zorder=3)
    axes.set_ylabel(ylabel)
    axes.grid(axis="y", alpha=0.3)


def method_figure(method: str, rows: list[Row], path: Path) -> Path:
    """The figure of one method (see the module docstring)."""
    finished = [row for row in rows if row.metrics]
    failed = sum(row.status in FAILED for row in rows)
    figure = Figure(figsize=(13, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    overlap, folding, slowest = figure.subplots(1, 3, width_ratios=(1, 0.8, 1.4))
    if _values(finished, "dice_mean").size:
        _boxes(overlap, {"before": _values(finished, "dice_mean_initial"), "after": _values(finished, "dice_mean")}, "mean Dice over labels")
        overlap.set_title("Dice")
    else:
        _boxes(overlap, {"before": _values(finished, "ncc_initial"), "after": _values(finished, "ncc")}, "NCC")
        overlap.set_title("NCC (no label maps)")
    _boxes(folding, {"pairs": _values(finished, "folding_percent")}, "voxels with det(J) <= 0 (%)")
    folding.set_title("Folding")
    timed = sorted((row for row in finished if not math.isnan(row.time_s)), key=lambda row: row.time_s, reverse=True)[:SLOWEST]
    if timed:
        slowest.barh([row.id for row in timed][::-1], [row.time_s for row in timed][::-1], color="tab:orange")
        slowest.set_xlabel("worker run time (s)")
    else:
        slowest.set_axis_off()
    slowest.set_title(f"Slowest {len(timed)} pair(s)")
    figure.suptitle(f"{method}: {len(finished)} result(s), {failed} failed, of {len(rows)} pair(s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def make_figures(rows: list[Row], folder: Path) -> list[Path]:
    """One figure per method (in the order the methods first appear)."""
    methods = list(dict.fromkeys(row.method for row in rows))
    return [method_figure(method, [row for row in rows if row.method == method], folder / f"{folder_name(method)}.png") for method in methods]
