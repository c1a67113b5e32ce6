"""SegReg's Figure 7, reproduced cheaply: registration accuracy against segmentation accuracy.

The paper feeds SegReg segmentations of increasing quality (nnU-Net checkpoints) and finds the
registration Dice follows the segmentation Dice almost linearly. Here the moving label map of
../shared/data/pair is degraded at a few levels, segreg registers the pair with the degraded map,
and the ORIGINAL moving label map is warped by the result to measure the registration Dice
against the fixed label map (30 evaluation structures, `evaluation.label_metrics`). The
segmentation Dice is the degraded map against the original one (same 30 structures).

Degradations (seeded):

- ``warp:A``: the label map resampled through a random smooth diffeomorphism of RMS ``A`` voxels
  (`synth.random_deformation`, control points every 1/16 of the grid): boundary errors that move
  whole stretches of border, as an imperfect segmenter does;
- ``noise:N``: ``N`` rounds of boundary label noise: each voxel with a differently labelled
  26-neighbour takes the label of a random 26-neighbour with probability 1/2.

Usage::

    python -m JointRegSegLib.experiments.segreg_quality --out /work/notes/segreg_quality \\
        --levels warp:0 warp:1.5 warp:3 noise:2 --option level_iterations=[60,40] --option fine_iterations=30

Writes ``results.json`` and ``figure7.png`` (registration Dice against segmentation Dice, with the
line of equality and a least-squares line) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..evaluation import label_metrics
from ..imageio import read_image, read_labels
from ..imageio.geometry import Volume
from ..imageio.network_grid import resample
from ..methods import get_method
from ..methods.base import Inputs, Options
from ..methods.options import parse_options
from ..metrics import folding_percent, jacobian_determinant, sdlogj
from ..spatial import warp, warp_volume
from ..synth import DeformationOptions, random_deformation


def degrade(labels: Volume, level: str, seed: int) -> Volume:
    """The label map degraded as ``kind:amount`` (see the module docstring)."""
    kind, _, amount = level.partition(":")
    value = float(amount or 0)
    array = labels.array
    if kind == "warp":
        if value <= 0:
            return labels
        generator = torch.Generator().manual_seed(seed)
        options = DeformationOptions(max_std=value, min_std=value, resolution=1.0 / 16.0)
        disp = random_deformation(array.shape, generator, 1, options)
        moved = warp(torch.from_numpy(array.astype(np.float32))[None, None], disp, mode="nearest", padding_mode="border")
        return labels.with_array(moved[0, 0].round().numpy().astype(array.dtype))
    if kind == "noise":
        rng = np.random.default_rng(seed)
        out = array.copy()
        offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)]
        for _ in range(int(value)):
            padded = np.pad(out, 1, mode="edge")
            neighbours = np.stack([padded[1 + a : padded.shape[0] - 1 + a, 1 + b : padded.shape[1] - 1 + b,
                                          1 + c : padded.shape[2] - 1 + c] for a, b, c in offsets])
            boundary = (neighbours != out[None]).any(axis=0)
            pick = rng.integers(len(offsets), size=out.shape)
            chosen = np.take_along_axis(neighbours, pick[None], axis=0)[0]
            flip = boundary & (rng.random(out.shape) < 0.5)
            out = np.where(flip, chosen, out)
        return labels.with_array(out)
    raise ValueError(f"unknown degradation {level!r}: use warp:A or noise:N")


def run(data: Path, levels: list[str], extra: dict[str, Any], seed: int, out: Path) -> list[dict[str, Any]]:
    """Register once per level; returns and writes the rows."""
    fixed, moving = read_image(data / "fixed_img.nii.gz"), read_image(data / "moving_img.nii.gz")
    fixed_seg, moving_seg = read_labels(data / "fixed_seg.nii.gz"), read_labels(data / "moving_seg.nii.gz")
    initial = resample(moving_seg, fixed.geometry, interpolation="nearest").array
    method = get_method("segreg")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for level in levels:
        degraded = degrade(moving_seg, level, seed)
        seg_dice = label_metrics(moving_seg, degraded.array, degraded.array)["dice_mean"]
        tick = time.monotonic()
        result = method.register(Inputs(fixed, moving, fixed_seg, degraded), Options(seed=seed, extra=dict(extra)), lambda f, s: None)
        seconds = time.monotonic() - tick
        warped = warp_volume(moving_seg, result.displacement, interpolation="nearest")
        metrics = label_metrics(fixed_seg, warped.array, initial)
        jacobian = jacobian_determinant(result.displacement).array
        rows.append(
            {
                "level": level,
                "segmentation_dice": seg_dice,
                "registration_dice": metrics["dice_mean"],
                "registration_dice_initial": metrics["dice_mean_initial"],
                "hd95": metrics["hd95_mean"],
                "sdlogj": sdlogj(jacobian),
                "folding_percent": folding_percent(jacobian),
                "seconds": seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        (out / "results.json").write_text(json.dumps({"options": extra, "seed": seed, "rows": rows}, indent=2))
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Registration Dice against segmentation Dice, the line of equality and a least-squares line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([r["segmentation_dice"] for r in rows])
    y = np.array([r["registration_dice"] for r in rows])
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=120)
    low = min(x.min(), y.min()) - 0.03
    ax.plot([low, 1.0], [low, 1.0], color="0.6", linestyle="--", label="registration = segmentation")
    if len(rows) >= 2:
        slope, offset = np.polyfit(x, y, 1)
        xs = np.linspace(x.min(), x.max(), 2)
        ax.plot(xs, slope * xs + offset, color="tab:blue", label=f"fit: slope {slope:.2f}")
    ax.scatter(x, y, color="tab:red", zorder=3)
    for row, xi, yi in zip(rows, x, y):
        ax.annotate(row["level"], (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.axhline(rows[0]["registration_dice_initial"], color="0.8", linewidth=0.8)
    ax.set_xlabel("segmentation Dice (degraded moving labels)")
    ax.set_ylabel("registration Dice (30 structures)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(low, 1.0)
    ax.set_ylim(low, 1.0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pair")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--levels", nargs="+", default=["warp:0", "warp:1.5", "warp:3", "noise:2"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="segreg option (JSON value)")
    args = parser.parse_args(argv)
    extra = parse_options(args.option)
    rows = run(args.data, args.levels, extra, args.seed, args.out)
    title = "SegReg " + ", ".join(f"{k}={v}" for k, v in extra.items()) if extra else "SegReg (defaults)"
    plot(rows, args.out / "figure7.png", title)


if __name__ == "__main__":
    main()
