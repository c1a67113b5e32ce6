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

Computation: the grid is split into ``stride``^3 blocks (`PatchGrid`, found once per domain with the number of
domain voxels of every patch: the maps before and after registration share it); one accumulating scatter of the
domain's voxels (torch's ``index_put_``, straight into 16-bit counts where a patch's count fits) gives every block's
joint histogram; box sums over (patch/stride)^3 neighbouring blocks give every patch's histogram; NMI is evaluated
for all patches at once (c log c from a lookup table); a second box sum over the patch grid averages, per block, the
scores of the patches covering it, so every voxel of a block gets the same value (gathered from the blocks' means at
the domain's voxels, whose blocks are known). Measured on 160x192x224 (2 shared CPU cores): about 0.2 s of CPU per
map inside the benchmark pair's head foreground (2.1 million voxels), after the first (which meets fresh memory);
0.8 s before the 16-bit counts and the domain-only histogram, 0.55 s before the scatter (``np.bincount``'s 220 MB
table of int64 counts, then converted) and the shared blocks. With a torch ``device`` (a GPU: `PatchGrid.pmm`) the
histograms and the patches' scores are computed there, in 32-bit counts, the entropies with ``xlogy``; the box sums
spreading the scores over the voxels stay on the CPU (a few hundred thousand patches).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import torch

from ..errors import InputError
from ..imageio.geometry import Volume
from .similarity import arithmetic_nmi_from_joint, as_array, joint_codes, quantise

BINS = 16  # intensity bins per image (module docstring)
_CHUNK_BYTES = 32 * 2**20  # cap on the block histograms' counts per chunk of patch rows
ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


def _box_sum(x: ArrayOrTensor, width: int, axis: int) -> ArrayOrTensor:
    """Sums of ``width`` consecutive entries along ``axis`` (length shrinks by width - 1), of a numpy array or a
    torch tensor (a view of ``x`` when ``width`` is 1)."""
    n = x.shape[axis] - width + 1
    head = (slice(None),) * axis
    out = x[head + (slice(0, n),)]
    if width > 1:
        out = out + x[head + (slice(1, n + 1),)]
    for shift in range(2, width):
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
    """The PMM's patches over one domain (module docstring): the window of patches that reach it, the block of
    every domain voxel and the domain voxels of every patch, found once for every map on that domain (the fixed
    image's foreground before and after registration)."""

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
        in_patch = np.bincount(self.blocks, minlength=int(np.prod(self.n_blocks))).reshape(self.n_blocks)
        for axis in range(3):
            in_patch = _box_sum(in_patch, self.width, axis)
        self.in_patch = in_patch  # |P_k n D| of every patch k
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @property
    def width(self) -> int:
        """A patch's width in blocks."""
        return self.patch // self.stride

    def pmm(
        self, joint: np.ndarray, bins: int = BINS, min_fraction: float = 0.125, device: str | torch.device | None = None
    ) -> np.ndarray:
        """The PMM map of the domain's voxels' joint bin codes ``joint`` (in the order ``domain[domain]`` lists them).

        ``device``: None computes it with numpy on the CPU; a torch device counts the histograms and scores the
        patches there (the GPU path; the same numbers up to the rounding of the entropies' sums). numpy is the CPU's
        path: torch's CPU reductions and table lookups of the 16-bit counts took 4-10 times as long."""
        _check_fraction(min_fraction)
        if joint.shape != (self.size,):
            raise InputError(f"the PMM needs one joint bin code per voxel of its domain ({self.size}), got {joint.shape}")
        scored = self.in_patch >= min_fraction * self.patch**3  # the minimal sample threshold
        scores = self._scores(joint, bins, scored, None if device is None else torch.device(device))
        out = np.full(self.domain.shape, np.nan, dtype=np.float32)
        out[self.window][self.domain[self.window]] = self._block_means(scores).ravel()[self.blocks]  # each voxel its block's
        return out

    def _chunks(self, bins: int, count_bytes: int) -> Iterator[tuple[slice, slice, int, int]]:
        """Rows of patches in chunks whose block histograms (``count_bytes`` a count) stay under ``_CHUNK_BYTES``:
        per chunk, its patch rows, its block rows' voxels (a slice of ``blocks``), the first histogram cell of
        those block rows, and their number."""
        n_patch_rows = self.n_blocks[0] - self.width + 1
        row_cells = self.n_blocks[1] * self.n_blocks[2] * bins * bins
        rows_per_chunk = max(1, _CHUNK_BYTES // (row_cells * count_bytes) - self.width + 1)
        for p0 in range(0, n_patch_rows, rows_per_chunk):
            p1 = min(p0 + rows_per_chunk, n_patch_rows)
            b0, b1 = p0, p1 + self.width - 1  # block rows feeding patch rows p0..p1-1
            yield slice(p0, p1), slice(self.row_starts[b0], self.row_starts[b1]), b0 * row_cells, b1 - b0

    def _scores(self, joint: np.ndarray, bins: int, scored: np.ndarray, device: torch.device | None) -> np.ndarray:
        """I_k of every patch with enough domain voxels (``scored``; NaN elsewhere): with numpy on the CPU (``device``
        None; 16-bit counts where a patch's count fits), else with torch on ``device`` (32-bit counts, entropies from
        ``xlogy``, `_nmi_of_counts`)."""
        nbb = bins * bins
        if device is None:
            cells = self.blocks * np.int64(nbb) + joint  # every domain voxel's histogram cell: its block's, then its code
            count_type = torch.int16 if self.patch**3 <= torch.iinfo(torch.int16).max else torch.int32  # the counts fit
            scores, scored_rows, nmi = np.full(scored.shape, np.nan), scored, arithmetic_nmi_from_joint
        else:
            if device not in self._on_device:
                self._on_device[device] = torch.from_numpy(self.blocks).to(device=device, dtype=torch.int64)
            cells = self._on_device[device] * nbb + torch.from_numpy(joint).to(device)
            count_type = torch.int32
            scores = torch.full(scored.shape, torch.nan, dtype=torch.float64, device=device)
            scored_rows, nmi = torch.from_numpy(scored).to(device), _nmi_of_counts
        for rows, voxels, first, n_rows in self._chunks(bins, count_type.itemsize):
            hist = _counts(cells[voxels] - first, n_rows * self.n_blocks[1] * self.n_blocks[2] * nbb, count_type)
            hist = hist.reshape(n_rows, self.n_blocks[1], self.n_blocks[2], nbb)
            for axis in range(3):
                hist = _box_sum(hist, self.width, axis)
            chosen = scored_rows[rows]
            if chosen.any():  # a chunk of rows outside the domain scores nothing (reshape(-1, ...) of 0 items fails)
                scores[rows][chosen] = nmi(hist[chosen].reshape(-1, bins, bins))
        return scores if device is None else scores.cpu().numpy()

    def _block_means(self, scores: np.ndarray) -> np.ndarray:
        """MI_D(r) = (1 / N(r)) sum_k I_k over the scored patches covering r, for every block (all its voxels share
        it; NaN where no scored patch covers it)."""
        width = self.width
        scored = np.isfinite(scores)
        total = np.pad(np.where(scored, scores, 0.0), width - 1)
        count = np.pad(scored.astype(np.int32), width - 1)
        for axis in range(3):
            total, count = _box_sum(total, width, axis), _box_sum(count, width, axis)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / count, np.nan).astype(np.float32)  # the map's type before it is spread


def _nmi_of_counts(joint: torch.Tensor) -> torch.Tensor:
    """2 I / (H(A) + H(B)) of joint histograms ``(n, B, B)`` of counts, as `arithmetic_nmi_from_joint` (none empty):
    H = log n - (1/n) sum_c c log c."""
    counts = joint.to(torch.float64)
    n = counts.sum(dim=(-2, -1))
    log_n = n.log()

    def entropy(c: torch.Tensor) -> torch.Tensor:
        return log_n - torch.special.xlogy(c, c).sum(dim=-1) / n

    h_a, h_b, h_ab = entropy(counts.sum(dim=-1)), entropy(counts.sum(dim=-2)), entropy(counts.flatten(-2))
    h_sum = h_a + h_b
    return torch.where(h_sum > 0, 2.0 * (h_sum - h_ab) / h_sum, torch.nan)


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


def _counts(cells: ArrayOrTensor, size: int, count_type: torch.dtype) -> ArrayOrTensor:
    """How often each of ``size`` cells occurs in ``cells`` (a numpy array, or a tensor on its device), counted
    straight into ``count_type`` by torch's accumulating scatter, as the same kind: `np.bincount`'s int64 table of the
    block histograms (220 MB on the benchmark pair, nearly all zeros) and its conversion took 0.14 s per map, torch's
    scatter into 16-bit counts 0.02 s."""
    index = torch.from_numpy(cells) if isinstance(cells, np.ndarray) else cells
    counts = torch.zeros(size, dtype=count_type, device=index.device)
    counts.index_put_((index,), torch.ones(1, dtype=count_type, device=index.device).expand(len(index)), accumulate=True)
    return counts.numpy() if isinstance(cells, np.ndarray) else counts


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
