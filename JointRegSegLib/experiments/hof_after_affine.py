"""What hof's network adds after the affine stage, on its training's held-apart pairs (issue 17).

The method runs the network on pairs its NMI affine stage has aligned; this scores the network the same way on
the training's four held-apart pairs (SynthSeg maps 17 -> 18 -> 19 -> 20 -> 17, rendered T1-like with fixed seeds,
`training.hof`), the maps as the bank holds them (``--given``) or brought to their mean shape (``prealign``, the
training's default). Per pair and on average, Dice over hof's classes (`training.common.dice_present`) of:

- the pair as it is (``identity``);
- the network alone, symmetric as the method runs it (``network``);
- the NMI affine stage alone (``affine``, `methods.affine_stage`, the method's settings);
- the affine stage, then the network on the aligned pair (``affine_then_network``: what the method does).

Weights: the shipped ``hof`` (default), another folder's (``--weights-folder``, e.g. a run's output) or a training
checkpoint's network (``--checkpoint .training/checkpoints/hof.pt``). Needs ../shared/data (the bank).

Usage::

    python -m JointRegSegLib.experiments.hof_after_affine [--given] [--weights-folder DIR | --checkpoint PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..methods.affine_stage import affine_or_identity
from ..methods.hof import N_CLASSES
from ..methods.options import defaults
from ..spatial import affine_to_displacement, compose, warp
from ..training import make_trainer
from ..training.common import dice_present
from ..weights import load_into

COLUMNS = ("identity", "network", "affine", "affine_then_network")


def scores(prealign: bool, folder: Path | None = None, checkpoint: Path | None = None) -> dict[str, list[float]]:
    """Each column's Dice per held-apart pair (module docstring)."""
    trainer = make_trainer("hof", {"iterations": 1, "threads": 1, "prealign": prealign})
    if checkpoint is not None:
        trainer.net.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["modules"]["net"])
    else:
        load_into(trainer.net, "hof", folder)
    net, method = trainer.net.eval(), defaults("hof")
    images, truth = trainer.validation.float().contiguous(), trainer.validation_classes
    labels = list(range(1, N_CLASSES))
    out: dict[str, list[float]] = {column: [] for column in COLUMNS}
    for k in range(len(images)):
        fixed, moving = images[k : k + 1], torch.roll(images, -1, 0)[k : k + 1]
        fixed_labels, moving_labels = truth[k], torch.roll(truth, -1, 0)[k : k + 1].float()
        matrix = affine_or_identity(fixed, moving, method["affine"], method["affine_iterations"], 0)
        affine = affine_to_displacement(torch.as_tensor(matrix, dtype=torch.float32), fixed.shape[2:])
        with torch.no_grad():
            alone = net.register(moving, fixed, symmetric=method["symmetric"])
            after = compose(affine, net.register(warp(moving, affine), fixed, symmetric=method["symmetric"]))
        for column, field in zip(COLUMNS, (torch.zeros_like(affine), alone, affine, after)):
            out[column].append(dice_present(fixed_labels, warp(moving_labels, field, mode="nearest").long()[0], labels))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--given", action="store_true", help="the maps as the bank holds them, not pre-aligned")
    parser.add_argument("--weights-folder", type=Path, help="a folder with hof weights and their manifest (default: the shipped ones)")
    parser.add_argument("--checkpoint", type=Path, help="a training checkpoint's network instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = scores(not args.given, args.weights_folder, args.checkpoint)
    print(json.dumps({"pairs": {c: [round(v, 4) for v in values] for c, values in result.items()},
                      "mean": {c: round(float(np.mean(values)), 4) for c, values in result.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
