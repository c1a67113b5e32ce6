"""The batch's tables: ``summary.csv`` (one row per pair and method) and ``failures.csv``.

Columns: ``id``, ``method``, ``status`` (`STATUSES`), ``attempts`` (worker runs in this batch),
``time_s`` (the worker's whole run, from its provenance.json), ``process_s`` and ``peak_rss_mb``
(the worker process of this batch: wall time and peak resident memory; empty for a kept result),
``host`` (the machine it ran on), ``error``, ``output`` (the result folder), ``log``, then every number of the result's metrics.json
(the benchmark's columns first, then the rest by name; per-label numbers stay in metrics.json).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bench.runner import METRICS
from ..worker.staging import PROVENANCE

STATUSES = {
    "done": "registered in this batch",
    "kept": "an earlier result made from the same inputs and options",
    "failed": "failed in this batch (see error and log)",
    "failed earlier": "a recorded failure of the same inputs and options, not repeated (--retry-failed repeats it)",
    "cancelled": "stopped by Ctrl-C before it finished (a rerun runs it)",
}
FAILED = ("failed", "failed earlier")
COLUMNS = ("id", "method", "status", "attempts", "time_s", "process_s", "peak_rss_mb", "host", "error", "output", "log")


@dataclass
class Row:
    """One pair and method in the summary."""

    id: str
    method: str
    status: str
    attempts: int = 0
    time_s: float = float("nan")
    process_s: float = float("nan")
    peak_rss_mb: float = float("nan")
    host: str = ""
    error: str = ""
    output: str = ""
    log: str = ""
    metrics: dict[str, float] | None = None

    def values(self) -> dict[str, Any]:
        """The row as CSV values by column (metrics included)."""
        return {**{column: getattr(self, column) for column in COLUMNS}, **(self.metrics or {})}


def result_numbers(folder: Path) -> tuple[dict[str, float], float]:
    """The scalar numbers of a result's metrics.json, and the worker's whole run time (provenance)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    provenance = json.loads((folder / PROVENANCE).read_text())
    numbers = {
        key: float(value) if value is not None else float("nan")
        for key, value in metrics.items()
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    }
    return numbers, float(provenance.get("timings_s", {}).get("total_s", float("nan")))


def metric_columns(rows: list[Row]) -> list[str]:
    """Every metric any row has: the benchmark's columns in its order, then the others by name."""
    present = set().union(*(row.metrics or {} for row in rows)) if rows else set()
    return [key for key in METRICS if key in present] + sorted(present - set(METRICS))


def _text(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_table(rows: list[Row], path: Path) -> Path:
    """``rows`` as a CSV file (see the module docstring), written whole (beside, then renamed)."""
    columns = [*COLUMNS, *metric_columns(rows)]
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            values = row.values()
            writer.writerow({column: _text(values.get(column, "")) for column in columns})
    partial.replace(path)
    return path


def write_summary(rows: list[Row], out: Path) -> tuple[Path, Path]:
    """``summary.csv`` (every row) and ``failures.csv`` (the failed rows) in ``out``."""
    return write_table(rows, out / "summary.csv"), write_table([row for row in rows if row.status in FAILED], out / "failures.csv")
