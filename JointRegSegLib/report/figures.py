"""PNG pictures of a registration result drawn with matplotlib: the rows of `rows` (orthogonal views of the
images, checkerboard, maps, contours), with view names, colour bars and legends.

Views follow the radiological display convention of `JointRegSegLib.report.slices`, oriented by the
fixed image's geometry. Grey-level images are windowed by their own robust percentiles (1, 99).
Matplotlib is used through `Figure` + `FigureCanvasAgg` only: no pyplot state, no open figures.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from contourpy import LineType, contour_generator
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PathCollection
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.path import Path as MplPath

from ..colour_scales import JACOBIAN_RANGE, PMM_RANGE, robust_window
from ..imageio.geometry import Volume
from .colormaps import JacobianNorm, jacobian_colormap, pmm_colormap
from .rows import (
    JACOBIAN_MAP,
    PMM_MAP,
    Picture,
    Row,
    array_of,
    label_colour,
)
from .slices import Index3, orthogonal_aspects, orthogonal_slices

VIEW_NAMES: tuple[str, str, str] = ("axial", "coronal", "sagittal")
# (left, right, top, bottom) patient directions at the edges of each view (see slices.py).
_EDGE_LETTERS = (("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I"))
_ROW_INCHES = 2.0
_SIDE_COLUMN = 1.6  # width ratio of the column holding colour bars and legends
_LEGEND_POINTS = 7
_MARGINS = (0.35, 0.05, 0.22, 0.05)  # inches left (row labels), right, top (view names), bottom: a fixed layout,
# which costs a fraction of matplotlib's constrained layout (a third of each picture's time)
_TITLE_CHARACTERS = 22  # row titles and colour-bar labels are wrapped to lines this long (they run along one row)
PNG_COMPRESSION = 1  # zlib level of the PNG files: fast (the default 6 costs more time than the pictures are worth)


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
        colours += [label_colour(label)] * len(points)
    if paths:
        ax.add_collection(PathCollection(paths, facecolors="none", edgecolors=colours, linewidths=0.8), autolim=False)


def _colours(row: Row) -> tuple[Colormap | str, Normalize, Normalize | None]:
    """The colour map and norm a row's views are drawn with, and its colour bar's norm where that differs."""
    if row.cmap == JACOBIAN_MAP:
        # JacobianNorm is not monotonic at 0, so the bar uses the plain linear norm; its lower extension (below 0)
        # then shows the folding ("under") colour.
        return jacobian_colormap(), JacobianNorm(), Normalize(*JACOBIAN_RANGE)
    if row.cmap == PMM_MAP:
        return pmm_colormap(), Normalize(*PMM_RANGE), None
    return row.cmap, Normalize(*row.window), None


def draw_pictures(pictures: dict[str, Picture], folder: str | Path, dpi: int = 110) -> dict[str, Path]:
    """Each picture as ``folder/<name>.png``; returns name -> path. One-row pictures of plain rows on one grid
    and colour map are drawn from one figure (`_render_plain`)."""
    folder = Path(folder)
    plain: dict[tuple, dict[str, Row]] = {}
    written: dict[str, Path] = {}
    for name, picture in pictures.items():
        row = picture.rows[0]
        if len(picture.rows) == 1 and row.plain and not picture.title and isinstance(row.cmap, str):
            key = (picture.aspects, tuple(view.shape for view in row.views), row.cmap)
            plain.setdefault(key, {})[name] = row
        else:
            written[name] = draw_picture(picture, folder / f"{name}.png", dpi)
    for (aspects, _, _), rows in plain.items():
        written.update(_render_plain(rows, aspects, folder, dpi))
    return {name: written[name] for name in pictures}


def draw_picture(picture: Picture, path: str | Path, dpi: int = 110) -> Path:
    """One picture as a PNG file at ``path``."""
    return _save(_figure(picture.rows, picture.aspects, picture.title), Path(path), dpi)


def _render_plain(rows: dict[str, Row], aspects: tuple[float, float, float], folder: Path, dpi: int) -> dict[str, Path]:
    """One-row pictures ``folder/<name>.png`` of plain rows of one shape and colour map: one figure, drawn for
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
                image.set_norm(_colours(row)[1])
            figure.axes[0].set_ylabel(_wrapped(row.label), fontsize=8)
        written[name] = _save(figure, folder / f"{name}.png", dpi)
    return written


def _save(figure: Figure, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, facecolor="white", pil_kwargs={"compress_level": PNG_COMPRESSION})
    return path


def _figure(rows: list[Row], aspects: tuple[float, float, float], title: str) -> Figure:
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
        cmap, norm, bar_norm = _colours(row)
        for c, (view, aspect) in enumerate(zip(row.views, aspects)):
            ax = figure.add_subplot(grid[r, c])
            ax.set_facecolor("black")
            if row.underlay is not None:
                low, high = robust_window(row.underlay[c])
                ax.imshow(row.underlay[c], cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest", origin="upper")
            image = ax.imshow(
                view, cmap=cmap, norm=norm, aspect=aspect, interpolation="nearest", origin="upper", alpha=row.alpha
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
                mappable = image if bar_norm is None else ScalarMappable(bar_norm, cmap)
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


def _legend_overflow(rows: list[Row]) -> float:
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
    array = array_of(volume, "volume")
    low, high = robust_window(array)
    geometry = volume.geometry if isinstance(volume, Volume) else None
    row = Row("", orthogonal_slices(array, index, geometry), cmap, (low if vmin is None else vmin, high if vmax is None else vmax))
    return draw_picture(Picture([row], orthogonal_aspects(geometry), title), path, dpi)
