"""Tests of JointRegSegLib.report: checkerboard, display orientation, Jacobian colours, PNG figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from JointRegSegLib.imageio.geometry import Geometry, Volume
from JointRegSegLib.report import (
    JACOBIAN_FOLDING_RGB,
    JACOBIAN_RANGE,
    checkerboard,
    jacobian_colormap,
    jacobian_control_points,
    jacobian_rgba,
    orthogonal_slices,
    draw_picture,
    draw_pictures,
    individual_pictures,
    registration_picture,
    save_slices_png,
)


def test_checkerboard_2d_matches_analytic_tiles():
    # 8 x 12 array, 4 tiles per axis -> tiles of 2 x 3 pixels; the (0, 0) tile shows a.
    a, b = np.full((8, 12), 3.0), np.full((8, 12), 7.0)
    parity = np.add.outer(np.arange(4), np.arange(4)) % 2
    expected = np.where(np.kron(parity, np.ones((2, 3))) == 1, 7.0, 3.0)
    np.testing.assert_array_equal(checkerboard(a, b, tiles=4), expected)


def test_checkerboard_3d_alternates_along_every_axis():
    a, b = np.zeros((4, 6, 8)), np.ones((4, 6, 8))
    board = checkerboard(a, b, tiles=2)
    i, j, k = np.meshgrid(np.arange(4) // 2, np.arange(6) // 3, np.arange(8) // 4, indexing="ij")
    np.testing.assert_array_equal(board, (i + j + k) % 2)


def test_checkerboard_rejects_different_shapes():
    with pytest.raises(ValueError):
        checkerboard(np.zeros((4, 4)), np.zeros((4, 5)))


def _lps_extremes(geometry: Geometry) -> dict[str, tuple[int, int, int]]:
    """Voxel indices of the most left/posterior/superior corner, found from physical positions."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    lps = geometry.index_to_physical(index)
    score = lps[:, 0] - lps[:, 1] + lps[:, 2]  # left, anterior, superior all count positively
    return tuple(int(v) for v in index[np.argmax(score)])


def test_orthogonal_slices_follow_the_direction_matrix():
    # i -> Superior, j -> Right (-L), k -> Posterior: a permuted and flipped grid.
    direction = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    geometry = Geometry((5, 6, 7), (1.0, 2.0, 3.0), (10.0, -4.0, 2.0), direction)
    marker = _lps_extremes(geometry)  # the left-anterior-superior corner voxel
    assert marker == (4, 0, 0)
    array = np.zeros(geometry.shape)
    array[marker] = 1.0
    axial, coronal, sagittal = orthogonal_slices(array, index=marker, geometry=geometry)
    # Sizes along L, P, S are 6 (j), 7 (k), 5 (i): axial (P, L), coronal (S, L), sagittal (S, P).
    assert axial.shape == (7, 6) and coronal.shape == (5, 6) and sagittal.shape == (5, 7)
    # Axial: anterior at the top, patient's left on the viewer's right.
    assert np.argwhere(axial == 1).tolist() == [[0, 5]]
    # Coronal: superior at the top, patient's left on the viewer's right.
    assert np.argwhere(coronal == 1).tolist() == [[0, 5]]
    # Sagittal: superior at the top, anterior on the viewer's left.
    assert np.argwhere(sagittal == 1).tolist() == [[0, 0]]


def test_orthogonal_slices_default_to_the_centre_of_mass_with_identity_direction():
    array = np.zeros((9, 10, 11))
    array[2, 3, 8] = 5.0  # i -> L, j -> P, k -> S without a geometry
    axial, coronal, sagittal = orthogonal_slices(array)
    assert np.argwhere(axial == 5).tolist() == [[3, 2]]
    assert np.argwhere(coronal == 5).tolist() == [[11 - 1 - 8, 2]]
    assert np.argwhere(sagittal == 5).tolist() == [[11 - 1 - 8, 3]]


def test_jacobian_colormap_centre_sides_and_folding():
    white, low, high = jacobian_rgba(np.array([1.0, 0.5, 1.6]))
    assert np.ptp(white[:3]) < 0.02 and white[:3].min() > 0.95
    assert low[2] > low[0] + 0.2  # compression is blue
    assert high[0] > high[2] + 0.2  # expansion is red
    folding = jacobian_rgba(np.array([0.0, -0.5, -3.0]))
    np.testing.assert_array_equal(folding[:, :3], np.tile(JACOBIAN_FOLDING_RGB, (3, 1)))
    # Just above zero is the ramp's first colour, not the folding colour.
    assert not np.allclose(jacobian_rgba(np.array([1e-3]))[0, :3], JACOBIAN_FOLDING_RGB, atol=0.1)


def test_jacobian_colormap_is_built_from_its_control_points():
    points = np.array(jacobian_control_points())
    assert points[0, 0] == JACOBIAN_RANGE[0] and points[-1, 0] == JACOBIAN_RANGE[1]
    cmap = jacobian_colormap()
    positions = (points[:, 0] - JACOBIAN_RANGE[0]) / (JACOBIAN_RANGE[1] - JACOBIAN_RANGE[0])
    np.testing.assert_allclose(cmap(positions)[:, :3], points[:, 1:], atol=1.0 / 255)


def _synthetic_case(shape=(24, 28, 20)) -> dict:
    geometry = Geometry(shape, (1.0, 1.0, 1.5), (0.0, 0.0, 0.0))
    i, j, k = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    r_fixed = np.sqrt((i - 12) ** 2 + (j - 14) ** 2 + ((k - 10) * 1.5) ** 2)
    r_moving = np.sqrt((i - 13) ** 2 + (j - 13) ** 2 + ((k - 10) * 1.5) ** 2)
    fixed = 100.0 * (r_fixed < 8) + 50.0 * (r_fixed < 4)
    moving = 80.0 * (r_moving < 7) + 60.0 * (r_moving < 3)
    jacobian = 1.0 + 0.8 * np.sin(i / 4.0)
    jacobian[11:13, 13:15, 9:11] = -0.2
    seg = (r_fixed < 8).astype(np.int64) + (r_fixed < 4)
    volume = lambda a: Volume(a, geometry)  # noqa: E731
    return dict(
        fixed=volume(fixed),
        moving=volume(moving),
        warped=volume(fixed * 0.9),
        jacobian=volume(jacobian),
        pmm=volume(np.exp(-r_fixed / 10.0)),
        fixed_seg=volume(seg),
        warped_seg=volume(seg),
    )


def _assert_valid_png(path) -> None:
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    rgb = np.rint(image[..., :3] * 255).astype(np.int64)
    assert np.unique(rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]).size > 10  # not one colour


def test_registration_picture_is_a_png_with_all_parts(tmp_path):
    case = _synthetic_case()
    path = draw_picture(registration_picture(title="synthetic", **case), tmp_path / "figure.png")
    _assert_valid_png(path)
    # The Jacobian row shows the folding colour (exactly, for pixels inside the folded block).
    image = imread(path)[..., :3]
    assert np.any(np.all(np.abs(image - np.array(JACOBIAN_FOLDING_RGB)) < 1.0 / 255, axis=-1))


def test_registration_picture_rejects_mismatched_shapes(tmp_path):
    case = _synthetic_case()
    other = Geometry((24, 28, 19), (1.0, 1.0, 1.5), (0.0, 0.0, 0.0))
    case["pmm"] = Volume(np.ones(other.shape), other)
    with pytest.raises(ValueError, match="pmm"):
        draw_picture(registration_picture(**case), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_individual_pictures_and_slices_png(tmp_path):
    case = _synthetic_case()
    pictures = individual_pictures(case["fixed"], case["moving"], case["warped"], case["jacobian"], case["pmm"])
    paths = draw_pictures(pictures, tmp_path / "pictures")
    assert set(paths) == {"fixed", "moving", "warped", "checkerboard", "jacobian", "pmm"}
    for name, path in paths.items():
        assert path.name == f"{name}.png"
        _assert_valid_png(path)
    _assert_valid_png(save_slices_png(case["fixed"], tmp_path / "fixed_slices.png"))



def test_plain_pictures_drawn_in_one_figure_equal_a_figure_each(tmp_path):
    """fixed.png, moving.png, warped.png and checkerboard.png come from one figure whose views, windows and titles
    are swapped: the same pixels as each drawn in a figure of its own (titles of one and two lines)."""
    from PIL import Image

    from JointRegSegLib.report.figures import _render_plain, draw_picture
    from JointRegSegLib.report.rows import Picture, Windows, checkerboard_row, grey_row
    from JointRegSegLib.report.slices import orthogonal_aspects

    case = _synthetic_case()
    paths = draw_pictures(individual_pictures(case["fixed"], case["moving"], case["warped"], None, None), tmp_path / "shared")
    geometry, windows, index = case["fixed"].geometry, Windows(), (12, 14, 9)
    rows = {
        "fixed": grey_row("fixed", case["fixed"].array, index, geometry, windows),
        "moving": grey_row("moving, a title long enough for two lines", case["moving"].array, index, geometry, windows),
        "checkerboard": checkerboard_row(case["fixed"].array, case["warped"].array, index, geometry, windows),
    }
    assert all(row.plain for row in rows.values()) and set(paths) == {"fixed", "moving", "warped", "checkerboard"}
    shared = _render_plain(rows, orthogonal_aspects(geometry), tmp_path / "one", 110)
    for name, row in rows.items():
        alone = draw_picture(Picture([row], orthogonal_aspects(geometry)), tmp_path / "each" / f"{name}.png", 110)
        np.testing.assert_array_equal(np.asarray(Image.open(shared[name])), np.asarray(Image.open(alone)))


def test_default_index_is_the_rounded_centre_of_mass_of_the_nonzero_voxels():
    from scipy.ndimage import center_of_mass

    from JointRegSegLib.report.slices import default_index

    rng = np.random.default_rng(3)
    values = np.where(rng.random((15, 12, 9)) > 0.8, rng.random((15, 12, 9)), 0.0)
    values[:4] = np.nan  # NaN counts as empty
    expected = tuple(int(round(c)) for c in center_of_mass(np.nan_to_num(values) != 0))
    assert default_index(values) == expected
    assert default_index((np.nan_to_num(values) * 10).astype(np.int16)) == expected
    assert default_index(np.zeros((5, 6, 7))) == (2, 3, 3)


def _most_common_colour(path: Path) -> np.ndarray:
    """The most frequent colour of the picture's left third (its axial view), white page excluded."""
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"))
    pixels = rgb[:, : rgb.shape[1] // 3].reshape(-1, 3)
    pixels = pixels[pixels.min(axis=1) < 240]
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    return colours[np.argmax(counts)].astype(float)


def test_pmm_pictures_of_two_runs_share_one_colour_scale(tmp_path):
    """The same PMM value gets the same colour in two runs whose PMM ranges differ (0-0.2 and 0.1-0.5):
    the axial view cuts through a slab where both runs hold 0.18."""
    geometry = Geometry((24, 24, 24), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    black = Volume(np.zeros(geometry.shape, np.float32), geometry)
    colours = []
    for number, (low, high) in enumerate(((0.0, 0.2), (0.1, 0.5))):
        values = np.linspace(low, high, black.array.size, dtype=np.float32).reshape(geometry.shape)
        values[:, :, 10:14] = 0.18
        pictures = individual_pictures(black, black, black, None, black.with_array(values), index=(12, 12, 12))
        paths = draw_pictures(pictures, tmp_path / f"run{number}")
        colours.append(_most_common_colour(paths["pmm"]))
    np.testing.assert_allclose(colours[0], colours[1], atol=3)
    assert colours[0].max() - colours[0].min() > 20, "the slab should be drawn in a colour, not grey"


def _texts_outside(figure) -> list[str]:
    """The figure's drawn texts whose extent leaves the figure (they would be cut off in the PNG)."""
    from matplotlib.text import Text

    renderer = figure.canvas.get_renderer()
    figure.canvas.draw()
    bounds = figure.bbox
    outside = []
    for text in figure.findobj(Text):
        if text.get_visible() and text.get_text().strip():
            box = text.get_window_extent(renderer)
            if box.x0 < bounds.x0 - 1 or box.y0 < bounds.y0 - 1 or box.x1 > bounds.x1 + 1 or box.y1 > bounds.y1 + 1:
                outside.append(text.get_text())
    return outside


def test_single_row_pictures_keep_long_titles_and_colour_bar_labels_inside():
    """A one-row picture (e.g. pictures/pmm.png, a method's segmentation) is as tall as its views: a long row
    title or colour-bar label must be wrapped, not cut off at the picture's edges."""
    from JointRegSegLib.report.figures import _figure
    from JointRegSegLib.report.rows import Windows, contour_row, pmm_row

    geometry = Geometry((40, 48, 56), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    image = np.random.default_rng(0).random(geometry.shape).astype(np.float32)
    labels = np.zeros(geometry.shape, np.int16)
    labels[5:35, 5:20, 5:50], labels[5:35, 25:45, 5:50] = 2, 41
    index = (20, 24, 28)
    rows = [pmm_row(image * 0.5, index, geometry, image), contour_row("uresnet's segmentation of the moving image", image, labels, index, geometry, Windows())]
    for row in rows:
        assert _texts_outside(_figure([row], (1.0, 1.0, 1.0), "")) == []


def test_outline_legend_names_a_left_right_pair_once():
    """Left and right cerebral white matter share FreeSurfer's colour: one legend entry; a structure present on
    one side only keeps its own name. Entries follow the label codes' order."""
    from JointRegSegLib.labels import label_info
    from JointRegSegLib.report.rows import legend_entries

    labels = np.zeros((10, 10, 10), np.int16)
    labels[:3], labels[3:6], labels[6:8] = 2, 41, 10  # left / right white matter, left thalamus
    names = [name for _, name in legend_entries(labels)]
    assert names == ["Cerebral-White-Matter (left, right)", label_info(10).name]
    assert label_info(2).rgb == label_info(41).rgb


def test_outline_legend_takes_given_names_before_freesurfers():
    """A brain mask's label 1 is "brain" in its picture's legend, not FreeSurfer's name for code 1 (or "Label-1");
    labels without a given name keep FreeSurfer's."""
    from JointRegSegLib.labels import label_info
    from JointRegSegLib.report.rows import legend_entries

    mask = np.zeros((10, 10, 10), np.uint8)
    mask[2:8, 2:8, 2:8], mask[8:, 8:, 8:], mask[:2, :2, :2], mask[:2, 8:, 8:] = 1, 2, 41, 60  # a left/right pair, one more
    pair_and_more = ["Cerebral-White-Matter (left, right)", label_info(60).name]
    assert [name for _, name in legend_entries(mask, {1: "brain"})] == ["brain", *pair_and_more]
    assert [name for _, name in legend_entries(mask)] == [label_info(1).name, *pair_and_more]


def test_a_tall_pictures_title_stays_above_the_view_names():
    """An eight-row picture (pictures/overview.png): the figure's title overlaps neither a view's name nor the
    figure's edge (matplotlib's default title height, a fraction of the figure, ran into the view names)."""
    from matplotlib.text import Text

    from JointRegSegLib.report.figures import _figure
    from JointRegSegLib.report.rows import Windows, contour_row

    geometry = Geometry((40, 48, 56), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    image = np.random.default_rng(1).random(geometry.shape).astype(np.float32)
    labels = np.zeros(geometry.shape, np.int16)
    labels[5:35, 5:20, 5:50] = 2
    row = contour_row("rows", image, labels, (20, 24, 28), geometry, Windows())
    figure = _figure([row] * 8, (1.0, 1.0, 1.0), "JointRegSeg demo: 0.765 mean Dice")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    title = figure._suptitle.get_window_extent(renderer)
    view_names = [t.get_window_extent(renderer) for ax in figure.axes for t in ax.findobj(Text) if t is ax.title and t.get_text()]
    assert len(view_names) == 3
    assert all(title.y0 > name.y1 for name in view_names)
    assert _texts_outside(figure) == []


def test_cutting_the_slices_does_not_import_matplotlib():
    """The run cuts the pictures' slices and a child process draws them (`worker.beside`): the run itself must not
    pay for matplotlib's imports (half a second), so `report.rows` and the package's numpy names leave it out."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from JointRegSegLib.imageio.geometry import Geometry, Volume\n"
        "from JointRegSegLib.report import individual_pictures, orthogonal_slices, robust_window\n"
        "g = Geometry((8, 9, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))\n"
        "v = Volume(np.random.default_rng(0).random(g.shape).astype(np.float32), g)\n"
        "pictures = individual_pictures(v, v, v, v, v)\n"
        "assert len(pictures) == 6, pictures\n"
        "assert 'matplotlib' not in sys.modules, 'imported matplotlib'\n"
        "from JointRegSegLib.report import draw_pictures\n"
        "assert 'matplotlib' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
