"""Slicer colour tables for the Jacobian, the PMM and label maps, built from the one definition in
`JointRegSegLib.colour_scales` and `JointRegSegLib.labels`.

How Slicer colours a scalar volume (measured on slicer-core 5.11, `Testing/test_mrml.py` checks it):
the display window ``[low, high]`` is mapped to a byte ``b = floor((v - low) / (high - low) * 255)``
(clamped to 0..255) and ``b`` picks entry ``b`` of a 256-entry colour table. So entry ``b`` shows
the values ``low + [b, b + 1) * step`` with ``step = (high - low) / 255``.

Jacobian table: the window is `JACOBIAN_RANGE` itself, (0, 2), so ``step = 2 / 255`` and entry ``b`` shows
``det J`` in ``[b, b + 1) * step``, coloured as its centre ``(b + 1/2) * step``: entry 0 (``det J < step``, i.e.
<= 0 up to 0.4 % of the range, and everything below) has the folding colour, entry 127 is centred exactly on
``det J = 1`` (white), entry 255 is ``det J >= 2``. The colour legend, which Slicer labels from the display window
(vtkMRMLColorLegendDisplayableManager), then reads 0.00 to 2.00 (a window starting half a step below 0 printed
its lowest label as "-0.00").
"""

from __future__ import annotations

import numpy as np
import slicer

from ..labels import label_info
from ..colour_scales import JACOBIAN_FOLDING_RGB, JACOBIAN_RANGE, jacobian_control_points, pmm_control_points

TABLE_SIZE = 256
JACOBIAN_WINDOW: tuple[float, float] = JACOBIAN_RANGE
JACOBIAN_STEP = (JACOBIAN_WINDOW[1] - JACOBIAN_WINDOW[0]) / (TABLE_SIZE - 1)


def _interpolate(points: list[tuple[float, float, float, float]], values: np.ndarray) -> np.ndarray:
    """RGB (N, 3) of ``values`` by linear interpolation between ``(value, r, g, b)`` control points."""
    table = np.asarray(points, dtype=np.float64)
    return np.stack([np.interp(values, table[:, 0], table[:, c]) for c in (1, 2, 3)], axis=1)


def jacobian_table_values() -> np.ndarray:
    """The det J value each of the 256 Jacobian table entries stands for: the centre of the values it shows."""
    return JACOBIAN_WINDOW[0] + (np.arange(TABLE_SIZE) + 0.5) * JACOBIAN_STEP


def jacobian_table_rgb() -> np.ndarray:
    """(256, 3) colours of the Jacobian table: folding colour at entry 0, then the diverging ramp."""
    rgb = _interpolate(jacobian_control_points(), jacobian_table_values())
    rgb[0] = JACOBIAN_FOLDING_RGB
    return rgb


def pmm_table_rgb() -> np.ndarray:
    """(256, 3) colours of the PMM table: the ramp sampled at positions 0..1 of the display window."""
    return _interpolate(pmm_control_points(), np.linspace(0.0, 1.0, TABLE_SIZE))


def _new_table(scene: slicer.vtkMRMLScene, name: str, description: str) -> slicer.vtkMRMLColorTableNode:
    node = slicer.vtkMRMLColorTableNode()
    node.SetTypeToUser()
    node.SetName(scene.GenerateUniqueName(name))
    node.SetDescription(description)
    node.SetAttribute("Category", "JointRegSeg")
    return node


def _fill(node: slicer.vtkMRMLColorTableNode, rgb: np.ndarray, names: list[str]) -> None:
    node.SetNumberOfColors(len(rgb))
    for index, (colour, name) in enumerate(zip(rgb, names)):
        node.SetColor(index, name, float(colour[0]), float(colour[1]), float(colour[2]), 1.0)


def add_jacobian_table(scene: slicer.vtkMRMLScene, name: str = "JointRegSeg Jacobian") -> slicer.vtkMRMLColorTableNode:
    """Add the Jacobian colour table (use it with display window `JACOBIAN_WINDOW`)."""
    node = _new_table(
        scene,
        name,
        "Jacobian determinant det J: blue < 1 (compression), white = 1 (volume kept), red > 1 (expansion), "
        "green <= 0 (folding: the transform is not invertible there).",
    )
    values = jacobian_table_values()
    names = ["folding (det J <= 0)"] + [f"det J {v:.3f}" for v in values[1:]]
    _fill(node, jacobian_table_rgb(), names)
    scene.AddNode(node)
    return node


def add_pmm_table(scene: slicer.vtkMRMLScene, name: str = "JointRegSeg PMM") -> slicer.vtkMRMLColorTableNode:
    """Add the PMM colour table (dark violet = low, yellow = high local alignment)."""
    node = _new_table(
        scene, name, "Patch-wise normalised mutual information of fixed and warped: higher = better local alignment."
    )
    names = [f"PMM {t:.0%} of window" for t in np.linspace(0.0, 1.0, TABLE_SIZE)]
    _fill(node, pmm_table_rgb(), names)
    scene.AddNode(node)
    return node


def add_label_table(
    scene: slicer.vtkMRMLScene, codes: list[int], name: str = "JointRegSeg labels", names: dict[int, str] | None = None
) -> slicer.vtkMRMLColorTableNode:
    """Add a colour table holding the FreeSurfer-style name and colour of each label code in ``codes``.

    ``names`` overrides the lookup table's name of some codes (e.g. a brain mask's label 1).
    """
    node = _new_table(scene, name, "Label names and colours (FreeSurfer lookup table).")
    size = max([0, *codes]) + 1
    node.SetNumberOfColors(size)
    node.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
    if hasattr(node, "SetColorDefined"):  # Slicer >= 5.10; 5.8 names new entries "(none)", its mark of "undefined"
        for code in range(1, size):
            node.SetColorDefined(code, False)
    for code in codes:
        if code == 0:
            continue
        info = label_info(code)
        r, g, b = (c / 255.0 for c in info.rgb)
        node.SetColor(code, (names or {}).get(code, info.name), r, g, b, 1.0)
    scene.AddNode(node)
    return node
