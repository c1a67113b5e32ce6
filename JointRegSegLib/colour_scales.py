"""The colour scales of the quality maps and the display window of images, as plain data.

One definition for the PNG pictures (`JointRegSegLib.report`, through matplotlib) and for Slicer's
colour tables (`JointRegSegLib.mrml`); importing it needs only numpy, so Slicer's process can use it
before any requirement is installed.

Jacobian determinant det J of the mapping fixed -> moving, shown over ``JACOBIAN_RANGE = (0, 2)``.
The warped image samples the moving image at the mapped points, so where det J < 1 a small piece
of the moving image fills a larger piece of the fixed grid: the moving image was locally stretched
to fit; where det J > 1 it was locally shrunk. By default the maps show the deformable part alone
(the whole mapping's det J divided by the affine part's, a constant), so a global scaling does not
tint the whole map:

- blue, darker towards 0: det J < 1, the moving image was locally stretched to fit;
- white at exactly 1: no local change of volume;
- red, darker towards 2: det J > 1, the moving image was locally shrunk to fit; above 2 the darkest red;
- bright green (``JACOBIAN_FOLDING_RGB`` = pure RGB green, a colour no part of the blue-white-red
  ramp comes near): det J <= 0, the transform folds (is not invertible there).

PMM (patch-wise NMI, in [0, 1]) is shown over the fixed range ``PMM_RANGE`` so that pictures of
different runs share one scale. The colours are defined once, as ``(value, r, g, b)`` control
points (`jacobian_control_points`, `pmm_control_points`).
"""

from __future__ import annotations

import numpy as np

from .imageio.intensity import percentiles as intensity_percentiles

ROBUST_PERCENTILES: tuple[float, float] = (1.0, 99.0)

JACOBIAN_RANGE: tuple[float, float] = (0.0, 2.0)
JACOBIAN_FOLDING_RGB: tuple[float, float, float] = (0.0, 1.0, 0.0)

_JACOBIAN_RAMP: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 0.03, 0.15, 0.45),
    (0.5, 0.25, 0.52, 0.85),
    (1.0, 1.00, 1.00, 1.00),
    (1.5, 0.90, 0.38, 0.28),
    (2.0, 0.45, 0.00, 0.05),
)

JACOBIAN_LEGEND: tuple[tuple[float, str], ...] = (
    (0.5, "det J < 1: moving image locally stretched to fit"),
    (1.0, "det J = 1: no local change of volume"),
    (1.5, "det J > 1: moving image locally shrunk to fit"),
)
JACOBIAN_FOLDING_TEXT = "det J <= 0: folding (not invertible)"
DEFORMABLE_PART = "deformable part"
WHOLE_MAPPING = "whole mapping"
"""What a Jacobian map is of: `DEFORMABLE_PART` (the default) or `WHOLE_MAPPING` (on request)."""


def jacobian_title(part: str) -> str:
    """A Jacobian map's title, saying what its det J is of (`DEFORMABLE_PART` or `WHOLE_MAPPING`)."""
    if part == DEFORMABLE_PART:
        return "Jacobian determinant det J of the deformable part of the mapping fixed -> moving (the whole mapping's divided by its affine part's)"
    return "Jacobian determinant det J of the whole mapping fixed -> moving (affine part included)"

# One display range for every PMM picture and Slicer view. Patch NMI of brain MRI lies mostly
# between 0.05 (unaligned) and 0.5 (well aligned, 1 mm): higher values take the top colour.
PMM_RANGE: tuple[float, float] = (0.0, 0.5)
# PMM (patch-wise NMI; higher = better local alignment): dark violet -> teal -> yellow.
# Values are positions in the display range (0 = its low end, 1 = its high end).
_PMM_RAMP: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 0.10, 0.03, 0.25),
    (0.35, 0.20, 0.35, 0.60),
    (0.65, 0.20, 0.68, 0.55),
    (1.0, 0.99, 0.92, 0.20),
)


def jacobian_control_points() -> list[tuple[float, float, float, float]]:
    """The Jacobian colour ramp as ``(det J, r, g, b)`` points (rgb in [0, 1]) over `JACOBIAN_RANGE`."""
    return [tuple(float(v) for v in p) for p in _JACOBIAN_RAMP]


def pmm_control_points() -> list[tuple[float, float, float, float]]:
    """The PMM colour ramp as ``(position, r, g, b)`` points, position 0..1 across the display range."""
    return [tuple(float(v) for v in p) for p in _PMM_RAMP]


def robust_window(array: np.ndarray, percentiles: tuple[float, float] = ROBUST_PERCENTILES) -> tuple[float, float]:
    """``(vmin, vmax)`` at the given percentiles of the finite values; a unit window if they coincide."""
    values = np.asarray(array)
    if np.issubdtype(values.dtype, np.floating):
        values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    return display_window(*intensity_percentiles(values, percentiles))


def display_window(low: float, high: float) -> tuple[float, float]:
    """`robust_window` from its two percentiles: a unit window around ``low`` if they coincide."""
    low, high = float(low), float(high)
    if high <= low:
        return low - 0.5, low + 0.5
    return low, high
