"""The metrics table: one row per metric (and per label), one column per run, side by side.

Columns: ``Metric``, ``Before registration`` (the same numbers for the moving image as it lies;
every run of one pair has the same ones), then one numeric column per run (method), then
``Meaning`` (what the number is and which direction is better). Missing numbers are NaN.
"""

from __future__ import annotations

import math
from typing import Any

import slicer
import vtk

METRIC_COLUMN = "Metric"
BEFORE_COLUMN = "Before registration"
MEANING_COLUMN = "Meaning"

# (key in metrics.json, key of the value before registration or None, row title, meaning)
ROWS: tuple[tuple[str, str | None, str, str], ...] = (
    ("ncc", "ncc_initial", "NCC", "normalised cross-correlation of fixed and warped in the fixed foreground; higher = better (max 1)"),
    ("mi", "mi_initial", "MI", "mutual information of fixed and warped (nats); higher = better"),
    ("nmi", "nmi_initial", "NMI", "normalised mutual information 2I/(H(F)+H(W)) of fixed and warped (0 to 1; the PMM's per-patch score); higher = better"),
    ("pmm_mean", "pmm_mean_initial", "PMM mean", "mean patch-wise NMI over the fixed foreground; higher = better local alignment"),
    ("dice_mean", "dice_mean_initial", "Dice mean", "mean Dice of fixed and warped label maps; higher = better (max 1)"),
    ("hd95_mean", None, "HD95 mean (mm)", "mean 95th-percentile Hausdorff distance of the labels; lower = better"),
    ("folding_percent", None, "Folding (%)", "share of voxels with det J <= 0 (the transform folds there); 0 is best"),
    ("sdlogj", None, "SDlogJ", "standard deviation of log det J; lower = smoother transform"),
    ("jacobian_min", None, "Jacobian min", "smallest det J (< 0 means folding)"),
    ("jacobian_max", None, "Jacobian max", "largest det J"),
)
TIME_PREFIX = "time_"


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str | None, str]]:
    """``(row key, title, key before registration, meaning)`` of every row a run's metrics give."""
    rows = [(key, title, before, meaning) for key, before, title, meaning in ROWS if key in metrics]
    labels = metrics.get("labels") or {}
    for code, info in sorted(labels.items(), key=lambda item: int(item[0])):
        name = info.get("name", f"Label-{code}")
        rows.append((f"labels/{code}/dice", f"Dice {name}", f"labels/{code}/dice_initial", f"Dice of label {code}; higher = better"))
        rows.append((f"labels/{code}/hd95", f"HD95 {name} (mm)", None, f"HD95 of label {code}; lower = better"))
    for key in sorted(k for k in metrics if k.startswith(TIME_PREFIX) and k.endswith("_s")):
        stage = key[len(TIME_PREFIX):-2].replace("_", " ")
        rows.append((key, f"Time {stage} (s)", None, f"wall-clock seconds spent on: {stage}"))
    return rows


def metric_value(metrics: dict[str, Any], key: str | None) -> float:
    """The number at ``key`` (``labels/<code>/<name>`` reaches into per-label entries); NaN if absent."""
    if key is None:
        return math.nan
    value: Any = metrics
    for part in key.split("/"):
        value = value.get(part) if isinstance(value, dict) else None
    try:
        return math.nan if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return math.nan


def add_metrics_table(scene: slicer.vtkMRMLScene, runs: dict[str, dict[str, Any]], name: str) -> slicer.vtkMRMLTableNode:
    """Add a table node with the metrics of one or more runs of the same pair, side by side.

    ``runs`` maps a column title (the method) to that run's metrics.json content. Rows are the union
    of every run's metrics, in a fixed order (image similarity, overlap, regularity, per label, time).
    """
    rows: dict[str, tuple[str, str | None, str]] = {}
    for metrics in runs.values():
        for key, title, before, meaning in metric_rows(metrics):
            rows.setdefault(key, (title, before, meaning))
    keys = _ordered(rows)

    titles = vtk.vtkStringArray()
    titles.SetName(METRIC_COLUMN)
    meanings = vtk.vtkStringArray()
    meanings.SetName(MEANING_COLUMN)
    before_values = vtk.vtkDoubleArray()
    before_values.SetName(BEFORE_COLUMN)
    run_values = []
    for run in runs:
        column = vtk.vtkDoubleArray()
        column.SetName(run)
        run_values.append(column)
    for key in keys:
        title, before, meaning = rows[key]
        titles.InsertNextValue(title)
        meanings.InsertNextValue(meaning)
        before_values.InsertNextValue(_first_finite(metric_value(m, before) for m in runs.values()))
        for column, metrics in zip(run_values, runs.values()):
            column.InsertNextValue(metric_value(metrics, key))

    table = slicer.vtkMRMLTableNode()
    table.SetName(scene.GenerateUniqueName(name))
    for column in (titles, before_values, *run_values, meanings):
        table.AddColumn(column)
    table.SetColumnDescription(BEFORE_COLUMN, "the same metric for the moving image resampled as it lies (no registration)")
    table.SetDescription("JointRegSeg metrics: one row per metric, one column per method; NaN = not measured.")
    scene.AddNode(table)
    return table


def _ordered(rows: dict[str, tuple[str, str | None, str]]) -> list[str]:
    """Row keys in `ROWS` order, then labels by code, then times."""
    fixed = [key for key, *_ in ROWS if key in rows]
    labels = sorted((k for k in rows if k.startswith("labels/")), key=lambda k: (int(k.split("/")[1]), k.split("/")[2]))
    times = sorted(k for k in rows if k.startswith(TIME_PREFIX))
    return fixed + labels + times


def _first_finite(values) -> float:
    for value in values:
        if math.isfinite(value):
            return value
    return math.nan


def table_as_dict(table: slicer.vtkMRMLTableNode) -> dict[str, dict[str, Any]]:
    """``{row title: {column name: value}}`` of a metrics table (for tests and scripts)."""
    vtk_table = table.GetTable()
    names = [vtk_table.GetColumnName(c) for c in range(vtk_table.GetNumberOfColumns())]
    data: dict[str, dict[str, Any]] = {}
    for r in range(vtk_table.GetNumberOfRows()):
        row = {name: vtk_table.GetValue(r, c).ToString() if name in (METRIC_COLUMN, MEANING_COLUMN) else vtk_table.GetValue(r, c).ToDouble() for c, name in enumerate(names)}
        data[row[METRIC_COLUMN]] = row
    return data
