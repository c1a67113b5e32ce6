"""Label maps -> the regions SegReg registers separately (seed 001, "Influence of the Number of Segmentation Classes").

A *region* is a group of label codes; region 0 always holds the background code 0, so the region
masks of a label map partition the image (``sum_i S^i = 1``, as the composition needs). Modes:

- ``"all"``: every label code its own region (the paper's finest mode, "mode2");
- ``"coarse"``: codes grouped into anatomical classes through their FreeSurfer lookup-table names
  (`JointRegSegLib.labels`): cerebral white matter (with the corpus callosum, optic chiasm and
  white-matter hypointensities), cerebral cortex (also FreeSurfer's cortical parcels, codes
  1000-2999 and 11100-12999, which our table does not list), ventricles and CSF (with choroid
  plexus), cerebellum, brainstem, hippocampus and amygdala, deep grey matter (thalamus, caudate,
  putamen, pallidum, accumbens, ventral DC, vessels, non-WM hypointensities, lesions) and
  extra-cerebral tissue (SynthSeg's classes >= 500). Left and right are one class (a coarse mode
  should be coarse; use ``"all"`` or a number for more regions). Codes the table does not know
  stay regions of their own. This is the automatic grouping for FreeSurfer-style maps with many
  small structures;
- ``N`` (an integer >= 1): exactly ``N`` regions (fewer when the maps have fewer), made from the
  ``"all"`` regions by repeatedly merging the smallest non-background region (fixed-map voxel
  count) into the non-background region it shares the most voxel faces with in the fixed map
  (into the largest non-background region when it touches none; into the background only when no
  other region is left). ``1`` is the whole image as one region (a globally smooth registration);
  ``2`` is background + foreground (the paper's "mode0"). Works for any label map, FreeSurfer or
  not.

Fallbacks (recorded in `RegionPlan.reassigned`): a region present in only one of the two maps
(after resampling onto the network grid, e.g. a tiny structure one subject lacks) cannot be
matched, so its voxels join the region of the nearest voxel of a matched region in that map
(Euclidean distance transform). Maps sharing no region other than the background raise
`InputError`.

Label maps named by segment names rather than codes (Slicer segmentations) are mapped onto
FreeSurfer codes with `codes_from_names`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..labels import LUT, label_info

MODES = ("all", "coarse")
BACKGROUND = "background"

# Coarse anatomical classes: (class, keywords found in the lower-cased LUT name). First match wins,
# so the more specific keywords come first ("non-wm-hypointensities" before "wm-hypointensities").
_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("deep grey matter", ("thalamus", "caudate", "putamen", "pallidum", "accumbens", "ventraldc", "vessel",
                          "non-wm-hypointensities", "lesion")),
    ("cerebral white matter", ("cerebral-white-matter", "wm-hypointensities", "cc_", "optic-chiasm")),
    ("cerebral cortex", ("cerebral-cortex",)),
    ("ventricles and CSF", ("ventricle", "inf-lat-vent", "csf", "choroid-plexus", "exterior-fluid")),
    ("cerebellum", ("cerebellum",)),
    ("brainstem", ("brain-stem",)),
    ("hippocampus and amygdala", ("hippocampus", "amygdala")),
    ("extra-cerebral", ("skull", "extra-cerebral")),
)
# FreeSurfer code ranges outside our table: cortical parcels (aparc, aparc.a2009s) and white-matter parcels.
_RANGES: tuple[tuple[int, int, str], ...] = (
    (1000, 3000, "cerebral cortex"),
    (11100, 13000, "cerebral cortex"),
    (3000, 5000, "cerebral white matter"),
)


@dataclass
class RegionPlan:
    """The regions of a pair of label maps, and each map's voxels assigned to them.

    ``fixed`` and ``moving`` are int16 arrays of region indices (0 .. n - 1, region 0 the
    background group); ``names[r]`` and ``codes[r]`` describe region r; ``reassigned`` lists the
    regions found in one map only and where their voxels went.
    """

    fixed: np.ndarray
    moving: np.ndarray
    names: list[str]
    codes: list[tuple[int, ...]]
    reassigned: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.names)

    def summary(self) -> dict:
        """Plain-data description (for a result's details)."""
        return {
            "count": self.count,
            "names": self.names,
            "codes": [list(c) for c in self.codes],
            "fixed_voxels": np.bincount(self.fixed.ravel(), minlength=self.count).tolist(),
            "moving_voxels": np.bincount(self.moving.ravel(), minlength=self.count).tolist(),
            "reassigned": self.reassigned,
        }


def parse_regions(value: object) -> str | int:
    """``"all"``, ``"coarse"`` or a positive region count, from an option value (str or int)."""
    if isinstance(value, bool):
        raise InputError(f"regions must be 'all', 'coarse' or a number of regions; got {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        count = int(value)
        if count < 1:
            raise InputError(f"the number of regions must be at least 1; got {count}")
        return count
    if isinstance(value, str) and value.strip().lower() in MODES:
        return value.strip().lower()
    raise InputError(f"regions must be 'all', 'coarse' or a number of regions (e.g. 2); got {value!r}")


def coarse_class(code: int) -> str:
    """The anatomical class of a label code (see the module docstring); unknown codes name themselves."""
    if code == 0:
        return BACKGROUND
    if code >= 500 and code not in LUT and code < 1000:
        return "extra-cerebral"
    for low, high, name in _RANGES:
        if low <= code < high:
            return name
    label_name = label_info(code).name.lower()
    if code in LUT:
        for name, keywords in _CLASSES:
            if any(k in label_name for k in keywords):
                return name
    return label_info(code).name


def _normalised(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_NAME = {_normalised(label.name): code for code, label in LUT.items()}


def codes_from_names(labels: np.ndarray, names: dict[int, str]) -> np.ndarray:
    """Relabel a map whose values are named (e.g. Slicer segments) onto FreeSurfer codes by name.

    Names are matched ignoring case and punctuation ("left hippocampus" = "Left-Hippocampus").
    Values whose name the table does not know raise `InputError` naming them.
    """
    out = np.zeros_like(labels)
    unknown = []
    for value in np.unique(labels).tolist():
        if value == 0:
            continue
        code = _BY_NAME.get(_normalised(names.get(value, "")))
        if code is None:
            unknown.append(f"{value} ({names.get(value, 'no name')!r})")
            continue
        out[labels == value] = code
    if unknown:
        raise InputError(
            "these segments have no FreeSurfer lookup-table name, so they cannot be matched between the "
            f"images: {', '.join(unknown)}; rename them (e.g. 'Left-Hippocampus') or give label maps with codes."
        )
    return out


def _groups(codes: list[int], mode: str | int) -> tuple[list[str], list[tuple[int, ...]]]:
    """Region names and code groups (background first) for the codes of both maps."""
    if mode == "coarse":
        by_class: dict[str, list[int]] = {}
        for code in codes:
            by_class.setdefault(coarse_class(code), []).append(code)
        names = [BACKGROUND] + sorted(n for n in by_class if n != BACKGROUND)
        return names, [tuple(by_class.get(n, [])) for n in names]
    others = [c for c in codes if c != 0]
    return [BACKGROUND] + [label_info(c).name for c in others], [(0,)] + [(c,) for c in others]


def _codes(labels: np.ndarray) -> set[int]:
    """The label codes present (bincount for the usual small non-negative codes)."""
    if labels.size and labels.min() >= 0 and labels.max() < 1 << 20:
        return set(np.flatnonzero(np.bincount(labels.ravel().astype(np.int64))).tolist())
    return set(np.unique(labels).tolist())


def _region_map(labels: np.ndarray, groups: list[tuple[int, ...]]) -> np.ndarray:
    lookup = {code: r for r, group in enumerate(groups) for code in group}
    if labels.min() >= 0 and labels.max() < 1 << 20:
        table = np.zeros(int(labels.max()) + 1, dtype=np.int16)
        for code, region in lookup.items():
            if code < table.size:
                table[code] = region
        return table[labels]
    values, inverse = np.unique(labels, return_inverse=True)
    return np.array([lookup[int(v)] for v in values], dtype=np.int16)[inverse].reshape(labels.shape)


def _fill_from_nearest(region_map: np.ndarray, keep: np.ndarray, reach: int = 8) -> np.ndarray:
    """Voxels of regions not kept take the region of the nearest voxel of a kept region.

    The distance transform runs on the box of the dropped voxels widened by ``reach`` voxels
    (the whole grid when that box holds no kept voxel).
    """
    drop = ~keep[region_map]
    if not drop.any():
        return region_map
    where = np.nonzero(drop)
    box = tuple(slice(max(int(w.min()) - reach, 0), int(w.max()) + 1 + reach) for w in where)
    if drop[box].all():
        box = tuple(slice(None) for _ in range(3))
    _, index = ndimage.distance_transform_edt(drop[box], return_indices=True)
    out = region_map.copy()
    out[box] = region_map[box][tuple(index)]
    return out


def _adjacency(region_map: np.ndarray, count: int) -> np.ndarray:
    """Symmetric counts of voxel faces shared by each pair of regions."""
    touching = np.zeros((count, count), dtype=np.int64)
    for axis in range(3):
        a = np.moveaxis(region_map, axis, 0)
        first, second = a[:-1].ravel().astype(np.int64), a[1:].ravel().astype(np.int64)
        differ = first != second
        np.add.at(touching, (first[differ], second[differ]), 1)
    return touching + touching.T


def _merge_to(plan_map: tuple[np.ndarray, np.ndarray], names: list[str], groups: list[tuple[int, ...]], target: int):
    """Merge regions down to ``target`` (see the module docstring); returns maps, names, groups."""
    fixed, moving = plan_map
    count = len(names)
    owner = list(range(count))  # region -> the region it was merged into (union-find, flattened)
    sizes = np.bincount(fixed.ravel(), minlength=count).astype(np.int64)
    touching = _adjacency(fixed, count)
    alive = [r for r in range(count)]
    while len(alive) > target:
        candidates = [r for r in alive if r != 0]
        if not candidates:
            break
        small = min(candidates, key=lambda r: (sizes[r], r))
        others = [r for r in alive if r not in (0, small)]
        if others:
            border = [(touching[small, r], sizes[r], -r) for r in others]
            into = others[int(np.argmax([b[0] for b in border]))] if max(b[0] for b in border) > 0 else max(
                others, key=lambda r: (sizes[r], -r)
            )
        else:
            into = 0
        sizes[into] += sizes[small]
        touching[into] += touching[small]
        touching[:, into] += touching[:, small]
        touching[into, into] = 0
        touching[small] = 0
        touching[:, small] = 0
        owner = [into if o == small else o for o in owner]
        alive.remove(small)
    new_index = {r: i for i, r in enumerate(alive)}
    remap = np.array([new_index[owner[r]] for r in range(count)], dtype=np.int16)
    merged_groups: list[list[int]] = [[] for _ in alive]
    merged_names: list[list[str]] = [[] for _ in alive]
    for r in range(count):
        merged_groups[remap[r]].extend(groups[r])
        merged_names[remap[r]].append(names[r])
    out_names = [n[0] if len(n) == 1 else f"{n[0]} + {len(n) - 1} more" for n in merged_names]
    return remap[fixed], remap[moving], out_names, [tuple(sorted(g)) for g in merged_groups]


def plan_regions(fixed_labels: np.ndarray, moving_labels: np.ndarray, mode: str | int = "all") -> RegionPlan:
    """Regions of a pair of label maps on one grid (integer arrays), in mode ``"all"``, ``"coarse"`` or ``N``."""
    mode = parse_regions(mode)
    if fixed_labels.shape != moving_labels.shape:
        raise InputError(
            f"the fixed and moving label maps must lie on one grid to plan regions; got shapes "
            f"{fixed_labels.shape} and {moving_labels.shape}"
        )
    fixed_codes = _codes(fixed_labels)
    moving_codes = _codes(moving_labels)
    if not (fixed_codes - {0}) or not (moving_codes - {0}):
        which = "fixed" if not (fixed_codes - {0}) else "moving"
        raise InputError(f"the {which} label map is empty (background only): segreg needs segmented structures.")
    if not (fixed_codes & moving_codes) - {0}:
        raise InputError(
            "the fixed and moving label maps share no label: fixed has "
            f"{_list(fixed_codes)}, moving has {_list(moving_codes)}. Give label maps that use the same codes "
            "(FreeSurfer lookup table), or relabel named segments with codes_from_names."
        )
    names, groups = _groups(sorted(fixed_codes | moving_codes | {0}), "coarse" if mode == "coarse" else "all")
    fixed = _region_map(fixed_labels, groups)
    moving = _region_map(moving_labels, groups)
    in_fixed = np.bincount(fixed.ravel(), minlength=len(names)) > 0
    in_moving = np.bincount(moving.ravel(), minlength=len(names)) > 0
    keep = in_fixed & in_moving
    keep[0] = True
    reassigned = [
        f"{names[r]} (only in the {'fixed' if in_fixed[r] else 'moving'} map): its voxels join the nearest matched region"
        for r in range(len(names))
        if not keep[r] and (in_fixed[r] or in_moving[r])
    ]
    fixed = _fill_from_nearest(fixed, keep)
    moving = _fill_from_nearest(moving, keep)
    kept = np.flatnonzero(keep)
    remap = np.zeros(len(names), dtype=np.int16)
    remap[kept] = np.arange(len(kept), dtype=np.int16)
    fixed, moving = remap[fixed], remap[moving]
    names = [names[r] for r in kept]
    groups = [groups[r] for r in kept]
    if isinstance(mode, int) and mode < len(names):
        fixed, moving, names, groups = _merge_to((fixed, moving), names, groups, mode)
    return RegionPlan(fixed=fixed, moving=moving, names=names, codes=groups, reassigned=reassigned)


def _list(codes: set[int]) -> str:
    shown = sorted(codes - {0})
    text = ", ".join(str(c) for c in shown[:12])
    return text + (f" and {len(shown) - 12} more" if len(shown) > 12 else "")
