"""What the pictures show, as plain arrays: the slices, windows, outlines and legends of each row of views.

The pictures are made in two steps: this module cuts the slices out of the volumes and chooses what is
drawn (numpy alone, in the process that holds the volumes); `figures` draws them with matplotlib. A
`Picture` holds a few two-dimensional slices and pickles small, so it can be drawn in another process
(the run's pictures are drawn by a child process started with the run, `worker.beside`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..colour_scales import JACOBIAN_FOLDING_RGB, JACOBIAN_FOLDING_TEXT, JACOBIAN_LEGEND, jacobian_control_points, robust_window
from ..errors import InputError
from ..imageio.geometry import Geometry, Volume
from ..labels import label_info
from .slices import Index3, default_index, orthogonal_aspects, orthogonal_slices, tile_parity

if TYPE_CHECKING:
    from matplotlib.colors import Colormap

JACOBIAN_MAP = "jointregseg_jacobian"
"""`Row.cmap` of a Jacobian map: `colormaps.jacobian_colormap` with `colormaps.JacobianNorm`, folding in its own colour."""
PMM_MAP = "jointregseg_pmm"
"""`Row.cmap` of a PMM map: `colormaps.pmm_colormap` over `colour_scales.PMM_RANGE`."""
MAP_ALPHA = 0.65  # opacity of a Jacobian or PMM map over the grey fixed image
LEGEND_LABELS = 12  # outlines: the largest structures named in the legend (a left/right pair counts once)

Views = tuple[np.ndarray, np.ndarray, np.ndarray]
Legend = tuple[tuple[tuple[float, ...], str], ...]


@dataclass
class Row:
    """One row of three views (axial, coronal, sagittal) and how to draw it."""

    label: str
    views: Views
    cmap: Colormap | str = "gray"  # a matplotlib colour map or its name, or JACOBIAN_MAP / PMM_MAP
    window: tuple[float, float] = (0.0, 1.0)  # the values at the colour map's ends (not for the two maps)
    contours: Views | None = None  # label slices whose outlines are drawn over the views
    colorbar: str | None = None  # the colour bar's label, where the row has one
    extend: str = "neither"
    legend: Legend = ()
    underlay: Views | None = None  # grey anatomy under a map
    alpha: float = 1.0

    @property
    def plain(self) -> bool:
        """Drawn as images alone: no underlay, outlines, colour bar or legend."""
        return self.underlay is None and self.contours is None and not self.colorbar and not self.legend


@dataclass
class Picture:
    """One PNG: its rows, the views' pixel aspects (`slices.orthogonal_aspects`) and a title over them all."""

    rows: list[Row]
    aspects: tuple[float, float, float]
    title: str = ""


class Windows:
    """The robust window of each 3D array drawn, computed once per array (a percentile of every voxel)."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[np.ndarray, tuple[float, float]]] = {}

    def __call__(self, array: np.ndarray) -> tuple[float, float]:
        known = self._known.get(id(array))
        if known is None or known[0] is not array:
            known = (array, robust_window(array))
            self._known[id(array)] = known
        return known[1]

    def remember(self, array: np.ndarray, window: tuple[float, float]) -> None:
        """``array``'s window, computed elsewhere (it must be `robust_window`'s)."""
        self._known[id(array)] = (array, window)


def array_of(image: Volume | np.ndarray, name: str) -> np.ndarray:
    """The 3D array of an image, or InputError naming it."""
    array = np.asarray(image.array if isinstance(image, Volume) else image)
    if array.ndim != 3:
        raise InputError(f"{name} must be a 3D scalar volume [i, j, k], got an array of shape {array.shape}.")
    return array


def _check_same_shape(arrays: dict[str, np.ndarray]) -> None:
    """Every array of the shape of the first, or InputError saying which to resample."""
    names = list(arrays)
    reference = arrays[names[0]].shape
    for name in names[1:]:
        if arrays[name].shape != reference:
            raise InputError(
                f"{name} has shape {arrays[name].shape} but {names[0]} has shape {reference}: "
                f"resample every volume onto the {names[0]} grid before making the figure."
            )


def _windowed(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    return np.clip((np.asarray(array, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def label_colour(label: int) -> tuple[float, ...]:
    """The label's FreeSurfer colour (as in Slicer's segmentations); white matter's is near white."""
    return tuple(c / 255.0 for c in label_info(int(label)).rgb)


def _jacobian_legend() -> Legend:
    ramp = {p[0]: p[1:] for p in jacobian_control_points()}
    return tuple((ramp[value], text) for value, text in JACOBIAN_LEGEND) + ((JACOBIAN_FOLDING_RGB, JACOBIAN_FOLDING_TEXT),)


def grey_row(label: str, array: np.ndarray, index: Index3, geometry: Geometry | None, windows: Windows) -> Row:
    """The image in grey, windowed by its robust window."""
    return Row(label, orthogonal_slices(array, index, geometry), "gray", windows(array))


def checkerboard_row(fixed: np.ndarray, warped: np.ndarray, index: Index3, geometry: Geometry | None, windows: Windows) -> Row:
    """Each image windowed by its own robust window, in alternating tiles (`checkerboard`), cut from the slices alone."""
    parity = orthogonal_slices(tile_parity(fixed.shape), index, geometry)
    views = tuple(
        np.where(p == 1, _windowed(w, windows(warped)), _windowed(f, windows(fixed)))
        for p, f, w in zip(parity, orthogonal_slices(fixed, index, geometry), orthogonal_slices(warped, index, geometry))
    )
    return Row("checkerboard fixed / warped", views, "gray", (0.0, 1.0))


def _within(values: Views, mask: Views | None) -> Views:
    """Slices of ``values`` as float, NaN (drawn transparent) outside the slices of ``mask``."""
    floats = tuple(v.astype(np.float64) for v in values)
    return floats if mask is None else tuple(np.where(m, v, np.nan) for v, m in zip(floats, mask))


def jacobian_row(
    jacobian: np.ndarray, index: Index3, geometry: Geometry | None, fixed: np.ndarray, part: str, mask: np.ndarray | None
) -> Row:
    """det J over the grey fixed image (inside ``mask`` where given), with colour bar and legend."""
    masked = None if mask is None else orthogonal_slices(mask, index, geometry)
    return Row(
        f"Jacobian ({part.split()[0]})\nover fixed",
        _within(orthogonal_slices(jacobian, index, geometry), masked),
        JACOBIAN_MAP,
        colorbar=f"det J ({part})",
        extend="both",
        legend=_jacobian_legend(),
        underlay=orthogonal_slices(fixed, index, geometry),
        alpha=MAP_ALPHA,
    )


def pmm_row(pmm: np.ndarray, index: Index3, geometry: Geometry | None, fixed: np.ndarray) -> Row:
    """The PMM over the grey fixed image (NaN outside its domain: transparent), with colour bar."""
    views = tuple(v.astype(np.float64) for v in orthogonal_slices(pmm, index, geometry))
    return Row(
        "PMM over fixed", views, PMM_MAP, colorbar="patch NMI (higher = better aligned)",
        extend="max", underlay=orthogonal_slices(fixed, index, geometry), alpha=MAP_ALPHA,
    )


def contour_row(
    label: str, image: np.ndarray, seg: np.ndarray, index: Index3, geometry: Geometry | None, windows: Windows,
    names: dict[int, str] | None = None,
) -> Row:
    """Outlines of every label over the grey image; the largest structures named in the legend (``names`` before
    FreeSurfer's)."""
    row = grey_row(label, image, index, geometry, windows)
    labels = seg if np.issubdtype(seg.dtype, np.integer) else np.rint(seg).astype(np.int64)
    row.contours = orthogonal_slices(labels, index, geometry)
    row.legend = legend_entries(labels, names)
    return row


def legend_entries(labels: np.ndarray, given: dict[int, str] | None = None) -> Legend:
    """The `LEGEND_LABELS` largest structures of a label map, in code order, named by ``given`` or else by
    FreeSurfer's table; a left/right pair, drawn in one colour, is named once ("Cerebral-Cortex (left, right)")."""
    codes, counts = _label_counts(labels)
    groups: dict[tuple[str, tuple[float, ...]], tuple[int, int, list[str]]] = {}
    for code, count in zip(codes.tolist(), counts.tolist()):
        name = (given or {}).get(code) or label_info(code).name
        key = (re.sub(r"^(Left|Right)-", "", name), label_colour(code))
        size, first, names = groups.get(key, (0, code, []))
        groups[key] = (size + count, min(first, code), [*names, name])
    largest = sorted(groups.items(), key=lambda item: -item[1][0])[:LEGEND_LABELS]
    return tuple(
        (colour, f"{base} (left, right)" if len(names) > 1 else names[0])
        for (base, colour), (_, _, names) in sorted(largest, key=lambda item: item[1][1])
    )


def _label_counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positive labels of an integer map and their voxel counts (as ``np.unique(..., return_counts=True)``)."""
    positive = labels[labels > 0]
    if positive.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if int(positive.max()) >= 1 << 22:
        return np.unique(positive, return_counts=True)
    counts = np.bincount(positive.astype(np.intp, copy=False))
    codes = np.flatnonzero(counts)
    return codes, counts[codes]


def individual_pictures(
    fixed: Volume,
    moving: Volume,
    warped: Volume,
    jacobian: Volume | None,
    pmm: Volume | None,
    index: Index3 | None = None,
    jacobian_part: str = "deformable part",
    segmentations: dict[str, tuple[Volume, Volume, str, dict[int, str] | None]] | None = None,
    mask: np.ndarray | None = None,
    windows: Windows | None = None,
) -> dict[str, Picture]:
    """The pictures fixed, moving, warped, checkerboard, jacobian and pmm (the last two only when given; the maps
    over the fixed image, the Jacobian inside ``mask`` where given), all through the same point, and one for each
    of ``segmentations`` (``name: (image, label map, title, legend names or None)``, `segmentation_picture`);
    ``windows``: the grey levels of images whose windows are known already."""
    arrays = {name: array_of(v, name) for name, v in (("fixed", fixed), ("moving", moving), ("warped", warped))}
    arrays.update({name: array_of(v, name) for name, v in (("jacobian", jacobian), ("pmm", pmm)) if v is not None})
    _check_same_shape(arrays)
    geometry = fixed.geometry if isinstance(fixed, Volume) else None
    index = default_index(arrays["fixed"]) if index is None else index
    aspects = orthogonal_aspects(geometry)
    windows = windows or Windows()
    rows = {
        "fixed": grey_row("fixed", arrays["fixed"], index, geometry, windows),
        "moving": grey_row("moving (on the fixed grid)", arrays["moving"], index, geometry, windows),
        "warped": grey_row("warped moving", arrays["warped"], index, geometry, windows),
        "checkerboard": checkerboard_row(arrays["fixed"], arrays["warped"], index, geometry, windows),
    }
    if "jacobian" in arrays:
        rows["jacobian"] = jacobian_row(arrays["jacobian"], index, geometry, arrays["fixed"], jacobian_part, mask)
    if "pmm" in arrays:
        rows["pmm"] = pmm_row(arrays["pmm"], index, geometry, arrays["fixed"])
    pictures = {name: Picture([row], aspects) for name, row in rows.items()}
    for name, (image, seg, title, names) in (segmentations or {}).items():
        pictures[name] = segmentation_picture(image, seg, title, windows, names)
    return pictures


def segmentation_picture(
    image: Volume | np.ndarray, seg: Volume | np.ndarray, title: str, windows: Windows | None = None,
    names: dict[int, str] | None = None,
) -> Picture:
    """One row of three views: the outlines of ``seg``'s labels over ``image`` (both on one grid, which may differ
    from the fixed image's), through the segmentation's centre of mass, main structures named (by ``names`` where
    given, else by FreeSurfer's table)."""
    arrays = {"image": array_of(image, "image"), "segmentation": array_of(seg, "segmentation")}
    _check_same_shape(arrays)
    geometry = image.geometry if isinstance(image, Volume) else None
    index = default_index(arrays["segmentation"])
    row = contour_row(title, arrays["image"], arrays["segmentation"], index, geometry, windows or Windows(), names)
    return Picture([row], orthogonal_aspects(geometry))


def registration_picture(
    fixed: Volume,
    moving: Volume,
    warped: Volume,
    jacobian: Volume | None = None,
    pmm: Volume | None = None,
    fixed_seg: Volume | np.ndarray | None = None,
    warped_seg: Volume | np.ndarray | None = None,
    title: str = "",
    index: Index3 | None = None,
    jacobian_part: str = "deformable part",
    mask: np.ndarray | None = None,
) -> Picture:
    """One picture of rows fixed, moving, warped, checkerboard, then (when given) Jacobian, PMM, fixed segmentation
    contours over the warped image and warped segmentation contours over the fixed image; three orthogonal views
    per row through ``index`` (default: centre of mass of the fixed segmentation if given, else of the fixed
    image's nonzero voxels). Every volume must be on the fixed grid (same shape), else `InputError`."""
    arrays = {name: array_of(v, name) for name, v in (("fixed", fixed), ("moving", moving), ("warped", warped))}
    optional = {"jacobian": jacobian, "pmm": pmm, "fixed_seg": fixed_seg, "warped_seg": warped_seg}
    arrays.update({name: array_of(value, name) for name, value in optional.items() if value is not None})
    _check_same_shape(arrays)
    geometry = fixed.geometry if isinstance(fixed, Volume) else None
    if index is None:
        index = default_index(arrays["fixed_seg"] if "fixed_seg" in arrays else arrays["fixed"])
    windows = Windows()
    rows = [
        grey_row("fixed", arrays["fixed"], index, geometry, windows),
        grey_row("moving", arrays["moving"], index, geometry, windows),
        grey_row("warped moving", arrays["warped"], index, geometry, windows),
        checkerboard_row(arrays["fixed"], arrays["warped"], index, geometry, windows),
    ]
    if "jacobian" in arrays:
        rows.append(jacobian_row(arrays["jacobian"], index, geometry, arrays["fixed"], jacobian_part, mask))
    if "pmm" in arrays:
        rows.append(pmm_row(arrays["pmm"], index, geometry, arrays["fixed"]))
    if "fixed_seg" in arrays:
        rows.append(contour_row("warped + fixed seg", arrays["warped"], arrays["fixed_seg"], index, geometry, windows))
    if "warped_seg" in arrays:
        rows.append(contour_row("fixed + warped seg", arrays["fixed"], arrays["warped_seg"], index, geometry, windows))
    return Picture(rows, orthogonal_aspects(geometry), title)
