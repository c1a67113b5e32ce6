"""Label overlap and surface distance: Dice per label, mean Dice, HD95 per label.

Label maps are integer arrays (or `Volume`s) on the same grid, 0 = background. By default the
labels scored are the union of the nonzero labels of both maps.

HD95 follows MONAI's ``HausdorffDistanceMetric(percentile=95)`` (symmetric, euclidean):
surface voxels are the label voxels removed by one binary erosion with the 6-connected cross
(outside the image counts as background; found for all labels in one pass, `surfaces`); for each direction the distances (mm, using the voxel
spacing) from every surface voxel of one map to the nearest surface voxel of the other are
collected (those beyond the 95th percentile need not be exact); HD95 is the larger of the two directed
95th percentiles (linear interpolation). A label
present in only one map gives ``inf`` (as MONAI). Each label is cropped to the bounding box of
its union before erosion, which changes nothing (the outside of the box holds no label voxel);
the boxes of all labels come from one pass over each map (``find_objects``). Nearest distances
(`surface_distances`, exact): the voxels around each surface point, nearest first, up to 3 mm, then a
KD-tree over the other surface's voxels for the points left, or an all-pairs search on a GPU.
MONAI's distance transform of each whole box gives the same numbers and costs more here (scipy's
transform alone took 10 s for the 42 labels of the benchmark pair; a KD-tree for every point 4-8 s).

Dice counts every label of both maps in one pass (`LabelCounts`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.ndimage import find_objects

from ..errors import InputError
from ..imageio.geometry import Volume
from .similarity import as_array


def _label_pair(a: np.ndarray | Volume, b: np.ndarray | Volume) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_array(a, "first label map"), as_array(b, "second label map")
    if a.shape != b.shape:
        raise InputError(f"label maps have different shapes {a.shape} and {b.shape}: resample them onto one grid first")
    for x in (a, b):
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.bool_)):
            raise InputError(f"label maps must hold integers, got {x.dtype}: round or cast the segmentation first")
    return a, b


def _chosen(labels: Iterable[int] | None, present: Iterable[int]) -> list[int]:
    """The labels to score: those asked for, else every nonzero label present in either map."""
    return [int(label) for label in (present if labels is None else labels) if labels is not None or label != 0]


_MAX_BINS = 1 << 22  # label value ranges up to this are counted by value; wider ones are renumbered first


class LabelCounts:
    """How two label maps on one grid overlap: ``joint[i, j]`` voxels hold ``values[i]`` in ``a`` and
    ``values[j]`` in ``b`` (``values``: every label either map holds, increasing).

    A few ``np.bincount`` passes over the box holding every nonzero voxel of either map (the voxels outside it
    count as background in both), instead of comparing both whole maps once per label; Dice of single labels
    and of groups of labels (`group_dice`) come from the one table.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        box = _nonzero_box(a, b)
        outside = a.size - int(np.prod([s.stop - s.start for s in box]))  # voxels that are 0 in both maps
        a, b = a[box].ravel(), b[box].ravel()
        extra = [0] if outside else []
        low, high = min(int(a.min()), int(b.min()), *extra), max(int(a.max()), int(b.max()), *extra)
        if high - low < _MAX_BINS:  # count by value, then number the values present 0..n-1
            shift = low if low < 0 or a.dtype == np.bool_ else 0
            a, b = (x.astype(np.intp) - shift if shift or x.dtype == np.bool_ else x for x in (a, b))
            length = high - shift + 1
            occurs = np.bincount(a, minlength=length) | np.bincount(b, minlength=length)
            occurs[np.asarray(extra, dtype=np.intp) - shift] = 1
            present = np.flatnonzero(occurs)
            lookup = np.zeros(length, dtype=np.intp)
            lookup[present] = np.arange(len(present))
            self.values = present + shift
            index_a, index_b = lookup[a], lookup[b]
        else:  # a few labels spread over a wide range
            self.values, inverse = np.unique(np.concatenate([a, b, np.asarray(extra, a.dtype)]), return_inverse=True)
            index_a, index_b = inverse[: a.size], inverse[a.size : 2 * a.size]
        n = len(self.values)
        self.joint = np.bincount(index_a * n + index_b, minlength=n * n).reshape(n, n)
        if outside:
            zero = self.index(0)
            self.joint[zero, zero] += outside
        self.a, self.b = self.joint.sum(axis=1), self.joint.sum(axis=0)

    def index(self, label: int) -> int | None:
        """Where ``label`` is counted, or None when neither map holds it."""
        position = int(np.searchsorted(self.values, label))
        return position if position < len(self.values) and self.values[position] == label else None

    def dice(self, label: int) -> float | None:
        """2 |A n B| / (|A| + |B|) of ``label``; None when it is in neither map."""
        i = self.index(label)
        return None if i is None else 2.0 * int(self.joint[i, i]) / (int(self.a[i]) + int(self.b[i]))

    def group_dice(self, group_a: Iterable[int], group_b: Iterable[int] | None = None) -> float | None:
        """Dice of the voxels holding any label of ``group_a`` in ``a`` against those holding any of
        ``group_b`` (default the same labels) in ``b``; None when neither map holds any."""
        rows = [i for i in map(self.index, group_a) if i is not None]
        cols = rows if group_b is None else [i for i in map(self.index, group_b) if i is not None]
        total = int(self.a[rows].sum()) + int(self.b[cols].sum())
        return 2.0 * int(self.joint[np.ix_(rows, cols)].sum()) / total if total else None

    def present(self) -> list[int]:
        """The labels either map holds, in increasing order."""
        return self.values.tolist()

    def in_both(self, label: int) -> bool:
        i = self.index(label)
        return i is not None and bool(self.a[i]) and bool(self.b[i])


def _nonzero_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every nonzero voxel of either map (the whole grid when both are empty)."""
    occupied = (a != 0) | (b != 0)
    return _bounding_box(occupied) if occupied.any() else tuple(slice(0, n) for n in occupied.shape)


def labels_in(labels: np.ndarray | Volume) -> list[int]:
    """The distinct values of a label map, in increasing order (0 included where present).

    Counted by value (one ``np.bincount``) where the values allow, which costs a fraction of ``np.unique``'s sort.
    """
    values = as_array(labels, "label map")
    if values.size == 0:
        return []
    low, high = int(values.min()), int(values.max())
    if high - low >= _MAX_BINS or not np.issubdtype(values.dtype, np.integer):
        return np.unique(values).tolist()
    return (np.flatnonzero(np.bincount((values.ravel() - low).astype(np.intp, copy=False))) + low).tolist()


def dice_per_label(
    a: np.ndarray | Volume, b: np.ndarray | Volume, labels: Iterable[int] | None = None
) -> dict[int, float]:
    """Dice 2|A n B| / (|A| + |B|) per label; labels absent from both are omitted, in one only give 0."""
    a, b = _label_pair(a, b)
    counts = LabelCounts(a, b)
    scores = {label: counts.dice(label) for label in _chosen(labels, counts.present())}
    return {label: score for label, score in scores.items() if score is not None}


def mean_dice(a: np.ndarray | Volume, b: np.ndarray | Volume, labels: Iterable[int] | None = None) -> float:
    """Mean Dice over the labels present in BOTH maps (NaN when there is none)."""
    a, b = _label_pair(a, b)
    counts = LabelCounts(a, b)
    shared = [label for label in _chosen(labels, counts.present()) if counts.in_both(label)]
    if not shared:
        return float("nan")
    return float(np.mean([counts.dice(label) for label in shared]))


def label_boxes(labels: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """The bounding box of every nonzero label of a map, in one pass (``scipy.ndimage.find_objects``)."""
    low, high = int(labels.min()), int(labels.max())
    if low >= 0 and high < _MAX_BINS:
        values = labels.view(np.uint8) if labels.dtype == np.bool_ else labels
        return {index + 1: box for index, box in enumerate(find_objects(values)) if box is not None}
    return {label: _bounding_box(labels == label) for label in np.unique(labels).tolist() if label != 0}


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(x for x in range(mask.ndim) if x != axis)))
        box.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(box)


def _union(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(a, b))


def surfaces(labels: np.ndarray) -> np.ndarray:
    """Every nonzero label's surface voxels at once: for each label, the voxels of its mask that one erosion with
    the 6-connected cross removes (``mask & ~binary_erosion(mask)``, outside the image = background), i.e. the
    label's voxels with a 6-neighbour of another value or on the image's border."""
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        before = (slice(None),) * axis + (slice(None, -1),)
        after = (slice(None),) * axis + (slice(1, None),)
        differ = labels[before] != labels[after]
        edge[before] |= differ
        edge[after] |= differ
        edge[(slice(None),) * axis + (0,)] = True
        edge[(slice(None),) * axis + (-1,)] = True
    edge &= labels != 0
    return edge


def nearest_distances(from_points: np.ndarray, to_points: np.ndarray, device: str | None = None) -> np.ndarray:
    """Distance from every point of ``from_points (n, 3)`` to its nearest point of ``to_points (m, 3)``.

    On the CPU a KD-tree over ``to_points``; on a CUDA device
    every distance, in blocks, on the GPU (exact either way).
    """
    if len(from_points) == 0:
        return np.zeros(0)
    if _on_gpu(device):
        import torch

        targets = torch.as_tensor(to_points, dtype=torch.float64, device=device)
        sources = torch.as_tensor(from_points, dtype=torch.float64, device=device)
        block = max(1, _GPU_BLOCK // max(len(to_points), 1))
        nearest = [torch.cdist(sources[i : i + block], targets).amin(dim=1) for i in range(0, len(sources), block)]
        return torch.cat(nearest).cpu().numpy()
    from scipy.spatial import cKDTree  # here: only a run with label maps needs it

    tree = cKDTree(to_points, balanced_tree=False, compact_nodes=False)
    return tree.query(from_points, k=1)[0]


_GPU_BLOCK = 1 << 26  # distances per block of the GPU's all-pairs search
HD_PERCENTILE = 95.0
NEAR_MM = 3.0
"""Surface distances up to this are found by looking at the voxels around each point (`surface_distances`)."""


def _on_gpu(device: str | None) -> bool:
    return device is not None and str(device).startswith("cuda")


def _offsets_within(radius_mm: float, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets (k, 3) no longer than ``radius_mm`` and their lengths (mm), shortest first."""
    reach = np.floor(radius_mm / spacing).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), axis=-1).reshape(-1, 3)
    lengths = np.sqrt(((grid * spacing) ** 2).sum(axis=1))
    keep = lengths <= radius_mm
    order = np.argsort(lengths[keep], kind="stable")
    return grid[keep][order], lengths[keep][order]


def surface_distances(
    points: np.ndarray, to_surface: np.ndarray, targets: np.ndarray, spacing: np.ndarray, device: str | None = None,
    percentile: float | None = None,
) -> np.ndarray:
    """Distance (mm) from every voxel ``points (n, 3)`` to the nearest voxel of the mask ``to_surface`` (of the
    same box), whose voxels are ``targets (m, 3)``.

    On the CPU the voxels around each point are looked at first, nearest first, up to `NEAR_MM`: the
    first one of ``to_surface`` found gives the exact distance (most of a surface lies within a few
    millimetres of the other's: two thirds even for a registration as poor as the benchmark pair's
    uresnet); the rest are searched in a KD-tree (`nearest_distances`). On a GPU every point is
    searched on the device.

    With ``percentile`` only the distances that percentile reads (`_read_by`) must be exact: where they
    are all among the points found near, the points left stay ``inf`` (each is farther than any found),
    and ``np.percentile`` of the result is the same number without the KD-tree.
    """
    if len(points) == 0:
        return np.zeros(0)
    if _on_gpu(device):
        return nearest_distances(points * spacing, targets * spacing, device)
    offsets, lengths = _offsets_within(NEAR_MM, spacing)
    pad = offsets.max(axis=0)
    padded = np.pad(to_surface, [(int(p), int(p)) for p in pad])
    strides = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1])
    flat_targets = padded.ravel()
    flat = (points + pad) @ strides
    distances = np.full(len(points), np.inf)
    left = np.arange(len(points))
    for offset, length in zip(offsets @ strides, lengths):
        found = flat_targets[flat[left] + offset]
        distances[left[found]] = length
        left = left[~found]
        if len(left) == 0:
            break
    if len(left) and (percentile is None or _read_by(percentile, len(points)) >= len(points) - len(left)):
        distances[left] = nearest_distances(points[left] * spacing, targets * spacing, device)
    return distances


def _read_by(percentile: float, n: int) -> int:
    """The highest order statistic (0-based) of ``n`` values that ``np.percentile`` (linear) interpolates from."""
    return min(int(np.floor((n - 1) * percentile / 100.0)) + 1, n - 1)


def hd95_per_label(
    a: np.ndarray | Volume,
    b: np.ndarray | Volume,
    spacing: Sequence[float],
    labels: Iterable[int] | None = None,
    device: str | None = None,
    workers: int = 1,
) -> dict[int, float]:
    """Symmetric 95th-percentile Hausdorff distance (mm) per label (module docstring).

    ``spacing`` is the voxel size along the array axes i, j, k. Labels absent from both maps are
    omitted; a label present in one map only gives ``inf``. ``device``: see `surface_distances`;
    ``workers``: CPU threads, each scoring its share of the labels (the numbers do not depend on it).
    """
    a, b = _label_pair(a, b)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (a.ndim,) or np.any(spacing_arr <= 0):
        raise InputError(f"spacing must be {a.ndim} positive numbers, got {tuple(spacing)}")
    boxes_a, boxes_b = label_boxes(a), label_boxes(b)
    edges_a, edges_b = surfaces(a), surfaces(b)

    def hd95(label: int) -> float:
        box_a, box_b = boxes_a.get(label), boxes_b.get(label)
        if box_a is None or box_b is None:
            return float("inf")
        box = _union(box_a, box_b)
        surface_a, surface_b = (a[box] == label) & edges_a[box], (b[box] == label) & edges_b[box]
        points_a, points_b = np.argwhere(surface_a), np.argwhere(surface_b)
        a_to_b = surface_distances(points_a, surface_b, points_b, spacing_arr, device, HD_PERCENTILE)
        b_to_a = surface_distances(points_b, surface_a, points_a, spacing_arr, device, HD_PERCENTILE)
        return max(float(np.percentile(a_to_b, HD_PERCENTILE)), float(np.percentile(b_to_a, HD_PERCENTILE)))

    scored = [label for label in _chosen(labels, sorted(set(boxes_a) | set(boxes_b))) if label in boxes_a or label in boxes_b]
    if workers > 1 and not _on_gpu(device) and len(scored) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(scored))) as pool:  # numpy and the KD-tree release the GIL
            return dict(zip(scored, pool.map(hd95, scored)))
    return {label: hd95(label) for label in scored}
