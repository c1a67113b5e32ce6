"""Colour maps for the Jacobian determinant and the PMM map (PNG reports now, Slicer colour tables later).

Jacobian determinant (det J of the map x -> x + u(x)), shown over ``JACOBIAN_RANGE = (0, 2)``:

- blue, darker towards 0: det J < 1, the tissue is compressed (a volume shrinks);
- white at exactly 1: volume preserved;
- red, darker towards 2: det J > 1, the tissue is expanded; values above 2 keep the darkest red;
- bright green (``JACOBIAN_FOLDING_RGB`` = pure RGB green, a colour no part of the blue-white-red
  ramp comes near): det J <= 0, the transform folds (is not invertible there).

The colours are defined once, as ``(value, r, g, b)`` control points (`jacobian_control_points`,
`pmm_control_points`); the matplotlib colour maps are built from those same points.
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import Colormap, LinearSegmentedColormap, Normalize

JACOBIAN_RANGE: tuple[float, float] = (0.0, 2.0)
JACOBIAN_FOLDING_RGB: tuple[float, float, float] = (0.0, 1.0, 0.0)
# Width of the step from the folding colour to the ramp in `jacobian_control_points(include_folding=True)`,
# for colour tables that can only interpolate between points (e.g. vtkColorTransferFunction).
JACOBIAN_FOLDING_STEP: float = 1e-4

_JACOBIAN_RAMP: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 0.03, 0.15, 0.45),
    (0.5, 0.25, 0.52, 0.85),
    (1.0, 1.00, 1.00, 1.00),
    (1.5, 0.90, 0.38, 0.28),
    (2.0, 0.45, 0.00, 0.05),
)

# PMM (patch-wise NMI; higher = better local alignment): dark violet -> teal -> yellow.
# Values are positions in the display range (0 = its low end, 1 = its high end).
_PMM_RAMP: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 0.10, 0.03, 0.25),
    (0.35, 0.20, 0.35, 0.60),
    (0.65, 0.20, 0.68, 0.55),
    (1.0, 0.99, 0.92, 0.20),
)


def jacobian_control_points(include_folding: bool = False) -> list[tuple[float, float, float, float]]:
    """The Jacobian colour ramp as ``(det J, r, g, b)`` points (rgb in [0, 1]) over `JACOBIAN_RANGE`.

    With ``include_folding`` the list starts with the folding colour from ``-JACOBIAN_RANGE[1]`` up
    to 0 and steps to the ramp at ``JACOBIAN_FOLDING_STEP``, for interpolating colour tables.
    """
    ramp = [tuple(float(v) for v in p) for p in _JACOBIAN_RAMP]
    if not include_folding:
        return ramp
    folding = [(-JACOBIAN_RANGE[1], *JACOBIAN_FOLDING_RGB), (0.0, *JACOBIAN_FOLDING_RGB)]
    return folding + [(JACOBIAN_FOLDING_STEP, *ramp[0][1:])] + ramp[1:]


def pmm_control_points() -> list[tuple[float, float, float, float]]:
    """The PMM colour ramp as ``(position, r, g, b)`` points, position 0..1 across the display range."""
    return [tuple(float(v) for v in p) for p in _PMM_RAMP]


def _colormap_from_points(name: str, points: list[tuple[float, float, float, float]]) -> LinearSegmentedColormap:
    values = np.array([p[0] for p in points])
    positions = (values - values[0]) / (values[-1] - values[0])
    # N = 2**9 + 1 table entries sit at multiples of 1/512, so a control point at a multiple of 1/512
    # (det J = 0, 0.5, 1, 1.5, 2) gets its exact colour, e.g. pure white at det J = 1.
    return LinearSegmentedColormap.from_list(name, [(float(t), p[1:]) for t, p in zip(positions, points)], N=513)


def jacobian_colormap() -> Colormap:
    """Blue (<1) - white (1) - red (>1) over `JACOBIAN_RANGE`; folding colour for det J <= 0.

    Use it with `JacobianNorm`, which sends det J <= 0 to the colour map's "under" colour.
    Not-a-number (no value) is transparent.
    """
    ramp = jacobian_control_points()
    return _colormap_from_points("jointregseg_jacobian", ramp).with_extremes(
        under=(*JACOBIAN_FOLDING_RGB, 1.0), over=(*ramp[-1][1:], 1.0), bad=(0.0, 0.0, 0.0, 0.0)
    )


class JacobianNorm(Normalize):
    """Linear over `JACOBIAN_RANGE`, except that det J <= 0 maps to -1 (the colour map's folding colour)."""

    def __init__(self) -> None:
        super().__init__(vmin=JACOBIAN_RANGE[0], vmax=JACOBIAN_RANGE[1], clip=False)

    def __call__(self, value, clip=None):
        result = super().__call__(value, clip)
        raw = np.ma.asarray(value, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            folding = np.ma.filled(raw <= 0, False)
        if np.ndim(result) == 0:
            return np.float64(-1.0) if bool(folding) else result
        result = np.ma.array(result, copy=True)
        result[folding] = -1.0
        return result


def jacobian_rgba(det: np.ndarray) -> np.ndarray:
    """RGBA colours (``det.shape + (4,)``, floats in [0, 1]) of Jacobian determinant values."""
    return jacobian_colormap()(JacobianNorm()(np.asarray(det, dtype=np.float64)))


def pmm_colormap() -> Colormap:
    """Sequential dark-violet -> yellow map for the PMM (higher = better local alignment); NaN transparent."""
    return _colormap_from_points("jointregseg_pmm", pmm_control_points()).with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
