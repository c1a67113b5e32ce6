"""matplotlib colour maps for the Jacobian determinant and the PMM map, built from the control points in
`JointRegSegLib.colour_scales` (the same points make Slicer's colour tables in `JointRegSegLib.mrml.colors`).
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import Colormap, LinearSegmentedColormap, Normalize

from ..colour_scales import JACOBIAN_FOLDING_RGB, JACOBIAN_RANGE, jacobian_control_points, pmm_control_points


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
