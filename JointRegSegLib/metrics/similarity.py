"""Global intensity similarity: NCC, mutual information and normalised mutual information.

All functions take two images of the same shape (numpy arrays or `Volume`s on the same grid,
e.g. the fixed image and the warped moving image) and an optional boolean mask restricting the
voxels used.

Histogram rule (MI and NMI): each image is binned into ``bins`` equal-width bins spanning its OWN
[min, max] inside the mask (the last bin is closed), exactly like ``np.histogram2d`` with
``range=[[a.min(), a.max()], [b.min(), b.max()]]``. Entropies are in nats.

NMI is 2 I(A; B) / (H(A) + H(B)), in [0, 1] (1 for an image against itself; scikit-learn's
default NMI), the one normalisation used everywhere in JointRegSeg: the global ``nmi`` of
metrics.json and each patch of the PMM map (seed 004 reports PMM values that "will not reach a
value of 1" for multi-modal pairs, i.e. a normalisation whose maximum is 1). Studholme's
(H(A) + H(B)) / H(A, B), in [1, 2], is the same quantity rescaled: 2 - 2 / Studholme.
Undefined cases (every voxel in one bin for both images) give NaN.

`MaskedImage` holds one image's voxels inside a mask and their bins, computed once, for scoring
several images against it (the fixed image against the moving image before and after
registration: `similarity_scores`), with the same numbers as the functions of single pairs.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..imageio.geometry import Volume

_TABLE_MAX = 2**16  # largest histogram total for which `entropies` uses a c log c lookup table


def as_array(x: np.ndarray | Volume, name: str = "image") -> np.ndarray:
    """The array of a `Volume`, or the array itself."""
    if isinstance(x, Volume):
        return x.array
    if not isinstance(x, np.ndarray):
        raise InputError(f"{name} must be a numpy array or a Volume, got {type(x).__name__}")
    return x


def masked_pair(
    a: np.ndarray | Volume, b: np.ndarray | Volume, mask: np.ndarray | Volume | None
) -> tuple[np.ndarray, np.ndarray]:
    """The voxel values of ``a`` and ``b`` inside ``mask`` (all voxels when None), as 1D float64."""
    a, b = as_array(a, "first image"), as_array(b, "second image")
    if a.shape != b.shape:
        raise InputError(f"images have different shapes {a.shape} and {b.shape}: resample them onto one grid first")
    m = _checked_mask(mask, a.shape)
    return _masked_values(a, m), _masked_values(b, m)


def _checked_mask(mask: np.ndarray | Volume | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """``mask`` as a non-empty boolean array of ``shape`` (None stays None)."""
    if mask is None:
        return None
    m = as_array(mask, "mask")
    if m.shape != shape:
        raise InputError(f"mask shape {m.shape} differs from image shape {shape}: use a mask on the image grid")
    m = m.astype(bool)
    if not m.any():
        raise InputError("the mask is empty: give a mask with at least one voxel inside")
    return m


def _masked_values(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return array.astype(np.float64).ravel() if mask is None else array[mask].astype(np.float64)


def joint_codes(first_bins: np.ndarray, second_bins: np.ndarray, bins: int) -> np.ndarray:
    """The joint histogram cell ``bins * q_1 + q_2`` of each voxel's bin indices in two images (`quantise`)."""
    return first_bins * bins + second_bins


def quantise(values: np.ndarray, bins: int) -> np.ndarray:
    """Bin index (0..bins-1) of each value, with ``bins`` equal bins over [values.min(), values.max()].

    Same bin assignment as ``np.histogram``/``np.histogram2d`` (edges ``np.linspace(min, max,
    bins + 1)``, last bin closed). A constant input falls entirely into bin 0.
    """
    if bins < 2:
        raise InputError(f"bins must be at least 2, got {bins}")
    lo, hi = float(values.min()), float(values.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError("the image holds NaN or infinite intensities: replace them (e.g. by 0) before scoring")
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.intp)
    edges = np.linspace(lo, hi, bins + 1)
    values = np.asarray(values, dtype=np.float64)
    index = np.minimum(((values - lo) * (bins / (hi - lo))).astype(np.intp), bins - 1)
    # fix the rounding of the scaled value against the exact edges, as np.histogram does
    index -= values < edges[index]
    index += (values >= edges[index + 1]) & (index < bins - 1)
    return index


def joint_histogram(
    a: np.ndarray | Volume, b: np.ndarray | Volume, bins: int = 32, mask: np.ndarray | Volume | None = None
) -> np.ndarray:
    """Joint histogram counts, shape (bins, bins), rows indexing ``a``'s bins, columns ``b``'s."""
    va, vb = masked_pair(a, b, mask)
    codes = joint_codes(quantise(va, bins), quantise(vb, bins), bins)
    return np.bincount(codes, minlength=bins * bins).reshape(bins, bins)


def _c_log_c(c: np.ndarray) -> np.ndarray:
    """``c log c``, 0 where ``c`` is 0 (``scipy.special.xlogy(c, c)``, without importing scipy.special)."""
    positive = c > 0
    return np.where(positive, c * np.log(np.where(positive, c, 1.0)), 0.0)


def _table_sums(table: np.ndarray, counts: np.ndarray, per_chunk: int = 1 << 19) -> np.ndarray:
    """``table[counts].sum(axis=-1)``, the same numbers, about ``per_chunk`` counts at a time: the values looked up
    (8 bytes per count) stay in the cache instead of filling a float64 copy of every histogram."""
    flat = counts.reshape(-1, counts.shape[-1])
    out = np.empty(len(flat))
    step = max(1, per_chunk // max(1, counts.shape[-1]))
    for start in range(0, len(flat), step):
        out[start : start + step] = table[flat[start : start + step]].sum(axis=-1)
    return out.reshape(counts.shape[:-1])


def entropies(joint: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marginal and joint entropies (nats) of joint histograms ``(..., B, B)`` of counts.

    H = log n - (1/n) sum_c c log c, for counts c summing to n. Returns (H(A), H(B), H(A, B)),
    each of the leading shape; NaN where a histogram is empty.
    """
    joint = np.asarray(joint)
    row, col = joint.sum(axis=-1), joint.sum(axis=-2)
    n = row.sum(axis=-1)
    cells = joint.reshape(*joint.shape[:-2], -1)
    if np.issubdtype(joint.dtype, np.integer) and 0 < n.size and 0 <= joint.min() and n.max() <= _TABLE_MAX:
        # small integer counts (patches): c log c from a lookup table, much faster than xlogy
        table = _c_log_c(np.arange(n.max() + 1.0))
        sum_ab, sum_a, sum_b = (_table_sums(table, c) for c in (cells, row, col))
    else:
        sum_ab, sum_a, sum_b = (_c_log_c(c.astype(np.float64)).sum(axis=-1) for c in (cells, row, col))
    n = n.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_n = np.log(n)
        h_a, h_b, h_ab = log_n - sum_a / n, log_n - sum_b / n, log_n - sum_ab / n
    empty = n == 0
    return tuple(np.where(empty, np.nan, h) for h in (h_a, h_b, h_ab))  # type: ignore[return-value]


def arithmetic_nmi_from_joint(joint: np.ndarray) -> np.ndarray:
    """2 I / (H(A) + H(B)) of joint histograms ``(..., B, B)``; NaN where both images are constant."""
    h_a, h_b, h_ab = entropies(joint)
    h_sum = h_a + h_b
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(h_sum > 0, 2.0 * (h_sum - h_ab) / h_sum, np.nan)


def _pearson(va: np.ndarray, vb: np.ndarray) -> float:
    da, db = va - va.mean(), vb - vb.mean()
    denom = np.sqrt(np.dot(da, da) * np.dot(db, db))
    return float(np.dot(da, db) / denom) if denom > 0 else float("nan")


def _mutual_information_from_joint(joint: np.ndarray) -> float:
    h_a, h_b, h_ab = entropies(joint)
    return float(h_a + h_b - h_ab)


def ncc(a: np.ndarray | Volume, b: np.ndarray | Volume, mask: np.ndarray | Volume | None = None) -> float:
    """Global normalised cross-correlation (Pearson r) inside the mask, in [-1, 1].

    Seed 004 Appendix B, eq. (4), without the loss's minus sign. NaN when either image is constant.
    """
    return _pearson(*masked_pair(a, b, mask))


def mutual_information(
    a: np.ndarray | Volume, b: np.ndarray | Volume, bins: int = 32, mask: np.ndarray | Volume | None = None
) -> float:
    """I(A; B) = H(A) + H(B) - H(A, B) in nats, from the joint histogram (module docstring)."""
    return _mutual_information_from_joint(joint_histogram(a, b, bins, mask))


def arithmetic_normalised_mutual_information(
    a: np.ndarray | Volume, b: np.ndarray | Volume, bins: int = 32, mask: np.ndarray | Volume | None = None
) -> float:
    """NMI = 2 I(A; B) / (H(A) + H(B)), in [0, 1] (the PMM's per-patch score); NaN when both are constant."""
    return float(arithmetic_nmi_from_joint(joint_histogram(a, b, bins, mask)))


class MaskedImage:
    """An image's voxels inside ``mask`` (every voxel when None) as float64 (``values``, as `masked_pair`
    gives them), and their bin indices for each bin count asked for (`quantise`), each computed once."""

    def __init__(self, image: np.ndarray | Volume, mask: np.ndarray | Volume | None = None) -> None:
        array = as_array(image, "image")
        self.shape = array.shape
        self.mask = _checked_mask(mask, array.shape)
        self.values = _masked_values(array, self.mask)
        self._bins: dict[int, np.ndarray] = {}

    def of(self, image: np.ndarray | Volume) -> np.ndarray:
        """Another image's voxels at the same places, as float64 (as `masked_pair` gives them)."""
        array = as_array(image, "image")
        if array.shape != self.shape:
            raise InputError(f"images have different shapes {self.shape} and {array.shape}: resample them onto one grid first")
        return _masked_values(array, self.mask)

    def bins(self, count: int) -> np.ndarray:
        """`quantise` of ``values`` into ``count`` bins."""
        if count not in self._bins:
            self._bins[count] = quantise(self.values, count)
        return self._bins[count]


def similarity_scores(reference: MaskedImage, values: np.ndarray, bins: int = 32) -> dict[str, float]:
    """`ncc`, `mutual_information` and `arithmetic_normalised_mutual_information` of ``reference`` and an
    image whose voxels inside the reference's mask are ``values`` (`MaskedImage.of`): the same numbers,
    from one joint histogram."""
    joint = np.bincount(joint_codes(reference.bins(bins), quantise(values, bins), bins), minlength=bins * bins).reshape(bins, bins)
    return {
        "ncc": _pearson(reference.values, values),
        "mi": _mutual_information_from_joint(joint),
        "nmi": float(arithmetic_nmi_from_joint(joint)),
    }
