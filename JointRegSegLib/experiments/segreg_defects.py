"""Where a warped image is implausible, and whether that is at region borders (segreg's sliding) or inside regions.

segreg composes one field per region (``Phi = sum_i Phi_i * S_f^i``), so its mapping may jump at
region borders by design. A defect is anything else. This experiment reads a registration's
output folder (``jointregseg register ... --out RUN``) and the pair it registered, and measures:

- *implausible voxels*: fixed foreground voxels (label ``l`` > 0) whose warped intensity lies
  outside the central 98 % (1st to 99th percentile) of the moving image's intensities under the
  same label ``l`` (so contrast differences between the two scans do not count; about 2 % of a
  label's own voxels lie outside that range by construction); *bright* ones lie above it (the
  "white speckles");
- where they are: the distance (mm) from each voxel to the nearest region border of the fixed
  label map (a voxel with a differently labelled face neighbour is at distance 0), binned;
- whether the warped label there agrees with the fixed label (the label map is warped by the same
  field, nearest neighbour);
- the Jacobian determinant of the whole mapping: folding (det J <= 0) per distance bin;
- the local NCC of the warped and fixed images (9-voxel cubes), mean over the foreground.

Usage::

    python -m JointRegSegLib.experiments.segreg_defects --data ../shared/data/pair --run RUN --out OUT

Writes ``defects.json``, ``defects.png`` and, with ``--compare OTHER_RUN ...``, ``comparison.png``
(sagittal and coronal slices through the corpus callosum of the fixed image and each run's warped
image). ``defects.png`` rows: fixed image with the fixed region borders,
warped image with the same borders, implausible voxels coloured by their distance to a border,
local NCC; columns: axial, coronal and sagittal slices through the corpus callosum).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..imageio import read_image, read_labels
from ..imageio.geometry import Volume
from ..labels import label_info
from ..metrics import jacobian_determinant
from ..report.slices import orthogonal_aspects, orthogonal_slices
from ..spatial.field_io import read_displacement_field

BINS_MM = (0.0, 1.0, 2.0, 3.0, 5.0, np.inf)  # distance bins: [0, 1), [1, 2), [2, 3), [3, 5), >= 5 mm
BIN_NAMES = ("on a border", "1 mm", "2 mm", "3-4 mm", ">= 5 mm")
CORPUS_CALLOSUM = (251, 252, 253, 254, 255)
NEAR_MM = 3.0  # background voxels this close to a labelled voxel are scored too (sulcal CSF, brain outline)


def border_distance(labels: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) from each voxel to the nearest voxel with a differently labelled face neighbour (0 there)."""
    border = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)
        differ = a[1:] != a[:-1]
        b = np.moveaxis(border, axis, 0)
        b[1:] |= differ
        b[:-1] |= differ
    return ndimage.distance_transform_edt(~border, sampling=spacing).astype(np.float32)


def near_brain(labels: np.ndarray, spacing: tuple[float, ...], reach_mm: float = NEAR_MM) -> np.ndarray:
    """Background voxels (label 0) within ``reach_mm`` of a labelled voxel: sulci and the brain's outline."""
    background = labels == 0
    return background & (ndimage.distance_transform_edt(background, sampling=spacing) <= reach_mm)


def label_ranges(
    image: np.ndarray, labels: np.ndarray, band: np.ndarray, low: float = 1.0, high: float = 99.0
) -> dict[int, tuple[float, float]]:
    """Per label: the ``low``-th and ``high``-th percentiles of the image under it (label 0: within ``band`` only)."""
    ranges = {}
    for label in np.unique(labels):
        where = band if label == 0 else labels == label
        if where.any():
            ranges[int(label)] = tuple(float(v) for v in np.percentile(image[where], [low, high]))
    return ranges


def implausible(warped: np.ndarray, fixed_labels: np.ndarray, ranges: dict[int, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Masks of fixed foreground voxels whose warped intensity is outside (and above) its label's moving range."""
    top = int(max(ranges.keys() | {int(fixed_labels.max())})) + 1
    low_table, high_table = np.full(top, np.inf, np.float32), np.full(top, -np.inf, np.float32)
    known = np.zeros(top, dtype=bool)
    for label, (low, high) in ranges.items():
        low_table[label], high_table[label], known[label] = low, high, True
    scored = known[fixed_labels]
    above = scored & (warped > high_table[fixed_labels])
    below = scored & (warped < low_table[fixed_labels])
    return above | below, above


def local_ncc(a: np.ndarray, b: np.ndarray, width: int = 9) -> np.ndarray:
    """NCC of ``a`` and ``b`` over the ``width``-voxel cube around each voxel (0 where either is flat)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mean = lambda x: ndimage.uniform_filter(x, width, mode="nearest")  # noqa: E731
    ma, mb = mean(a), mean(b)
    cov = mean(a * b) - ma * mb
    va, vb = mean(a * a) - ma**2, mean(b * b) - mb**2
    denominator = np.sqrt(np.clip(va, 0, None) * np.clip(vb, 0, None))
    return np.where(denominator > 1e-8, cov / np.maximum(denominator, 1e-8), 0.0).astype(np.float32)


def measure(
    fixed: Volume, fixed_seg: Volume, moving: Volume, moving_seg: Volume, warped: Volume, warped_seg: Volume, displacement: Volume
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The numbers of the module docstring, and the maps the figure draws."""
    labels = fixed_seg.array.astype(np.int64)
    moving_labels = moving_seg.array.astype(np.int64)
    distance = border_distance(labels, fixed_seg.geometry.spacing)
    ranges = label_ranges(moving.array, moving_labels, near_brain(moving_labels, moving_seg.geometry.spacing))
    bad, bright = implausible(warped.array, labels, ranges)
    band = near_brain(labels, fixed_seg.geometry.spacing)
    scored = (labels > 0) | band
    bad &= scored
    bright &= scored
    agree = warped_seg.array.astype(np.int64) == labels
    folding = jacobian_determinant(displacement).array <= 0
    ncc = local_ncc(fixed.array, warped.array)
    foreground = labels > 0
    bins = np.digitize(distance, BINS_MM[1:-1])
    rows = []
    for index, name in enumerate(BIN_NAMES):
        where = foreground & (bins == index)
        count = int(where.sum())
        rows.append(
            {
                "distance": name,
                "foreground_voxels": count,
                "implausible_percent": 100.0 * float(bad[where].mean()) if count else 0.0,
                "bright_percent": 100.0 * float(bright[where].mean()) if count else 0.0,
                "labels_disagree_percent": 100.0 * float((~agree[where]).mean()) if count else 0.0,
                "folding_percent": 100.0 * float(folding[where].mean()) if count else 0.0,
                "share_of_implausible_percent": 100.0 * float(bad[where].sum()) / max(int(bad[foreground].sum()), 1),
            }
        )
    inside = foreground & (distance >= 2.0)
    summary = {
        "implausible_percent": 100.0 * float(bad[foreground].mean()),
        "bright_percent": 100.0 * float(bright[foreground].mean()),
        "implausible_where_labels_agree_percent": 100.0 * float(bad[foreground & agree].mean()),
        "implausible_inside_regions_percent": 100.0 * float(bad[inside].mean()),
        "folding_percent": 100.0 * float(folding[foreground].mean()),
        "folding_inside_regions_percent": 100.0 * float(folding[inside].mean()),
        "implausible_near_brain_background_percent": 100.0 * float(bad[band].mean()),
        "bright_near_brain_background_percent": 100.0 * float(bright[band].mean()),
        "local_ncc_mean": float(ncc[foreground].mean()),
        "by_border_distance": rows,
        "by_label": _by_label(labels, bad, agree, band),
    }
    return summary, {"distance": distance, "implausible": bad, "ncc": ncc}


def _by_label(labels: np.ndarray, bad: np.ndarray, agree: np.ndarray, band: np.ndarray, top: int = 8) -> list[dict[str, Any]]:
    """The labels holding most implausible voxels (label 0: the near-brain background band)."""
    codes, counts = np.unique(labels[bad], return_counts=True)
    total = max(int(bad.sum()), 1)
    rows = []
    for code, count in sorted(zip(codes.tolist(), counts.tolist()), key=lambda item: -item[1])[:top]:
        where = band if code == 0 else labels == code
        rows.append(
            {
                "label": int(code),
                "name": "background near labels" if code == 0 else label_info(code).name,
                "share_of_implausible_percent": 100.0 * count / total,
                "implausible_percent_of_label": 100.0 * count / max(int(where.sum()), 1),
                "warped_label_agrees_percent": 100.0 * float(agree[bad & (labels == code)].mean()),
            }
        )
    return rows


def _borders(labels_2d: np.ndarray) -> np.ndarray:
    edge = np.zeros(labels_2d.shape, dtype=bool)
    edge[1:] |= labels_2d[1:] != labels_2d[:-1]
    edge[:, 1:] |= labels_2d[:, 1:] != labels_2d[:, :-1]
    return edge


def save_figure(path: Path, fixed: Volume, fixed_seg: Volume, warped: Volume, maps: dict[str, np.ndarray], title: str) -> Path:
    """Rows: fixed + borders, warped + borders, implausible voxels by border distance, local NCC; three views."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    geometry = fixed.geometry
    labels = fixed_seg.array
    callosum = np.isin(labels, CORPUS_CALLOSUM)
    index = tuple(int(round(c)) for c in ndimage.center_of_mass(callosum if callosum.any() else labels > 0))
    views = lambda a: orthogonal_slices(a, index, geometry)  # noqa: E731
    aspects = orthogonal_aspects(geometry)
    grey = {"cmap": "gray", "vmin": 0.0, "vmax": float(np.percentile(fixed.array, 99.5))}
    warped_grey = {"cmap": "gray", "vmin": 0.0, "vmax": float(np.percentile(warped.array, 99.5))}
    bins = np.digitize(maps["distance"], BINS_MM[1:-1]).astype(np.float32)
    coloured = np.where(maps["implausible"], bins, np.nan)
    bin_colours = ListedColormap(["#ff2020", "#ff9f1c", "#ffe14d", "#4dd0ff", "#3a5bff"])
    figure, axes = plt.subplots(4, 3, figsize=(12.5, 14.5))
    rows = [
        ("fixed, region borders", views(fixed.array), grey, None),
        ("warped, fixed region borders", views(warped.array), warped_grey, None),
        ("implausible voxels by border distance", views(warped.array), warped_grey, views(coloured)),
        ("local NCC (9 voxels)", views(maps["ncc"]), {"cmap": "magma", "vmin": -1.0, "vmax": 1.0}, None),
    ]
    edges = [_borders(v) for v in views(labels)]
    for row, (name, images, style, overlay) in enumerate(rows):
        for column in range(3):
            ax = axes[row, column]
            shown = ax.imshow(images[column], origin="upper", aspect=aspects[column], interpolation="nearest", **style)
            if row < 2:
                ax.imshow(np.ma.masked_where(~edges[column], edges[column]), cmap=ListedColormap(["#00e0ff"]),
                          alpha=0.55, origin="upper", aspect=aspects[column], interpolation="nearest")
            if overlay is not None:
                marks = ax.imshow(overlay[column], cmap=bin_colours, vmin=-0.5, vmax=len(BIN_NAMES) - 0.5,
                                  origin="upper", aspect=aspects[column], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(name)
        if overlay is not None:
            bar = figure.colorbar(marks, ax=axes[row].tolist(), ticks=range(len(BIN_NAMES)), fraction=0.03)
            bar.ax.set_yticklabels([BIN_NAMES[0]] + [f"{n} from one" for n in BIN_NAMES[1:]], fontsize=8)
        if row == 3:
            figure.colorbar(shown, ax=axes[row].tolist(), fraction=0.03)
    for column, name in enumerate(("axial (R on the left)", "coronal (R on the left)", "sagittal (A on the left)")):
        axes[0, column].set_title(name)
    figure.suptitle(title)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def save_comparison(path: Path, fixed: Volume, fixed_seg: Volume, warped: dict[str, Volume], title: str) -> Path:
    """Sagittal and coronal slices through the corpus callosum: the fixed image, then each warped image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    callosum = np.isin(fixed_seg.array, CORPUS_CALLOSUM)
    index = tuple(int(round(c)) for c in ndimage.center_of_mass(callosum if callosum.any() else fixed_seg.array > 0))
    aspects = orthogonal_aspects(fixed.geometry)
    columns = {"fixed": fixed, **warped}
    figure, axes = plt.subplots(2, len(columns), figsize=(3.6 * len(columns), 7.2))
    for column, (name, volume) in enumerate(columns.items()):
        _, coronal, sagittal = orthogonal_slices(volume.array, index, fixed.geometry)
        top = float(np.percentile(volume.array, 99.5))
        for row, (view, aspect) in enumerate(((sagittal, aspects[2]), (coronal, aspects[1]))):
            axes[row, column].imshow(view, cmap="gray", vmin=0.0, vmax=top, aspect=aspect, interpolation="nearest")
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        axes[0, column].set_title(name)
    axes[0, 0].set_ylabel("sagittal (A on the left)")
    axes[1, 0].set_ylabel("coronal (R on the left)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the pair's folder (fixed_img, fixed_seg, moving_img, moving_seg .nii.gz)")
    parser.add_argument("--run", type=Path, required=True, help="a register output folder (warped, warped_seg, displacement)")
    parser.add_argument("--out", type=Path, required=True, help="folder for defects.json and defects.png")
    parser.add_argument("--title", default="segreg: implausible warped intensities and region borders")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="other run folders: comparison.png shows them beside --run")
    args = parser.parse_args(argv)
    fixed = read_image(args.data / "fixed_img.nii.gz")
    fixed_seg = read_labels(args.data / "fixed_seg.nii.gz")
    moving = read_image(args.data / "moving_img.nii.gz")
    moving_seg = read_labels(args.data / "moving_seg.nii.gz")
    warped = read_image(args.run / "warped.nii.gz")
    warped_seg = read_labels(args.run / "warped_seg.nii.gz")
    displacement = read_displacement_field(args.run / "displacement.nii.gz")
    summary, maps = measure(fixed, fixed_seg, moving, moving_seg, warped, warped_seg, displacement)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "defects.json").write_text(json.dumps(summary, indent=2))
    save_figure(args.out / "defects.png", fixed, fixed_seg, warped, maps, args.title)
    if args.compare:
        runs = {args.run.name: warped, **{run.name: read_image(run / "warped.nii.gz") for run in args.compare}}
        save_comparison(args.out / "comparison.png", fixed, fixed_seg, runs, "warped images through the corpus callosum")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("by_border_distance", "by_label")}, indent=2))
    for row in summary["by_border_distance"] + summary["by_label"]:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
