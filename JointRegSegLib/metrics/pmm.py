"""Patch-wise mutual information map (PMM), seed 004 Appendix C.

Definitions (Appendix C; the choices the paper leaves open are marked *):

- Domain D: the boolean ``mask`` (a ROI or brain mask), or the whole image when None.
- Patches P_k: cubes of ``patch``^3 voxels whose corners lie at multiples of ``stride`` along
  each axis, from 0 up to the first corner whose patch reaches the last voxel
  (ceil((N - patch) / stride) * stride; a single patch at 0 when N <= patch). *Parts of a patch
  beyond the image count as outside D. ``stride`` must divide ``patch``.
- Per patch, over the voxels of P_k n D: if their number reaches ``min_fraction * patch^3``
  (*the "minimal sample threshold", default 1/8 = 512 voxels for 16^3), the joint histogram of
  the two images gives the patch score I_k. *Intensities are binned once for the whole domain:
  ``bins`` equal bins over each image's own [min, max] inside D (`similarity.quantise`), so all
  patches share one intensity scale; the default 16 bins keep the 256 joint cells at about 16
  samples each for a full 16^3 patch, which limits the small-sample bias of MI. *I_k is the normalised MI 2 I / (H_F + H_M) in [0, 1]
  (`similarity.arithmetic_normalised_mutual_information`): the paper's main text calls the PMM
  an NMI that reaches 1 only for matching contrasts, while Appendix C's formula is the raw MI
  I_k it normalises. *A patch where both images are constant has no defined NMI and is skipped
  like a patch under the threshold.
- Map: MI_D(r) = (1 / N(r)) sum_{k: r in P_k n D} I_k for r in D, N(r) the number of scored
  patches covering r. *Voxels outside D, and voxels of D that no scored patch covers, are NaN
  (0 would read as "independent intensities"); `pmm_mean` averages the finite values.

Computation: the grid is split into ``stride``^3 blocks (`PatchGrid`, found once per domain: the maps before
and after registration share it); one accumulating scatter of the domain's voxels (torch's ``index_put_``,
straight into 16-bit counts where a patch's count fits) gives every block's joint histogram; box sums over
(patch/stride)^3 neighbouring blocks give every patch's histogram;
NMI is evaluated for all patches at once (c log c from a lookup table); a second box sum over the
patch grid averages, per block, the scores of the patches covering it, so every voxel of a block
gets the same value. Measured on 160x192x224 (2 shared CPU cores): about 0.2 s of CPU per map inside the
benchmark pair's head foreground (2.1 million voxels), after the first (which meets fresh memory); 0.8 s before
the 16-bit counts and the domain-only histogram, 0.55 s before the scatter (``np.bincount``'s 220 MB table of
int64 counts, then converted) and the shared blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..imageio.geometry import Volume
from .similarity import arithmetic_nmi_from_joint, as_array, joint_codes, quantise

BINS = 16  # intensity bins per image (module docstring)
_CHUNK_BYTES = 32 * 2**20  # cap on the block histograms' counts per chunk of patch rows


def _box_sum(x: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Sums of ``width`` consecutive entries along ``axis`` (length shrinks by width - 1)."""
    n = x.shape[axis] - width + 1
    head = (slice(None),) * axis
    out = x[head + (slice(0, n),)].copy()
    for shift in range(1, width):
        out += x[head + (slice(shift, shift + n),)]
    return out


def pmm_map(
    fixed: np.ndarray | Volume,
    warped: np.ndarray | Volume,
    mask: np.ndarray | Volume | None = None,
    patch: int = 16,
    stride: int = 4,
    bins: int = BINS,
    min_fraction: float = 0.125,
) -> np.ndarray:
    """PMM of two images on one grid (module docstring): float32, same shape, NaN outside the map."""
    f, w = as_array(fixed, "fixed image"), as_array(warped, "warped image")
    if f.ndim != 3 or f.shape != w.shape:
        raise InputError(f"PMM needs two 3D images of one shape, got {f.shape} and {w.shape}")
    domain = np.ones(f.shape, dtype=bool) if mask is None else as_array(mask, "mask").astype(bool)
    if domain.shape != f.shape:
        raise InputError(f"mask shape {domain.shape} differs from image shape {f.shape}")
    if not domain.any():
        raise InputError("the PMM mask is empty: give a mask with at least one voxel inside")
    grid = PatchGrid(domain, patch, stride)  # checks the patch size and stride before the images are binned
    return grid.pmm(quantised(f, w, domain, bins), bins, min_fraction)


class PatchGrid:
    """The PMM's patches over one domain (module docstring): the window of patches that reach it and the block of
    every domain voxel, found once for every map on that domain (the fixed image's foreground before and after
    registration)."""

    def __init__(self, domain: np.ndarray, patch: int = 16, stride: int = 4) -> None:
        _check_patches(patch, stride)
        if domain.ndim != 3 or not domain.any():
            raise InputError(f"the PMM needs a non-empty 3D domain, got shape {domain.shape} with {np.count_nonzero(domain)} voxels in it")
        self.domain, self.patch, self.stride = domain, patch, stride
        self.size = int(np.count_nonzero(domain))
        self.window = tuple(_window(axis_mask, patch, stride) for axis_mask in _extents(domain))
        inside = domain[self.window]
        self.n_blocks = tuple(max(-(-n // stride), patch // stride) for n in inside.shape)
        # every domain voxel's block, numbered row by row along i; the voxels are listed in C order, so those of each
        # row of blocks follow one another from row_starts on
        block = (
            (np.arange(inside.shape[0], dtype=np.int32) // stride * (self.n_blocks[1] * self.n_blocks[2]))[:, None, None]
            + (np.arange(inside.shape[1], dtype=np.int32) // stride * self.n_blocks[2])[None, :, None]
            + (np.arange(inside.shape[2], dtype=np.int32) // stride)[None, None, :]
        )
        self.blocks = block[inside]
        before_plane = np.concatenate([[0], np.cumsum(np.count_nonzero(inside, axis=(1, 2)))])
        self.row_starts = before_plane[np.minimum(np.arange(self.n_blocks[0] + 1) * stride, inside.shape[0])]

    def pmm(self, joint: np.ndarray, bins: int = BINS, min_fraction: float = 0.125) -> np.ndarray:
        """The PMM map of the domain's voxels' joint bin codes ``joint`` (in the order ``domain[domain]`` lists them)."""
        _check_fraction(min_fraction)
        if joint.shape != (self.size,):
            raise InputError(f"the PMM needs one joint bin code per voxel of its domain ({self.size}), got {joint.shape}")
        out = np.full(self.domain.shape, np.nan, dtype=np.float32)
        out[self.window] = self._in_window(joint, bins, min_fraction)
        return out

    def _in_window(self, joint: np.ndarray, bins: int, min_fraction: float) -> np.ndarray:
        domain, patch, stride, n_blocks = self.domain[self.window], self.patch, self.stride, self.n_blocks
        shape = domain.shape
        nbb = bins * bins
        width = patch // stride
        blocks_per_row = n_blocks[1] * n_blocks[2]
        cells = self.blocks * np.int64(nbb) + joint  # every domain voxel's histogram cell: its block's, then its code
        n_patches = tuple(nb - width + 1 for nb in n_blocks)
        count_type = torch.int16 if patch**3 <= torch.iinfo(torch.int16).max else torch.int32  # a patch's counts fit
        rows_per_chunk = max(1, _CHUNK_BYTES // (blocks_per_row * nbb * count_type.itemsize) - width + 1)
        min_count = min_fraction * patch**3
        scores = np.full(n_patches, np.nan)
        for p0 in range(0, n_patches[0], rows_per_chunk):
            p1 = min(p0 + rows_per_chunk, n_patches[0])
            b0, b1 = p0, p1 + width - 1  # block rows feeding patch rows p0..p1-1
            chunk = cells[self.row_starts[b0] : self.row_starts[b1]] - b0 * blocks_per_row * nbb
            hist = _counts(chunk, (b1 - b0) * blocks_per_row * nbb, count_type).reshape(b1 - b0, n_blocks[1], n_blocks[2], nbb)
            for axis in range(3):
                hist = _box_sum(hist, width, axis)
            counted = hist.sum(axis=-1) >= min_count
            if counted.any():  # a chunk of rows outside the domain scores nothing (reshape(-1, ...) of 0 items fails)
                scores[p0:p1][counted] = arithmetic_nmi_from_joint(hist[counted].reshape(-1, bins, bins))

        scored = np.isfinite(scores)
        total = np.pad(np.where(scored, scores, 0.0), width - 1)
        count = np.pad(scored.astype(np.int32), width - 1)
        for axis in range(3):
            total, count = _box_sum(total, width, axis), _box_sum(count, width, axis)
        with np.errstate(invalid="ignore", divide="ignore"):
            block_mean = np.where(count > 0, total / count, np.nan).astype(np.float32)  # the map's type before it is spread
        voxel_mean = block_mean.repeat(stride, 0).repeat(stride, 1).repeat(stride, 2)[: shape[0], : shape[1], : shape[2]]
        return np.where(domain, voxel_mean, np.float32(np.nan))


def _check_patches(patch: int, stride: int) -> None:
    if patch < 1 or stride < 1 or patch % stride:
        raise InputError(f"the stride ({stride}) must be a positive divisor of the patch size ({patch})")


def _check_fraction(min_fraction: float) -> None:
    if not 0.0 < min_fraction <= 1.0:
        raise InputError(f"min_fraction must lie in (0, 1], got {min_fraction}")


def _extents(domain: np.ndarray) -> list[tuple[int, int, int]]:
    """Per axis: (first, last) index holding domain voxels, and the axis length."""
    extents = []
    for axis in range(3):
        occupied = np.flatnonzero(domain.any(axis=tuple(a for a in range(3) if a != axis)))
        extents.append((int(occupied[0]), int(occupied[-1]), domain.shape[axis]))
    return extents


def _window(extent: tuple[int, int, int], patch: int, stride: int) -> slice:
    """The part of an axis whose patches reach the domain: from the first patch corner (a multiple of
    ``stride``) whose patch reaches the domain's first voxel, to a patch beyond its last voxel.

    Every patch that holds a domain voxel lies inside it with its corner at the same multiple of the
    stride, and no patch that lies inside it is cut short anywhere but at the image's end, so the map
    computed on the window equals the map of the whole image there (and is NaN elsewhere either way).
    """
    first, last, length = extent
    start = max(0, (first - patch + 1) // stride * stride)
    return slice(start, min(length, last + patch))


def quantised(f: np.ndarray, w: np.ndarray, domain: np.ndarray, bins: int) -> np.ndarray:
    """Joint bin code of every domain voxel (`joint_codes`; each image binned over its own range in the domain)."""
    return joint_codes(quantise(f[domain], bins), quantise(w[domain], bins), bins)


def _counts(cells: np.ndarray, size: int, count_type: torch.dtype) -> np.ndarray:
    """How often each of ``size`` cells occurs in ``cells``, counted straight into ``count_type``: `np.bincount`'s
    int64 table of the block histograms (220 MB on the benchmark pair, nearly all zeros) and its conversion took
    0.14 s per map, torch's accumulating scatter into 16-bit counts 0.02 s."""
    counts = torch.zeros(size, dtype=count_type)
    one = torch.ones(1, dtype=counts.dtype).expand(len(cells))
    return counts.index_put_((torch.from_numpy(cells),), one, accumulate=True).numpy()


def pmm_mean(pmm: np.ndarray | Volume, mask: np.ndarray | Volume | None = None) -> float:
    """Mean of the finite PMM values (inside ``mask`` when given); NaN when there is none."""
    values = as_array(pmm, "PMM")
    if mask is not None:
        m = as_array(mask, "mask").astype(bool)
        if m.shape != values.shape:
            raise InputError(f"mask shape {m.shape} differs from the PMM's shape {values.shape}")
        values = values[m]
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
