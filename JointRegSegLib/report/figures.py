"""PNG pictures of a registration result: orthogonal views of the images, checkerboard, maps, contours.

All volumes given to one call must be on the same grid (the caller resamples; shapes are checked).
Views follow the radiological display convention of `JointRegSegLib.report.slices`, oriented by the
fixed image's geometry. Grey-level images are windowed by their own robust percentiles (1, 99).
Matplotlib is used through `Figure` + `FigureCanvasAgg` only: no pyplot state, no open figures.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import patheffects
from contourpy import LineType, contour_generator
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.path import Path as MplPath

from JointRegSegLib.errors import InputError
from JointRegSegLib.imageio.geometry import Geometry, Volume

from ..colour_scales import (
    JACOBIAN_FOLDING_RGB,
    JACOBIAN_FOLDING_TEXT,
    JACOBIAN_LEGEND,
    JACOBIAN_RANGE,
    PMM_RANGE,
    jacobian_control_points,
    robust_window,
)
from ..labels import label_info
from .colormaps import JacobianNorm, jacobian_colormap, pmm_colormap
from .slices import Index3, default_index, orthogonal_aspects, orthogonal_slices, tile_parity

VIEW_NAMES: tuple[str, str, str] = ("axial", "coronal", "sagittal")
# (left, right, top, bottom) patient directions at the edges of each view (see slices.py).
_EDGE_LETTERS = (("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I"))
_ROW_INCHES = 2.0
_SIDE_COLUMN = 1.6  # width ratio of the column holding colour bars and legends
_LEGEND_POINTS = 7
_MARGINS = (0.35, 0.05, 0.22, 0.05)  # inches left (row labels), right, top (view names), bottom: a fixed layout,
# which costs a fraction of matplotlib's constrained layout (a third of each picture's time)
MAP_ALPHA = 0.65  # opacity of a Jacobian or PMM map over the grey fixed image
LEGEND_LABELS = 12  # outlines: the largest structures named in the legend (a left/right pair counts once)
_TITLE_CHARACTERS = 22  # row titles and colour-bar labels are wrapped to lines this long (they run along one row)
PNG_COMPRESSION = 1  # zlib level of the PNG files: fast (the default 6 costs more time than the pictures are worth)


@dataclass
class _Row:
    """One row of three views and how to draw it."""

    label: str
    views: tuple[np.ndarray, np.ndarray, np.ndarray]
    cmap: Colormap | str = "gray"
    norm: Normalize | None = None
    contours: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    colorbar: str | None = None
    bar_norm: Normalize | None = None
    extend: str = "neither"
    legend: tuple[tuple[tuple[float, ...], str], ...] = ()
    underlay: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # grey anatomy under a map
    alpha: float = 1.0


def _array_of(image: Volume | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(image.array if isinstance(image, Volume) else image)
    if array.ndim != 3:
        raise InputError(f"{name} must be a 3D scalar volume [i, j, k], got an array of shape {array.shape}.")
    return array


def _check_same_grid(arrays: dict[str, np.ndarray]) -> None:
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


class _Windows:
    """The robust window of each 3D array drawn, computed once per array (a percentile of every voxel)."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[np.ndarray, tuple[float, float]]] = {}

    def __call__(self, array: np.ndarray) -> tuple[float, float]:
        known = self._known.get(id(array))
        if known is None or known[0] is not array:
            known = (array, robust_window(array))
            self._known[id(array)] = known
        return known[1]


def _jacobian_legend() -> tuple[tuple[tuple[float, ...], str], ...]:
    ramp = {p[0]: p[1:] for p in jacobian_control_points()}
    return tuple((ramp[value], text) for value, text in JACOBIAN_LEGEND) + ((JACOBIAN_FOLDING_RGB, JACOBIAN_FOLDING_TEXT),)


def _label_color(label: int) -> tuple[float, ...]:
    """The label's FreeSurfer colour (as in Slicer's segmentations); white matter's is near white."""
    return tuple(c / 255.0 for c in label_info(int(label)).rgb)


def _draw_contours(ax, labels_2d: np.ndarray) -> None:
    """Each label's outline (the 0.5 level of its mask, as ``ax.contour`` draws it), all in one line collection.

    The lines come from contourpy, the generator behind ``ax.contour``, with matplotlib's algorithm
    (``mpl2014``): the same lines without building a contour set per label.
    """
    paths, colours = [], []
    for label in np.unique(labels_2d):
        if label == 0:
            continue
        mask = (labels_2d == label).astype(np.float64)
        if mask.min() == mask.max():
            continue
        points, codes = contour_generator(z=mask, name="mpl2014", line_type=LineType.SeparateCode).lines(0.5)
        paths += [MplPath(p, c) for p, c in zip(points, codes)]
        colours += [_label_color(label)] * len(points)
    if paths:
        ax.add_collection(PathCollection(paths, facecolors="none", edgecolors=colours, linewidths=0.8), autolim=False)


def _render(rows: list[_Row], aspects: tuple[float, float, float], path: str | Path, title: str, dpi: int) -> Path:
    return _save(_figure(rows, aspects, title), Path(path), dpi)


def _plain(row: _Row) -> bool:
    """A row drawn as images alone: no underlay, outlines, colour bar or legend (`_render_plain`)."""
    return row.underlay is None and row.contours is None and not row.colorbar and not row.legend


def _render_plain(rows: dict[str, _Row], aspects: tuple[float, float, float], folder: Path, dpi: int) -> dict[str, Path]:
    """One-row pictures ``folder/<name>.png`` of `_plain` rows of one shape and colour map: one figure, drawn for
    the first row and then for each other with its views, window and title put in (the same pixels as a figure
    built for each, at a fraction of the time)."""
    written: dict[str, Path] = {}
    figure = None
    for name, row in rows.items():
        if figure is None:
            figure = _figure([row], aspects, "")
            views = [ax.images[-1] for ax in figure.axes[:3]]
        else:
            for image, view in zip(views, row.views):
                image.set_data(view)
                image.set_norm(row.norm)
            figure.axes[0].set_ylabel(_wrapped(row.label), fontsize=8)
        written[name] = _save(figure, folder / f"{name}.png", dpi)
    return written


def _save(figure: Figure, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, facecolor="white", pil_kwargs={"compress_level": PNG_COMPRESSION})
    return path


def _figure(rows: list[_Row], aspects: tuple[float, float, float], title: str) -> Figure:
    """The rows drawn as one figure: three views per row, a side column with colour bar or legend."""
    widths = [view.shape[1] / (view.shape[0] * aspect) for view, aspect in zip(rows[0].views, aspects)]
    has_side = any(row.colorbar or row.legend for row in rows)
    ratios = widths + ([_SIDE_COLUMN] if has_side else [])
    left, right, top, bottom = _MARGINS
    right += _legend_overflow(rows)
    size = (_ROW_INCHES * sum(ratios) + left + right, _ROW_INCHES * len(rows) + top + bottom + (0.3 if title else 0.0))
    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(
        len(rows), len(ratios), width_ratios=ratios, left=left / size[0], right=1 - right / size[0],
        top=1 - (top + (0.3 if title else 0.0)) / size[1], bottom=bottom / size[1], wspace=0.04, hspace=0.06,
    )
    for r, row in enumerate(rows):
        image = None
        for c, (view, aspect) in enumerate(zip(row.views, aspects)):
            ax = figure.add_subplot(grid[r, c])
            ax.set_facecolor("black")
            if row.underlay is not None:
                low, high = robust_window(row.underlay[c])
                ax.imshow(row.underlay[c], cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest", origin="upper")
            image = ax.imshow(
                view, cmap=row.cmap, norm=row.norm, aspect=aspect, interpolation="nearest", origin="upper", alpha=row.alpha
            )
            if row.contours is not None:
                _draw_contours(ax, row.contours[c])
                ax.set_xlim(-0.5, view.shape[1] - 0.5)
                ax.set_ylim(view.shape[0] - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(_wrapped(row.label), fontsize=8)
            if r == 0:
                ax.set_title(VIEW_NAMES[c], fontsize=8)
                _edge_letters(ax, _EDGE_LETTERS[c])
        if has_side:
            side = figure.add_subplot(grid[r, len(ratios) - 1])
            side.set_axis_off()
            if row.colorbar:
                cax = side.inset_axes([0.0, 0.08, 0.1, 0.84])
                mappable = image if row.bar_norm is None else ScalarMappable(row.bar_norm, row.cmap)
                bar = figure.colorbar(mappable, cax=cax, extend=row.extend, alpha=1.0)
                bar.set_label(_wrapped(row.colorbar), fontsize=7)
                bar.ax.tick_params(labelsize=6)
            if row.legend:
                handles = [Patch(facecolor=colour, edgecolor="0.5", label=text) for colour, text in row.legend]
                side.legend(
                    handles=handles,
                    loc="center left",
                    bbox_to_anchor=(0.3, 0.5),
                    fontsize=_LEGEND_POINTS,
                    frameon=False,
                    handlelength=1.0,
                )
    if title:  # in the band kept above the view titles, from the top edge down (matplotlib's default height
        # is a fraction of the figure: on a tall figure it ran into the view titles)
        figure.suptitle(title, fontsize=10, y=1 - 0.06 / size[1], va="top")
    return figure


def _wrapped(text: str) -> str:
    """``text`` in lines of at most `_TITLE_CHARACTERS` (its own line breaks kept), so it fits along one row."""
    return "\n".join(textwrap.fill(line, _TITLE_CHARACTERS) for line in text.split("\n"))


def _legend_overflow(rows: list[_Row]) -> float:
    """Inches a legend reaches past the side column (it starts 30 % into it): its longest name at the
    legend's font size, about 0.6 em a character, after the colour patch."""
    longest = max((len(text) for row in rows for _, text in row.legend), default=0)
    needed = 0.3 * _ROW_INCHES * _SIDE_COLUMN + 0.35 + longest * _LEGEND_POINTS * 0.6 / 72.0
    return max(0.0, needed - _ROW_INCHES * _SIDE_COLUMN) if longest else 0.0


def _edge_letters(ax, letters: tuple[str, str, str, str]) -> None:
    outline = [patheffects.withStroke(linewidth=1.5, foreground="black")]
    style = dict(transform=ax.transAxes, color="yellow", fontsize=6, fontweight="bold", path_effects=outline)
    left, right, top, bottom = letters
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _grey_row(label: str, array: np.ndarray, index: Index3, geometry: Geometry | None, windows: _Windows) -> _Row:
    low, high = windows(array)
    return _Row(label, orthogonal_slices(array, index, geometry), "gray", Normalize(low, high))


def _checkerboard_row(fixed: np.ndarray, warped: np.ndarray, index: Index3, geometry: Geometry | None, windows: _Windows) -> _Row:
    """Each image windowed by its own robust window, in alternating tiles (`checkerboard`), cut from the slices alone."""
    parity = orthogonal_slices(tile_parity(fixed.shape), index, geometry)
    views = tuple(
        np.where(p == 1, _windowed(w, windows(warped)), _windowed(f, windows(fixed)))
        for p, f, w in zip(parity, orthogonal_slices(fixed, index, geometry), orthogonal_slices(warped, index, geometry))
    )
    return _Row("checkerboard fixed / warped", views, "gray", Normalize(0.0, 1.0))


def _within(values: tuple[np.ndarray, ...], mask: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, ...]:
    """Slices of ``values`` as float, NaN (drawn transparent) outside the slices of ``mask``."""
    floats = tuple(v.astype(np.float64) for v in values)
    return floats if mask is None else tuple(np.where(m, v, np.nan) for v, m in zip(floats, mask))


def _jacobian_row(
    jacobian: np.ndarray, index: Index3, geometry: Geometry | None, fixed: np.ndarray, part: str, mask: np.ndarray | None
) -> _Row:
    masked = None if mask is None else orthogonal_slices(mask, index, geometry)
    return _Row(
        f"Jacobian ({part.split()[0]})\nover fixed",
        _within(orthogonal_slices(jacobian, index, geometry), masked),
        jacobian_colormap(),
        JacobianNorm(),
        colorbar=f"det J ({part})",
        # JacobianNorm is not monotonic at 0, so the bar uses the plain linear norm; its lower
        # extension (below 0) then shows the folding ("under") colour.
        bar_norm=Normalize(*JACOBIAN_RANGE),
        extend="both",
        legend=_jacobian_legend(),
        underlay=orthogonal_slices(fixed, index, geometry),
        alpha=MAP_ALPHA,
    )


def _pmm_row(pmm: np.ndarray, index: Index3, geometry: Geometry | None, fixed: np.ndarray) -> _Row:
    views = tuple(v.astype(np.float64) for v in orthogonal_slices(pmm, index, geometry))  # NaN outside its domain: transparent
    return _Row(
        "PMM over fixed", views, pmm_colormap(), Normalize(*PMM_RANGE), colorbar="patch NMI (higher = better aligned)",
        extend="max", underlay=orthogonal_slices(fixed, index, geometry), alpha=MAP_ALPHA,
    )


def _contour_row(
    label: str, image: np.ndarray, seg: np.ndarray, index: Index3, geometry: Geometry | None, windows: _Windows,
    names: dict[int, str] | None = None,
) -> _Row:
    """Outlines of every label over the grey image; the largest structures named in the legend (``names`` before
    FreeSurfer's)."""
    row = _grey_row(label, image, index, geometry, windows)
    labels = seg if np.issubdtype(seg.dtype, np.integer) else np.rint(seg).astype(np.int64)
    row.contours = orthogonal_slices(labels, index, geometry)
    row.legend = _legend_entries(labels, names)
    return row


def _legend_entries(labels: np.ndarray, given: dict[int, str] | None = None) -> tuple[tuple[tuple[float, ...], str], ...]:
    """The `LEGEND_LABELS` largest structures of a label map, in code order, named by ``given`` or else by
    FreeSurfer's table; a left/right pair, drawn in one colour, is named once ("Cerebral-Cortex (left, right)")."""
    codes, counts = _label_counts(labels)
    groups: dict[tuple[str, tuple[float, ...]], tuple[int, int, list[str]]] = {}
    for code, count in zip(codes.tolist(), counts.tolist()):
        name = (given or {}).get(code) or label_info(code).name
        key = (re.sub(r"^(Left|Right)-", "", name), _label_color(code))
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


def save_registration_figure(
    fixed: Volume,
    moving: Volume,
    warped: Volume,
    path: str | Path,
    jacobian: Volume | None = None,
    pmm: Volume | None = None,
    fixed_seg: Volume | np.ndarray | None = None,
    warped_seg: Volume | np.ndarray | None = None,
    title: str = "",
    index: Index3 | None = None,
    dpi: int = 110,
    jacobian_part: str = "deformable part",
    mask: np.ndarray | None = None,
) -> Path:
    """Write one PNG: rows fixed, moving, warped, checkerboard, then (when given) Jacobian, PMM,
    fixed segmentation contours over the warped image and warped segmentation contours over the
    fixed image; three orthogonal views per row through ``index`` (default: centre of mass of the
    fixed segmentation if given, else of the fixed image's nonzero voxels).

    Every volume must be on the fixed grid (same shape), else `InputError` (a ValueError).
    """
    arrays = {name: _array_of(v, name) for name, v in (("fixed", fixed), ("moving", moving), ("warped", warped))}
    optional = {"jacobian": jacobian, "pmm": pmm, "fixed_seg": fixed_seg, "warped_seg": warped_seg}
    arrays.update({name: _array_of(value, name) for name, value in optional.items() if value is not None})
    _check_same_grid(arrays)
    geometry = fixed.geometry if isinstance(fixed, Volume) else None
    if index is None:
        index = default_index(arrays["fixed_seg"] if "fixed_seg" in arrays else arrays["fixed"])
    windows = _Windows()
    rows = [
        _grey_row("fixed", arrays["fixed"], index, geometry, windows),
        _grey_row("moving", arrays["moving"], index, geometry, windows),
        _grey_row("warped moving", arrays["warped"], index, geometry, windows),
        _checkerboard_row(arrays["fixed"], arrays["warped"], index, geometry, windows),
    ]
    if "jacobian" in arrays:
        rows.append(_jacobian_row(arrays["jacobian"], index, geometry, arrays["fixed"], jacobian_part, mask))
    if "pmm" in arrays:
        rows.append(_pmm_row(arrays["pmm"], index, geometry, arrays["fixed"]))
    if "fixed_seg" in arrays:
        rows.append(_contour_row("warped + fixed seg", arrays["warped"], arrays["fixed_seg"], index, geometry, windows))
    if "warped_seg" in arrays:
        rows.append(_contour_row("fixed + warped seg", arrays["fixed"], arrays["warped_seg"], index, geometry, windows))
    return _render(rows, orthogonal_aspects(geometry), path, title, dpi)


def save_slices_png(
    volume: Volume,
    path: str | Path,
    cmap: Colormap | str = "gray",
    vmin: float | None = None,
    vmax: float | None = None,
    title: str = "",
    index: Index3 | None = None,
    dpi: int = 110,
) -> Path:
    """Write one PNG row of the axial, coronal and sagittal views of ``volume``.

    The window defaults to the robust percentiles (1, 99) for whichever of ``vmin``/``vmax`` is None.
    """
    array = _array_of(volume, "volume")
    low, high = robust_window(array)
    norm = Normalize(low if vmin is None else vmin, high if vmax is None else vmax)
    geometry = volume.geometry if isinstance(volume, Volume) else None
    row = _Row("", orthogonal_slices(array, index, geometry), cmap, norm)
    return _render([row], orthogonal_aspects(geometry), path, title, dpi)


def save_individual_pictures(
    out_dir: str | Path,
    fixed: Volume,
    moving: Volume,
    warped: Volume,
    jacobian: Volume | None,
    pmm: Volume | None,
    index: Index3 | None = None,
    dpi: int = 110,
    jacobian_part: str = "deformable part",
    segmentations: dict[str, tuple[Volume, Volume, str, dict[int, str] | None]] | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write fixed.png, moving.png, warped.png, checkerboard.png, jacobian.png and pmm.png (the last
    two only when given; the maps over the fixed image, the Jacobian inside ``mask`` where given) into
    ``out_dir``, all through the same point,
    and ``<name>.png`` for each of ``segmentations`` (``name: (image, label map, title, legend names or None)``,
    outlines on that image's own grid); returns name -> path."""
    arrays = {name: _array_of(v, name) for name, v in (("fixed", fixed), ("moving", moving), ("warped", warped))}
    arrays.update({name: _array_of(v, name) for name, v in (("jacobian", jacobian), ("pmm", pmm)) if v is not None})
    _check_same_grid(arrays)
    geometry = fixed.geometry if isinstance(fixed, Volume) else None
    index = default_index(arrays["fixed"]) if index is None else index
    aspects = orthogonal_aspects(geometry)
    out_dir = Path(out_dir)
    windows = _Windows()
    rows = {
        "fixed": _grey_row("fixed", arrays["fixed"], index, geometry, windows),
        "moving": _grey_row("moving (on the fixed grid)", arrays["moving"], index, geometry, windows),
        "warped": _grey_row("warped moving", arrays["warped"], index, geometry, windows),
        "checkerboard": _checkerboard_row(arrays["fixed"], arrays["warped"], index, geometry, windows),
    }
    if "jacobian" in arrays:
        rows["jacobian"] = _jacobian_row(arrays["jacobian"], index, geometry, arrays["fixed"], jacobian_part, mask)
    if "pmm" in arrays:
        rows["pmm"] = _pmm_row(arrays["pmm"], index, geometry, arrays["fixed"])
    written = _render_plain({name: row for name, row in rows.items() if _plain(row)}, aspects, out_dir, dpi)
    written.update({name: _render([row], aspects, out_dir / f"{name}.png", "", dpi) for name, row in rows.items() if not _plain(row)})
    for name, (image, seg, title, names) in (segmentations or {}).items():
        written[name] = save_segmentation_picture(out_dir / f"{name}.png", image, seg, title, dpi=dpi, windows=windows, names=names)
    return written


def save_segmentation_picture(
    path: str | Path, image: Volume, seg: Volume, title: str, dpi: int = 110, windows: _Windows | None = None,
    names: dict[int, str] | None = None,
) -> Path:
    """One row of three views: the outlines of ``seg``'s labels over ``image`` (both on one grid, which
    may differ from the fixed image's), through the segmentation's centre of mass, main structures named
    (by ``names`` where given, else by FreeSurfer's table)."""
    arrays = {"image": _array_of(image, "image"), "segmentation": _array_of(seg, "segmentation")}
    _check_same_grid(arrays)
    geometry = image.geometry if isinstance(image, Volume) else None
    index = default_index(arrays["segmentation"])
    row = _contour_row(title, arrays["image"], arrays["segmentation"], index, geometry, windows or _Windows(), names)
    return _render([row], orthogonal_aspects(geometry), path, "", dpi)
