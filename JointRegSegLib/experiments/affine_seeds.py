"""How the NMI affine stage lands over seeds (issue 20): the label maps' mean Dice after the affine alone.

On the benchmark pair (../shared/data/pair), both images go onto a network grid as the methods put them there
(`methods.common.prepare_pair`, default 3 mm: hof's), `methods.affine_stage.fit_affine` registers them with each seed,
and the moving label map, pulled through the affine (nearest neighbour), is scored against the fixed one on that grid
(`metrics.mean_dice` over the labels both hold). Printed per seed: the Dice, the affine's volume ratio and the seconds
the fit took; then the mean, spread and least Dice. ``--rates`` gives one learning rate per pyramid level (default:
the stage's own, `affine_stage.LEVEL_LR_POWER`).

Usage::

    python -m JointRegSegLib.experiments.affine_seeds [--seeds 16] [--spacing 3] [--rates 0.02,0.01,0.005]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ..data_paths import shared_data_dir
from ..errors import InputError
from ..imageio import read_image, read_labels
from ..methods.affine_stage import DEFAULT_LR, fit_affine
from ..methods.base import Inputs
from ..methods.common import prepare_pair
from ..metrics import mean_dice
from ..sample_data import FILES
from ..spatial import affine_to_displacement, warp


def shared_pair() -> Inputs:
    """The benchmark pair (../shared/data/pair) with its label maps."""
    folder = shared_data_dir() / "pair"
    if not folder.is_dir():
        raise InputError(f"{folder} does not exist: this experiment needs ../shared/data (or JRS_SHARED_DATA set to it).")
    images = {key: (read_labels if key.endswith("_seg") else read_image)(folder / name) for key, name in FILES.items()}
    return Inputs(images["fixed"], images["moving"], images["fixed_seg"], images["moving_seg"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=16, help="seeds 0 .. N-1 (default 16)")
    parser.add_argument("--spacing", type=float, default=3.0, help="the network grid's spacing, mm (default 3: hof's)")
    parser.add_argument("--rates", default=None, help="learning rates per level, comma-separated (default: the stage's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pair = prepare_pair(shared_pair(), torch.device("cpu"), spacing=args.spacing)
    fixed_labels = pair.fixed_seg[0, 0].numpy().astype(np.int32)
    lr = DEFAULT_LR if args.rates is None else [float(x) for x in args.rates.split(",")]
    rows = []
    for seed in range(args.seeds):
        started = time.perf_counter()
        matrix = fit_affine(pair.fixed, pair.moving, lr=lr, seed=seed)
        seconds = time.perf_counter() - started
        field = affine_to_displacement(torch.as_tensor(matrix, dtype=torch.float32), pair.fixed.shape[2:])
        moved = warp(pair.moving_seg.float(), field, mode="nearest")[0, 0].numpy().astype(np.int32)
        rows.append((mean_dice(fixed_labels, moved), float(np.linalg.det(matrix[:3, :3])), seconds))
        print(f"seed {seed}: Dice {rows[-1][0]:.4f}, volume ratio {rows[-1][1]:.4f}, {seconds:.2f} s", flush=True)
    dice, ratio, seconds = np.asarray(rows).T
    print(
        f"Dice mean {dice.mean():.4f} (sd {dice.std():.4f}, least {dice.min():.4f}); volume ratio {ratio.mean():.4f} "
        f"(sd {ratio.std():.4f}); median {np.median(seconds):.2f} s a fit"
    )


if __name__ == "__main__":
    main()
