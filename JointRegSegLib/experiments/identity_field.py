"""How far each learned network moves an image registered to itself (issue 17): the right answer is nowhere.

For every image given (default: the bundled sample pair's two images) and every method in ``--methods``
(``hof``, ``uresnet``), the image goes onto the method's network grid as the method puts it there
(`methods.common.prepare_pair`; hof 3 mm, uresnet 4 mm), the network registers it to itself with the
weights of this checkout (``Resources/weights``), and the displacement (voxels of that grid) is summarised
inside the image's foreground (normalised intensity above ``FOREGROUND``); ``--checkpoint`` takes a training
checkpoint's network instead (``.training/checkpoints/NAME.pt``, its module ``net``): per axis the mean (a constant
shift) and the mean absolute value, and the mean length.

A network that learned registration moves such an image by little; the shipped hof and uresnet networks move it
by about a voxel of their grids (docs/results/hof.md, uresnet.md), which hof's symmetric registration cancels.

Usage::

    python -m JointRegSegLib.experiments.identity_field [IMAGE ...] [--methods hof,uresnet] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..imageio import read_image
from ..methods.base import Inputs
from ..methods.common import prepare_pair
from ..sample_data import sample_pair
from ..weights import load_into

FOREGROUND = 0.05  # normalised intensity above which a voxel counts as the image's foreground
METHODS = ("hof", "uresnet")


def _load(net: torch.nn.Module, name: str, checkpoint: Path | None) -> None:
    """The shipped weights ``name``, or the network of a training checkpoint."""
    if checkpoint is None:
        load_into(net, name)
    else:
        net.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["modules"]["net"])


def identity_field(method: str, image: Path, checkpoint: Path | None = None) -> dict[str, Any]:
    """Summary of the displacement the ``method`` network (shipped, or of ``checkpoint``) predicts for ``image``
    registered to itself."""
    volume = read_image(image)
    device = torch.device("cpu")
    if method == "hof":
        from ..methods.hof import build_net

        net, spacing = build_net(), 3.0
        _load(net, "hof", checkpoint)
        pair = prepare_pair(Inputs(volume, volume), device, spacing=spacing)
        with torch.no_grad():
            disp = net.eval().register(pair.moving, pair.fixed)
    elif method == "uresnet":
        from ..methods.uresnet import WEIGHT_NAME, build_network, forward, network_grid

        net, spacing = build_network(), 4.0
        _load(net, WEIGHT_NAME, checkpoint)
        pair = prepare_pair(Inputs(volume, volume), device, spacing=spacing, shape=network_grid(volume.geometry, spacing).shape)
        with torch.no_grad():
            disp = forward(net.eval(), pair.moving, pair.fixed)["disp"]
    else:
        raise SystemExit(f"--methods takes {', '.join(METHODS)}; got {method!r}")
    inside = (pair.fixed[0, 0] > FOREGROUND).numpy()
    u = disp[0].numpy()[:, inside]  # (3, n) voxels of the network grid
    return {
        "method": method,
        "image": str(image),
        "grid_mm": spacing,
        "voxels": int(inside.sum()),
        "mean": [round(float(v), 3) for v in u.mean(axis=1)],
        "mean_abs": [round(float(v), 3) for v in np.abs(u).mean(axis=1)],
        "mean_length": round(float(np.linalg.norm(u, axis=0).mean()), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path, help="images to register to themselves (default: the sample pair's)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: hof, uresnet")
    parser.add_argument("--checkpoint", type=Path, help="a training checkpoint's network instead of the shipped weights (one method)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images = args.images or [sample_pair()["fixed"], sample_pair()["moving"]]
    rows = [identity_field(method, image, args.checkpoint) for method in args.methods.split(",") for image in images]
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
