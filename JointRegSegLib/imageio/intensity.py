"""Intensity normalisation for network inputs."""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def normalise_intensity(
    array: np.ndarray, mask: np.ndarray | None = None, low: float = 0.5, high: float = 99.5
) -> np.ndarray:
    """Map the ``low``-th and ``high``-th percentiles (over ``mask`` if given) to 0 and 1, clipping to [0, 1].

    Falls back to the minimum and maximum when the two percentiles coincide (e.g. a mostly empty image).
    """
    if not 0.0 <= low < high <= 100.0:
        raise InputError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}.")
    values = np.asarray(array, dtype=np.float64)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != values.shape:
            raise InputError(f"intensity mask of shape {mask.shape} does not match the image shape {values.shape}.")
        values = values[mask]
    if values.size == 0:
        raise InputError("the intensity normalisation mask is empty; give a mask with at least one voxel.")
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        lo, hi = values.min(), values.max()
    if hi <= lo:
        raise InputError(f"cannot normalise intensities: every voxel considered has the value {lo:g}.")
    scaled = (np.asarray(array, dtype=np.float64) - lo) / (hi - lo)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)
