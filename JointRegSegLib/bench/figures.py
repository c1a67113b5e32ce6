"""Benchmark figures (PNG): a slice grid per pair, Dice per label, Dice (and end-point error) against time.

- ``slices_<pair>.png``: one row per tool (the fixed image first, then before registration, then
  each tool that ran): the warped moving image in three orthogonal views, all in the fixed image's
  grey window, next to the Jacobian-determinant map in the colours of `JointRegSegLib.report`
  (blue compression, white 1, red expansion, green folding).
- ``dice_per_label.png``: for each label, one box per tool over the pairs (a single pair shows as
  a line), tools in the same colours everywhere.
- ``dice_vs_time.png``: mean Dice against registration time (log scale), one point per tool and
  pair; ``epe_vs_time.png`` likewise for the end-point error where a true field is known.

Views follow `JointRegSegLib.report.slices` (radiological, oriented by the fixed grid).
Matplotlib is used through `Figure` + `FigureCanvasAgg` only (no pyplot state).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from matplotlib.figure import Figure

from ..imageio.io import read_volume
from ..labels import EVALUATION_LABELS
from ..report import JACOBIAN_RANGE, JacobianNorm, default_index, jacobian_colormap, orthogonal_aspects, orthogonal_slices, robust_window
from .runner import BEFORE, ToolRun
from .table import tools_in_order, value

VIEWS = ("axial", "coronal", "sagittal")


def tool_colours(tools: list[str]) -> dict[str, tuple[float, ...]]:
    """One colour per tool, distinct for up to 20 tools (tab10, tab20 beyond 10; before registration in grey)."""
    others = [tool for tool in tools if tool != BEFORE]
    palette = matplotlib.colormaps["tab10" if len(others) <= 10 else "tab20"]
    colours = {tool: palette(i % palette.N) for i, tool in enumerate(others)}
    colours[BEFORE] = (0.55, 0.55, 0.55, 1.0)
    return colours


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def slice_grid(runs: list[ToolRun], pair: str, fixed_path: Path, fixed_seg_path: Path | None, path: Path) -> Path:
    """The per-tool slice grid of one pair (see the module docstring)."""
    fixed = read_volume(fixed_path)
    index = default_index(read_volume(fixed_seg_path).array if fixed_seg_path else fixed.array)
    geometry = fixed.geometry
    aspects = orthogonal_aspects(geometry)
    low, high = robust_window(fixed.array)
    grey = Normalize(low, high)
    rows = [("fixed", fixed.array, None)]
    for run in runs:
        if run.pair == pair and run.status == "ok" and run.folder is not None:
            rows.append((run.tool, read_volume(run.folder / "warped.nii.gz").array, read_volume(run.folder / "jacobian.nii.gz").array))
    views = orthogonal_slices(fixed.array, index, geometry)
    widths = [view.shape[1] / (view.shape[0] * aspect) for view, aspect in zip(views, aspects)]
    figure = _new_figure(1.7 * 2 * sum(widths) + 0.8, 1.7 * len(rows) + 0.6)
    grid = figure.add_gridspec(len(rows), 6, width_ratios=widths * 2)
    jacobian_shown = False
    for r, (label, warped, jacobian) in enumerate(rows):
        panels = [(warped, "gray", grey)] * 3 + [(jacobian, jacobian_colormap(), JacobianNorm())] * 3
        for c, (array, cmap, norm) in enumerate(panels):
            ax = figure.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black" if array is not None else "white")
            if r == 0:
                ax.set_title(f"{'warped' if c < 3 else 'Jacobian'} {VIEWS[c % 3]}", fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if array is None:
                ax.set_axis_off()
                continue
            view = orthogonal_slices(np.asarray(array, dtype=np.float64), index, geometry)[c % 3]
            ax.imshow(view, cmap=cmap, norm=norm, aspect=aspects[c % 3], interpolation="nearest")
            jacobian_shown = jacobian_shown or c >= 3
    if jacobian_shown:
        # JacobianNorm is not monotonic at 0, so the bar uses the linear norm over JACOBIAN_RANGE; its
        # lower extension shows the folding colour (as in JointRegSegLib.report).
        mappable = ScalarMappable(Normalize(*JACOBIAN_RANGE), jacobian_colormap())
        bar = figure.colorbar(mappable, ax=figure.axes, shrink=0.3, extend="both", location="right")
        bar.set_label("det J (green: <= 0, folding)", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    figure.suptitle(f"{pair}: warped moving image and Jacobian determinant per tool", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, facecolor="white")
    return path


def _short(name: str) -> str:
    return name.replace("Left-", "L ").replace("Right-", "R ").replace("Cerebral-", "").replace("-", " ")


def dice_per_label(runs: list[ToolRun], path: Path, per_row: int = 15) -> Path | None:
    """Box plot of Dice per label and tool over the pairs (each pair also a dot); None without label maps.

    The labels are the 30 standard evaluation structures where the label maps have them (as in the
    mean Dice), otherwise all shared labels; ``per_row`` labels per panel.
    """
    done = [run for run in runs if run.status == "ok" and run.labels]
    if not done:
        return None
    tools = tools_in_order(done)
    colours = tool_colours(tools_in_order(runs))
    shared = sorted({int(label) for run in done for label in run.labels})
    labels = [label for label in shared if label in EVALUATION_LABELS] or shared
    names = {int(label): numbers.get("name", str(label)) for run in done for label, numbers in run.labels.items()}
    rows = [labels[i : i + per_row] for i in range(0, len(labels), per_row)]
    width = 0.8 / len(tools)
    figure = _new_figure(max(8.0, per_row * (0.16 * len(tools) + 0.25) + 1.5), 3.6 * len(rows) + 0.4)
    for r, chunk in enumerate(rows):
        ax = figure.add_subplot(len(rows), 1, r + 1)
        for t, tool in enumerate(tools):
            offset = (t - (len(tools) - 1) / 2) * width
            for i, label in enumerate(chunk):
                values = [run.labels[str(label)]["dice"] for run in done if run.tool == tool and str(label) in run.labels]
                if not values:
                    continue
                boxes = ax.boxplot(
                    [values], positions=[i + offset], widths=width * 0.85, patch_artist=True, showfliers=False,
                    medianprops={"color": "black", "linewidth": 0.8}, whiskerprops={"linewidth": 0.6}, capprops={"linewidth": 0.6},
                )
                boxes["boxes"][0].set_facecolor((*colours[tool][:3], 0.45))
                boxes["boxes"][0].set_linewidth(0.5)
                ax.scatter([i + offset] * len(values), values, color=colours[tool], s=9, zorder=3, linewidths=0)
            if r == 0:
                ax.scatter([], [], marker="s", color=colours[tool], label=tool)
        ax.set_xticks(range(len(chunk)))
        ax.set_xticklabels([_short(names[label]) for label in chunk], rotation=40, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(chunk) - 0.4)
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("Dice")
        ax.grid(axis="y", linewidth=0.3)
        if r == 0:
            ax.legend(fontsize=7, ncols=min(len(tools), 6), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    figure.suptitle("Dice per label (box and dots: spread over pairs)", fontsize=10)
    figure.savefig(path, dpi=100, facecolor="white")
    return path


def metric_vs_time(runs: list[ToolRun], key: str, label: str, path: Path) -> Path | None:
    """Scatter of a metric against registration time (log scale); None when no run has both."""
    done = [run for run in runs if run.status == "ok" and run.times_s and not math.isnan(value(run, key))]
    if not done:
        return None
    colours = tool_colours(tools_in_order(runs))
    figure = _new_figure(6.0, 4.2)
    ax = figure.add_subplot()
    for tool in tools_in_order(done):
        chosen = [run for run in done if run.tool == tool]
        times = [run.time_s for run in chosen]
        values = [value(run, key) for run in chosen]
        ax.scatter(times, values, color=colours[tool], s=28, label=tool, zorder=3)
        ax.annotate(tool, (float(np.exp(np.mean(np.log(times)))), float(np.mean(values))), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    before = [value(run, key) for run in runs if run.tool == BEFORE and not math.isnan(value(run, key))]
    if before:
        ax.axhline(float(np.mean(before)), color=colours[BEFORE], linestyle="--", linewidth=0.8, label=BEFORE)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("registration time (s, log scale)")
    ax.set_ylabel(label)
    ax.grid(linewidth=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"{label} against time (one point per tool and pair)", fontsize=10)
    figure.savefig(path, dpi=100, facecolor="white")
    return path


def make_figures(runs: list[ToolRun], out: Path) -> dict[str, Path]:
    """All figures of a benchmark into ``out/figures``; returns name -> path."""
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for pair in dict.fromkeys(run.pair for run in runs):
        inputs = out / "runs" / pair / "inputs"
        seg = inputs / "fixed_seg.nii.gz"
        made[f"slices_{pair}"] = slice_grid(runs, pair, inputs / "fixed.nii.gz", seg if seg.exists() else None, folder / f"slices_{pair}.png")
    optional = {
        "dice_per_label": dice_per_label(runs, folder / "dice_per_label.png"),
        "dice_vs_time": metric_vs_time(runs, "dice_mean", "mean Dice", folder / "dice_vs_time.png"),
        "epe_vs_time": metric_vs_time(runs, "epe_mm", "end-point error (mm)", folder / "epe_vs_time.png"),
    }
    made.update({name: path for name, path in optional.items() if path is not None})
    return made
