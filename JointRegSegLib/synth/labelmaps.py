"""Label maps for synthetic training: SynthSeg's whole-head maps, or smooth-noise argmax maps.

`load_synthseg_maps` reads the SynthSeg training label maps (FreeSurfer codes; SynthSeg generation
classes >= 500 outside the brain), reorients them (default LPS, the index order in which ITK's
identity direction points i, j, k to L, P, S), and resamples each one to the network grid:

- every map is centred on the centre of its own labelled bounding box (like the centre-of-mass
  alignment of the real pairs); a brain-only map (``drop_extracerebral``) loses the spinal canal's
  CSF below the brain as well, like a skull-stripped scan, so the box is the brain's (`_prepare`);
- the grid spacing (mm, isotropic unless given per axis) is either given, or chosen so that the
  largest labelled bounding box of the loaded maps just fits the grid;
- downsampling is mode pooling: nearest-neighbour sampling on a grid ``f`` times finer
  (``f = ceil(spacing / source spacing)`` per axis, so the fine grid is at least the source's
  resolution), then the most frequent label of each ``f``-block (``method="mode"``); or plain
  nearest-neighbour sampling (``method="nearest"``). Outside the source volume is background (0).

The resampled maps are cached in memory (keyed by files, modification times and options), not on
disk. `smooth_noise_labelmap` is SynthMorph's label-free source: the argmax over ``n_labels``
smooth noise volumes, optionally warped by a random smooth deformation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .. import spatial
from ..errors import InputError
from ..labels import EXTRACEREBRAL_FIRST_CODE
from .deform import DeformationOptions, random_deformation, smooth_noise

LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".mgz")
CSF = 24  # FreeSurfer code of the CSF
CSF_MARGIN_MM = 5.0  # CSF kept around the other labels of a brain-only map (`_prepare`)


def _label_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"label-map folder {folder} does not exist: pass the folder of the SynthSeg label maps")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(LABELMAP_SUFFIXES))
    if not files:
        raise InputError(f"no label maps ({', '.join(LABELMAP_SUFFIXES)}) in {folder}")
    return files


def _read_oriented(path: Path, orientation: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Integer label array (reoriented to ``orientation`` axis codes) and its voxel size (mm)."""
    import nibabel as nib  # here: training from the bank (`training.bank`) reads no label-map files

    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    if data.ndim != 3:
        raise InputError(f"{path} is not a 3D label map (shape {data.shape})")
    labels = np.rint(data).astype(np.int16)
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=np.float64)
    if orientation is None:
        return labels, zooms
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(tuple(orientation))
    )
    labels = nib.orientations.apply_orientation(labels, transform)
    zooms = zooms[np.argsort(transform[:, 0])]
    return np.ascontiguousarray(labels), zooms


def _prepare(labels: np.ndarray, zooms: np.ndarray, drop_extracerebral: bool) -> np.ndarray:
    """The map as loaded; with ``drop_extracerebral`` a brain as a skull-stripped scan shows it: the generation
    classes outside the brain set to 0, and so is the CSF more than `CSF_MARGIN_MM` beyond the box of the
    other labels (the spinal canal's CSF, which runs to the map's lower edge and would shift the brain's
    centre by up to 45 mm)."""
    if not drop_extracerebral:
        return labels
    labels = np.where(labels >= EXTRACEREBRAL_FIRST_CODE, 0, labels).astype(labels.dtype)
    tissue = (labels != 0) & (labels != CSF)
    if not tissue.any():
        return labels
    margin = np.ceil(CSF_MARGIN_MM / zooms).astype(int)
    low, high = _box_of(tissue)
    box = tuple(slice(max(0, int(a) - m), int(b) + m + 1) for a, b, m in zip(low, high, margin))
    inside = np.zeros(labels.shape, dtype=bool)
    inside[box] = True
    return np.where((labels == CSF) & ~inside, 0, labels).astype(labels.dtype)


def _box_of(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index per axis holding ``mask`` (which holds something)."""
    bounds = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return np.asarray([b[0] for b in bounds], dtype=np.float64), np.asarray([b[-1] for b in bounds], dtype=np.float64)


def _bounding_box(labels: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """First and last labelled index per axis."""
    labelled = labels != 0
    if not labelled.any():
        raise InputError(f"label map {path} has no labelled voxel (after dropping extra-cerebral labels?)")
    return _box_of(labelled)


def _mode_pool(fine: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Most frequent label of each ``factors`` block (ties: the smallest label)."""
    if all(f == 1 for f in factors):
        return fine
    (i, j, k), (a, b, c) = (s // f for s, f in zip(fine.shape, factors)), factors
    blocks = fine.reshape(i, a, j, b, k, c).transpose(0, 2, 4, 1, 3, 5).reshape(i, j, k, a * b * c)
    best = np.zeros((i, j, k), dtype=fine.dtype)
    best_count = np.full((i, j, k), -1, dtype=np.int16)
    for label in np.unique(blocks):
        count = (blocks == label).sum(axis=-1, dtype=np.int16)
        better = count > best_count
        best[better] = label
        best_count[better] = count[better]
    return best


def _resample(
    labels: np.ndarray,
    zooms: np.ndarray,
    centre: np.ndarray,
    shape: tuple[int, int, int],
    spacing: np.ndarray,
    method: str,
) -> np.ndarray:
    """Sample ``labels`` on an axis-aligned grid of ``shape`` x ``spacing`` mm centred on voxel ``centre``."""
    factors = [max(1, math.ceil(s / z - 1e-6)) if method == "mode" else 1 for s, z in zip(spacing, zooms)]
    indices = []
    for axis in range(3):
        n_fine = shape[axis] * factors[axis]
        step = spacing[axis] / factors[axis] / zooms[axis]
        indices.append(np.rint(centre[axis] + (np.arange(n_fine) - (n_fine - 1) / 2.0) * step).astype(np.int64))
    padded = np.pad(labels, 1)
    clipped = [np.clip(idx + 1, 0, n + 1) for idx, n in zip(indices, labels.shape)]
    fine = padded[np.ix_(*clipped)]
    return _mode_pool(fine, factors)


@lru_cache(maxsize=8)
def _load_cached(
    files: tuple[tuple[str, float], ...],
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float] | None,
    drop_extracerebral: bool,
    orientation: str | None,
    method: str,
) -> np.ndarray:
    paths = [Path(name) for name, _ in files]
    if spacing is None:
        boxes = []
        for path in paths:
            labels, zooms = _read_oriented(path, orientation)
            low, high = _bounding_box(_prepare(labels, zooms, drop_extracerebral), path)
            boxes.append((high - low + 1) * zooms / np.asarray(shape))
        spacing = (float(np.max(boxes)),) * 3
    maps = []
    for path in paths:
        labels, zooms = _read_oriented(path, orientation)
        labels = _prepare(labels, zooms, drop_extracerebral)
        low, high = _bounding_box(labels, path)
        maps.append(_resample(labels, zooms, (low + high) / 2.0, shape, np.asarray(spacing), method))
    result = np.stack(maps)
    result.setflags(write=False)
    return result


def load_synthseg_maps(
    folder: str | Path,
    shape: Sequence[int],
    spacing: float | Sequence[float] | None = None,
    drop_extracerebral: bool = False,
    orientation: str | None = "LPS",
    method: str = "mode",
    max_maps: int | None = None,
) -> np.ndarray:
    """Label maps of ``folder`` resampled to ``shape``: read-only ``int16`` array ``(N, I, J, K)``.

    Args:
        folder: folder of label maps (``.nii.gz``, ``.nii`` or ``.mgz``), read in name order.
        shape: network grid size (I, J, K).
        spacing: grid spacing in mm (one value or three); ``None`` fits the largest labelled
            bounding box of the loaded maps into the grid (isotropic).
        drop_extracerebral: set SynthSeg's extra-cerebral classes (codes >= 500) to background 0.
        orientation: axis codes (nibabel, the direction each index axis increases towards) to
            reorient to; ``"LPS"`` matches ITK's identity direction; ``None`` keeps the file order.
        method: ``"mode"`` (mode pooling) or ``"nearest"``.
        max_maps: use only the first ``max_maps`` files.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"shape must be three positive sizes (I, J, K); got {shape}")
    if method not in ("mode", "nearest"):
        raise InputError(f"method must be 'mode' or 'nearest'; got {method!r}")
    if orientation is not None and (len(orientation) != 3 or set(orientation.upper()) - set("LRAPSI")):
        raise InputError(f"orientation must be three axis codes such as 'LPS' or 'RAS' (or None); got {orientation!r}")
    if spacing is not None:
        spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)))
        if min(spacing) <= 0:
            raise InputError(f"spacing must be positive (mm); got {spacing}")
    files = _label_files(Path(folder))
    if max_maps is not None:
        if max_maps < 1:
            raise InputError(f"max_maps must be >= 1; got {max_maps}")
        files = files[:max_maps]
    key = tuple((str(p.resolve()), p.stat().st_mtime) for p in files)
    return _load_cached(
        key, shape, spacing, bool(drop_extracerebral), None if orientation is None else orientation.upper(), method
    )


def smooth_noise_labelmap(
    shape: Sequence[int],
    n_labels: int,
    generator: torch.Generator,
    batch_size: int = 1,
    resolution: float = 1.0 / 8.0,
    deformation: DeformationOptions | None = DeformationOptions(max_std=2.0, min_std=0.0, resolution=1.0 / 16.0),
) -> torch.Tensor:
    """SynthMorph's label-free source: ``argmax`` over ``n_labels`` smooth noise volumes.

    Each noise volume is standard normal on a control grid (``resolution`` of the grid size,
    see `deform.coarse_shape`) upsampled trilinearly; the argmax map is then deformed by one random
    deformation per sample (``deformation``; ``None`` for none) so label shapes are not only
    blob-like. SynthMorph warps the noise stack before the argmax; since
    ``argmax_l(n_l o phi) = (argmax_l n_l) o phi`` pointwise, warping the argmax map
    (nearest-neighbour, border padding) gives the same map up to the rounding of ``phi`` to the
    nearest voxel, at 1/``n_labels`` of the cost. Returns ``(B, 1, I, J, K)`` int64 labels
    ``0 .. n_labels - 1`` on the generator's device.
    """
    if int(n_labels) < 2:
        raise InputError(f"n_labels must be at least 2; got {n_labels}")
    labels = smooth_noise(shape, generator, batch_size, int(n_labels), resolution).argmax(dim=1, keepdim=True)
    if deformation is None:
        return labels
    disp = random_deformation(labels.shape[2:], generator, batch_size, deformation)
    return spatial.warp(labels.float(), disp, mode="nearest", padding_mode="border").round().long()
