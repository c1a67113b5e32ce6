"""The foreground of an image: the domain of the PMM and of the coverage check (`evaluation`)."""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from ..imageio.geometry import Volume
from ..imageio.intensity import normalise_intensity

FOREGROUND_THRESHOLD = 0.05
CLOSING_ITERATIONS = 2


def foreground_mask(image: Volume, normalised: np.ndarray | None = None) -> np.ndarray:
    """The image's foreground (the PMM domain mask): normalised intensity above 5 %, closed (two
    iterations of the 6-connected cross), holes filled; ``normalised`` is the image's
    `normalise_intensity` where it is at hand.

    The same mask as ``binary_fill_holes(binary_closing(mask, iterations=2))`` of the whole image,
    computed in the box around the voxels above the threshold (3 voxels more each side, where the
    closing cannot reach past), by shifted copies (`closing`), with holes found in one labelling of
    the background (`fill_holes`).
    """
    above = (normalise_intensity(image.array) if normalised is None else normalised) > FOREGROUND_THRESHOLD
    mask = np.zeros(above.shape, dtype=bool)
    if not above.any():
        return mask
    reach = CLOSING_ITERATIONS + 1
    box = tuple(
        slice(max(int(w.min()) - reach, 0), int(w.max()) + 1 + reach)
        for w in (np.flatnonzero(above.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3))
    )
    mask[box] = fill_holes(closing(above[box], CLOSING_ITERATIONS))
    return mask


_FACES = tuple((axis, low) for axis in range(3) for low in (True, False))


def _shifted_into(out: np.ndarray, source: np.ndarray, axis: int, low: bool, combine: Callable[..., np.ndarray]) -> None:
    """``out[p] = combine(out[p], source[p -+ e_axis])`` where that neighbour exists."""
    inner = [slice(None)] * 3
    neighbour = [slice(None)] * 3
    inner[axis], neighbour[axis] = (slice(1, None), slice(None, -1)) if low else (slice(None, -1), slice(1, None))
    combine(out[tuple(inner)], source[tuple(neighbour)], out=out[tuple(inner)])


def closing(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``scipy.ndimage.binary_closing(mask, iterations=iterations)`` (6-connected cross, outside = background):
    dilations then erosions, each one pass of six shifted copies."""
    out = mask
    for _ in range(iterations):
        grown = out.copy()
        for axis, low in _FACES:
            _shifted_into(grown, out, axis, low, np.logical_or)
        out = grown
    for _ in range(iterations):
        shrunk = out.copy()
        for axis, low in _FACES:
            _shifted_into(shrunk, out, axis, low, np.logical_and)
            shrunk[(slice(None),) * axis + (0 if low else -1,)] = False  # the neighbour outside is background
        out = shrunk
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background component (6-connected) that does not reach the border filled in
    (scipy's ``binary_fill_holes`` with its default structure, by one labelling instead of repeated dilations).

    In a box cut around the foreground a component that reaches the box's border reaches the image's
    border through the background around the box, so the result is the whole image's.
    """
    components, count = ndimage.label(~mask)
    faces = [components.take(index, axis=axis) for axis in range(3) for index in (0, -1)]
    reaches_border = np.zeros(count + 1, dtype=bool)  # by component number (0: the mask itself)
    reaches_border[np.concatenate([face.ravel() for face in faces])] = True
    return mask | ~reaches_border[components]
