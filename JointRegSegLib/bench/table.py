"""Benchmark tables: CSV (every run, every label, every time ratio) and a Markdown summary.

Files written by `write_tables`:

- ``results.csv``: one row per pair and tool (`RESULT_COLUMNS`), the before-registration row included;
- ``labels.csv``: Dice (after, before) and HD95 per pair, tool and label;
- ``ratios.csv``: our registration time divided by each peer's, and our whole process's wall time
  divided by the peer's whole process's (start-up, reading, registration and, for ours, the
  evaluation and writing too: the call a user waits for), per pair (`RATIO_COLUMNS`), plus an
  ``all`` row per method and peer with the geometric mean over the pairs (ratios multiply, so
  they are averaged geometrically);
- ``results.md``: the mean (± standard deviation over pairs where there are several) of each
  tool's numbers, the ratio table, and the skipped or failed tools with the reason.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .processes import THREAD_VARIABLES
from .runner import METRICS, BenchSettings, ToolRun

RESULT_COLUMNS = (
    "pair",
    "tool",
    "kind",
    "status",
    *METRICS,
    "epe_mm",
    "epe_initial_mm",
    "time_s",
    "time_runs",
    "process_s",
    "peak_rss_mb",
    "threads",
    "version",
    "note",
)
LABEL_COLUMNS = ("pair", "tool", "label", "name", "dice", "dice_initial", "hd95")
RATIO_COLUMNS = ("pair", "method", "peer", "method_time_s", "peer_time_s", "ratio", "method_process_s", "peer_process_s", "process_ratio")

# Markdown summary: (column title, metric key, decimals).
SUMMARY = (
    ("Dice", "dice_mean", 3),
    ("HD95 (mm)", "hd95_mean", 2),
    ("seg Dice fixed", "seg_dice_fixed", 3),
    ("seg Dice moving", "seg_dice_moving", 3),
    ("NCC", "ncc", 3),
    ("MI", "mi", 3),
    ("PMM", "pmm_mean", 3),
    ("folding (%)", "folding_percent", 3),
    ("SDlogJ", "sdlogj", 3),
    ("EPE (mm)", "epe_mm", 2),
    ("time (s)", "time_s", 1),
    ("peak memory (MB)", "peak_rss_mb", 0),
)


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def result_row(run: ToolRun, threads: int) -> dict[str, str]:
    """The CSV row of one run."""
    values: dict[str, Any] = {
        "pair": run.pair,
        "tool": run.tool,
        "kind": run.kind,
        "status": run.status,
        "time_s": run.time_s,
        "time_runs": len(run.times_s),
        "process_s": float(np.median(run.process_s)) if run.process_s else float("nan"),
        "peak_rss_mb": run.peak_rss_mb,
        "threads": threads if run.kind != "before" else "",
        "version": run.version,
        "note": run.note,
        **run.metrics,
    }
    return {column: _number(values.get(column)) for column in RESULT_COLUMNS}


def value(run: ToolRun, key: str) -> float:
    """A run's number by table key (metrics, ``time_s``, ``peak_rss_mb``); NaN when absent."""
    if key == "time_s":
        return run.time_s
    if key == "peak_rss_mb":
        return run.peak_rss_mb
    return float(run.metrics.get(key, float("nan")))


def _process_s(run: ToolRun) -> float:
    """Median whole-process wall time over the repeats (NaN when the tool did not run)."""
    return float(np.median(run.process_s)) if run.process_s else float("nan")


def time_ratios(runs: list[ToolRun]) -> list[dict[str, Any]]:
    """Our time / each peer's time (registration alone, and whole processes), per pair, then the
    geometric mean over pairs (``pair = "all"``)."""
    ok = [run for run in runs if run.status == "ok"]
    rows = []
    for ours in (run for run in ok if run.kind == "ours"):
        for peer in (run for run in ok if run.kind == "peer" and run.pair == ours.pair):
            rows.append(
                {
                    "pair": ours.pair,
                    "method": ours.tool,
                    "peer": peer.tool,
                    "method_time_s": ours.time_s,
                    "peer_time_s": peer.time_s,
                    "ratio": ours.time_s / peer.time_s,
                    "method_process_s": _process_s(ours),
                    "peer_process_s": _process_s(peer),
                    "process_ratio": _process_s(ours) / _process_s(peer),
                }
            )
    summary = []
    for method, peer in dict.fromkeys((row["method"], row["peer"]) for row in rows):
        chosen = [row for row in rows if row["method"] == method and row["peer"] == peer]
        summary.append(
            {
                "pair": "all",
                "method": method,
                "peer": peer,
                **{key: float(np.mean([row[key] for row in chosen]))
                   for key in ("method_time_s", "peer_time_s", "method_process_s", "peer_process_s")},
                **{key: float(np.exp(np.mean(np.log([row[key] for row in chosen])))) for key in ("ratio", "process_ratio")},
            }
        )
    return rows + summary


def _write_csv(path: Path, columns: Iterable[str], rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _number(row.get(key)) for key in writer.fieldnames})


def label_rows(runs: list[ToolRun]) -> list[dict[str, Any]]:
    """One row per pair, tool and label (Dice after and before, HD95)."""
    rows = []
    for run in runs:
        for label, numbers in sorted(run.labels.items(), key=lambda item: int(item[0])):
            rows.append({"pair": run.pair, "tool": run.tool, "label": int(label), **{k: numbers.get(k) for k in ("name", "dice", "dice_initial", "hd95")}})
    return rows


def _format(number: float, decimals: int) -> str:
    """Fixed decimals, or two significant digits where those would show a nonzero number as 0
    (rounding noise below 1e-12 counts as 0)."""
    if 1e-12 < abs(number) < 0.5 * 10.0**-decimals:
        return f"{number:.1e}"
    return f"{number:.{decimals}f}"


def _cell(values: list[float], decimals: int) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    mean = float(np.mean(values))
    if len(values) == 1:
        return _format(mean, decimals)
    return f"{_format(mean, decimals)} ± {float(np.std(values, ddof=1)):.{decimals}f}"


def tools_in_order(runs: list[ToolRun]) -> list[str]:
    """Tool names in the order they ran (before registration first)."""
    return list(dict.fromkeys(run.tool for run in runs))


def markdown(runs: list[ToolRun], settings: BenchSettings) -> str:
    """The Markdown summary (see the module docstring)."""
    pairs = list(dict.fromkeys(run.pair for run in runs))
    columns = [(title, key, decimals) for title, key, decimals in SUMMARY if any(not math.isnan(value(r, key)) for r in runs)]
    lines = [
        "| tool | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    problems = []
    for tool in tools_in_order(runs):
        chosen = [run for run in runs if run.tool == tool]
        done = [run for run in chosen if run.status == "ok"]
        problems += [f"- `{run.tool}` on `{run.pair}`: {run.note}" for run in chosen if run.status != "ok"]
        if not done:
            continue
        cells = [_cell([value(run, key) for run in done], decimals) for _, key, decimals in columns]
        lines.append(f"| {tool} | " + " | ".join(cells) + " |")
    has_epe = any(not math.isnan(value(run, "epe_mm")) for run in runs)
    plural = f"mean ± SD over {len(pairs)} pairs" if len(pairs) > 1 else f"pair `{pairs[0]}`"
    text = [
        "# Benchmark",
        "",
        f"Pairs: {', '.join(f'`{p}`' for p in pairs)} ({plural}). Dice: mean over the 30 standard labels "
        "(or all shared labels) of the warped moving labels against the fixed labels; seg Dice fixed / moving = "
        "the same mean for a method's own segmentation of each image against its given labels; HD95 in mm; NCC, "
        "MI and PMM inside the fixed foreground; folding = % of voxels with det J <= 0; "
        + ("EPE = mean end-point error against the true field inside the fixed brain; " if has_epe else "")
        + f"time = registration alone (median of {settings.repeats} run(s)); peak memory = the tool's process.",
        "",
        f"Threads: {settings.threads} for every tool ({', '.join(THREAD_VARIABLES)}); device of our methods: "
        f"{settings.device}; peer settings: `{settings.preset}`.",
        "",
        *lines,
    ]
    ratios = [row for row in time_ratios(runs) if row["pair"] == "all"]
    for key, what in (("ratio", "Time ratio, ours / peer"), ("process_ratio", "Whole-process time ratio (the call a user waits for: "
                      "start-up, reading, registration, and for ours evaluation and writing too), ours / peer")):
        if not ratios:
            break
        peers = list(dict.fromkeys(row["peer"] for row in ratios))
        text += ["", f"{what} (below 1: ours is faster; geometric mean over pairs):", ""]
        text.append("| method | " + " | ".join(peers) + " |")
        text.append("|---|" + "---:|" * len(peers))
        for method in dict.fromkeys(row["method"] for row in ratios):
            cells = {row["peer"]: f"{row[key]:.2f}" for row in ratios if row["method"] == method}
            text.append(f"| {method} | " + " | ".join(cells.get(peer, "–") for peer in peers) + " |")
    if problems:
        text += ["", "Not run:", "", *problems]
    return "\n".join(text) + "\n"


def write_tables(runs: list[ToolRun], out: Path, settings: BenchSettings) -> dict[str, Path]:
    """Write results.csv, labels.csv, ratios.csv and results.md into ``out``; return their paths."""
    paths = {name: out / name for name in ("results.csv", "labels.csv", "ratios.csv", "results.md")}
    _write_csv(paths["results.csv"], RESULT_COLUMNS, (result_row(run, settings.threads) for run in runs))
    _write_csv(paths["labels.csv"], LABEL_COLUMNS, label_rows(runs))
    _write_csv(paths["ratios.csv"], RATIO_COLUMNS, time_ratios(runs))
    paths["results.md"].write_text(markdown(runs, settings))
    return paths

