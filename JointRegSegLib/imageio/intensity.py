"""Intensity normalisation for network inputs, and percentiles without a float64 copy of the image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError


NORMALISATION_PERCENTILES = (0.5, 99.5)
"""The percentiles `normalise_intensity` maps to 0 and 1 by default."""


def normalise_intensity(
    array: np.ndarray, mask: np.ndarray | None = None, low: float = NORMALISATION_PERCENTILES[0],
    high: float = NORMALISATION_PERCENTILES[1],
) -> np.ndarray:
    """Map the ``low``-th and ``high``-th percentiles (over ``mask`` if given) to 0 and 1, clipping to [0, 1].

    Falls back to the minimum and maximum when the two percentiles coincide (e.g. a mostly empty image).
    """
    return scale_to_window(array, *intensity_window(array, mask, low, high))


def intensity_window(
    array: np.ndarray, mask: np.ndarray | None = None, low: float = NORMALISATION_PERCENTILES[0],
    high: float = NORMALISATION_PERCENTILES[1],
) -> tuple[float, float]:
    """The values `normalise_intensity` maps to 0 and 1."""
    if not 0.0 <= low < high <= 100.0:
        raise InputError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}.")
    values = np.asarray(array)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != values.shape:
            raise InputError(f"intensity mask of shape {mask.shape} does not match the image shape {values.shape}.")
        values = values[mask]
    if values.size == 0:
        raise InputError("the intensity normalisation mask is empty; give a mask with at least one voxel.")
    return checked_window(values, *percentiles(values, [low, high]))


def checked_window(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """`intensity_window` from the two percentiles ``lo`` and ``hi`` of ``values``: their minimum and maximum where
    the two coincide; InputError where every value is the same."""
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise InputError(f"cannot normalise intensities: every voxel considered has the value {lo:g}.")
    return float(lo), float(hi)


def scale_to_window(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``values`` with ``lo`` and ``hi`` mapped to 0 and 1, clipped to [0, 1], as float32 (`normalise_intensity` of an
    image's values where only some of them are wanted: its window from the whole image, `intensity_window`)."""
    scaled = np.array(values, dtype=np.float64)  # one float64 copy, scaled and clipped in place
    scaled -= lo
    scaled /= hi - lo
    return np.clip(scaled, 0.0, 1.0, out=scaled).astype(np.float32)


def percentiles(values: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """``np.percentile(values.astype(np.float64), q)`` (linear interpolation), the same float64 numbers,
    without the float64 copy: ``np.partition`` picks the order statistics from the values as they
    are (a float32 image's values convert to float64 exactly), then numpy's interpolation
    (``numpy.lib._function_base_impl._lerp``) is applied to them. ``values`` must be finite.
    """
    flat = np.asarray(values).ravel()
    n = flat.size
    virtual = (n - 1) * np.true_divide(np.asarray(q, dtype=np.float64), 100)
    below = np.floor(virtual)
    previous = np.minimum(below.astype(np.intp), n - 1)
    following = np.minimum(previous + 1, n - 1)
    ordered = np.partition(flat, np.unique(np.concatenate([previous, following])))
    a, b = ordered[previous].astype(np.float64), ordered[following].astype(np.float64)
    gamma = virtual - below
    difference = b - a
    return np.where(gamma >= 0.5, b - difference * (1 - gamma), a + difference * gamma)
