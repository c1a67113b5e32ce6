"""What the page's results panel lists: the metrics table as rows of text, and the scene's data nodes."""

from __future__ import annotations

import math
from typing import Any

from ..mrml.table import BEFORE_COLUMN, MEANING_COLUMN, METRIC_COLUMN, ROWS

MAIN_ROWS = frozenset(title for _, _, title, _ in ROWS)
SHORT_TITLES = {BEFORE_COLUMN: "Before"}  # narrow columns: a comparison's five methods fit beside the views
DATA_CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLTransformNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode")


def metrics_view(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A metrics table (`mrml.table_as_dict`: row title -> column -> value) as the page shows it: the column
    titles, and per row its title, its meaning (a tooltip), its values as text and whether it is a main row
    (the summary metrics and times; the per-structure rows show on request)."""
    columns = [c for c in next(iter(table.values()), {}) if c not in (METRIC_COLUMN, MEANING_COLUMN)]
    rows = [
        {
            "title": title,
            "meaning": values.get(MEANING_COLUMN, ""),
            "values": [number_text(values[c]) for c in columns],
            "main": title in MAIN_ROWS or title.startswith("Time"),
        }
        for title, values in table.items()
    ]
    return {"columns": [METRIC_COLUMN] + [SHORT_TITLES.get(c, c) for c in columns] if rows else [], "rows": rows}


def number_text(value: Any) -> str:
    """Three decimals below 10, two below 100, none above (narrow columns); a dash where nothing was measured (NaN)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.{3 if abs(value) < 10 else 2 if abs(value) < 100 else 0}f}"


def node_names(scene: Any) -> list[str]:
    """The names of the scene's data nodes a user would see in Slicer's Data module, class by class."""
    names = []
    for class_name in DATA_CLASSES:
        nodes = scene.GetNodesByClass(class_name)
        for index in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(index)
            if not node.GetHideFromEditors():
                names.append(node.GetName())
    return names
