"""uresnet: U-ReSNet, joint affine + deformable registration and segmentation in one light network (seed 002).

Pipeline of `UReSNetMethod.register`:

1. both images are resampled onto one network grid around the fixed image (`common.prepare_pair`,
   RAS+, isotropic ``spacing`` mm, default 4, sizes rounded up to a multiple of 4) and normalised
   to [0, 1];
2. the network (`nets.uresnet.UReSNet`, about 270 k parameters) takes ``cat([moving, fixed])`` and
   gives the affine ``A``, the deformable sampling coordinates ``Phi`` (sigmoid derivatives
   integrated by cumulative sum, identity at initialisation) and the softmax segmentation of the
   moving image (eq. 2);
3. the whole mapping ``p -> A Phi(p)`` (eq. 1) goes back to the fixed image's grid as a physical
   field; the affine part alone goes to ``Result.affine`` (LPS mm, fixed point -> moving point);
4. the segmentation probabilities are sampled (trilinear) at the moving image's own voxels and
   turned into a FreeSurfer label map (``Result.moving_seg``); with option ``segment_fixed`` the
   network runs a second time with the roles swapped (moving := fixed) to segment the fixed image
   (``Result.fixed_seg``);
5. ``Result.warped_seg``: where a moving label map is given, that map warped by the mapping (what
   the registration Dice is measured on); otherwise the predicted segmentation warped by the same
   mapping (eq. 3). Option ``warped_seg="predicted"`` always gives eq. 3's warped segmentation.

Losses (eq. 4-7, `uresnet_loss`): ``MSE(R, W) + LCC(R, W)`` (LCC = `losses.lncc_loss`, the
``-mean(cc^2)`` of VoxelMorph with a 9^3 window), ours: of the two images smoothed first by a Gaussian of
``sim_blur`` voxels (`synth.render.smoothed`; training default 1, 0 = the paper's loss): trilinear
sampling blurs most at half-voxel offsets, so a similarity of two sharp images that no field aligns
exactly is best half a voxel off the right field (`training.hof` shows it on a box); ``alpha mean|A - A_I| + beta mean|g - 1|`` where
``g`` are the coordinate derivatives (``grad Phi - grad Phi_I`` along each axis); soft Dice of the
moving segmentation against the moving labels plus soft Dice of the warped segmentation against the
fixed labels (`losses.soft_dice_loss`, background excluded); all weights 1, alpha 0.1 and beta the
paper's 1e-11. Ours: eq. 6 also holds the cross-entropy of the moving segmentation (weight
``epsilon`` 1; 0 is the paper's loss): overfitting one pair, Dice alone took 400 steps to a mean
Dice of 0.74, Dice and cross-entropy 0.80 in 300, and with the wider network below 0.92.

Choices where the paper is silent (ours):

- segmentation classes: the paper's 3 merged structures (cerebral WM, cortex, lateral ventricles;
  `CLASSES`), left and right merged as in the paper, softmax with a background class (the paper:
  sigmoids). An earlier version added 12 deep structures: with the paper's 4 channels at full
  resolution the head could not separate 16 classes (one pair overfitted for 300 steps: mean Dice
  0.26, every structure under 300 voxels at 0);
- channels 16, 32, 32 (about 270 000 parameters) instead of the released models' 4, 8, 16 (25 000):
  the narrow network could not fit even one image's segmentation (mean Dice 0.74 after 400 steps
  overfitting one pair, where 16, 32, 32 reaches 0.92 in 300), and one training iteration (2 pairs
  at 44 x 52 x 60) costs 2.1 CPU seconds against 0.8;
- the output label map is split back into FreeSurfer left/right codes by the brain's mid-plane on
  the network grid (a voxel left of the centre of mass of the predicted brain along the RAS x axis
  gets the left code), so Dice against FreeSurfer labels can be computed; this assumes a roughly
  upright head (no large roll or yaw), like the paper's centre-of-mass aligned OASIS volumes;
- grid: 4 mm by default (44 x 52 x 60 for a 160 x 192 x 224 mm brain), multiples of 4 (two down
  levels): training on a 2-core CPU shared with other jobs costs 15-20 s per iteration at 3 mm, so
  4 mm buys about twice as many iterations in the same 25 minutes; inference is about a second.
  The segmentation probabilities are resampled linearly to the image's own resolution before the
  argmax, which recovers part of the detail;
- affine frame: centred, scaled indices (see `nets.uresnet`); ``A_I`` is the identity in that frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..device import resolve_device
from ..errors import InputError
from ..imageio.geometry import Geometry, Volume
from ..imageio.network_grid import network_geometry
from ..labels import label_info
from ..losses import lncc_loss, soft_dice_loss
from ..nets.layout import fast_layout
from ..nets.uresnet import UReSNet, index_affine, total_displacement
from ..spatial import warp
from ..spatial.physical import warp_volume
from ..synth.render import smoothed
from ..timing import Stopwatch
from ..weights import load_into
from .base import Inputs, Options, ProgressCallback, Result
from .catalogue import method_info
from .class_sampling import argmax_on
from .common import class_map, prepare_pair, result_from_network_field
from .options import validate_options

WEIGHT_NAME = "uresnet"
GRID_MULTIPLE = 4

# Segmentation classes: (name, FreeSurfer codes merged into the class, output code left, output code right).
CLASSES: tuple[tuple[str, tuple[int, ...], int, int], ...] = (
    ("background", (0,), 0, 0),
    ("cerebral white matter", (2, 41, 77, 251, 252, 253, 254, 255), 2, 41),
    ("cerebral cortex", (3, 42), 3, 42),
    ("lateral ventricle", (4, 43, 5, 44, 31, 63), 4, 43),
)
N_CLASSES = len(CLASSES)
_MAX_CODE = 1024

LOSS_WEIGHTS: dict[str, float] = {"alpha": 0.1, "beta": 1e-11, "gamma": 1.0, "delta": 1.0, "epsilon": 1.0, "w1": 1.0, "w2": 1.0}
CHANNELS = (16, 32, 32)


def class_lookup() -> torch.Tensor:
    """Table ``code -> class index`` (int64, length 1024); codes not in `CLASSES` go to background."""
    table = torch.zeros(_MAX_CODE, dtype=torch.int64)
    for index, (_, codes, _, _) in enumerate(CLASSES):
        table[list(codes)] = index
    return table


def labels_to_classes(labels: torch.Tensor) -> torch.Tensor:
    """FreeSurfer label map (integers, any shape) -> class indices (same shape)."""
    if labels.is_floating_point() or labels.min() < 0:
        raise InputError("label maps must hold non-negative integer FreeSurfer codes")
    labels = labels.long().clamp(max=_MAX_CODE - 1)
    return class_lookup().to(labels.device)[labels]


def one_hot(classes: torch.Tensor) -> torch.Tensor:
    """Class indices ``(B, 1, I, J, K)`` -> one-hot float ``(B, N_CLASSES, I, J, K)``."""
    return torch.nn.functional.one_hot(classes[:, 0], N_CLASSES).permute(0, 4, 1, 2, 3).float()


def classes_to_codes(classes: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Class indices and a left-hemisphere mask (same shape) -> FreeSurfer codes (int16)."""
    left_codes = np.asarray([c[2] for c in CLASSES], dtype=np.int16)
    right_codes = np.asarray([c[3] for c in CLASSES], dtype=np.int16)
    return np.where(left, left_codes[classes], right_codes[classes]).astype(np.int16)


def build_network() -> UReSNet:
    """A fresh U-ReSNet with `CHANNELS` and `N_CLASSES` segmentation classes."""
    return UReSNet(N_CLASSES, channels=CHANNELS)


def forward(net: UReSNet, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the network and add the index affine ``A`` (B, 4, 4), the whole displacement ``disp`` and ``warped_seg``."""
    out = net(moving, fixed)
    shape = tuple(moving.shape[2:])
    out["affine"] = index_affine(out["theta"], shape)
    out["disp"] = total_displacement(out["affine"], out["coordinates"])  # eq. 1
    out["warped_seg"] = warp(out["seg"], out["disp"])  # eq. 3
    return out


def uresnet_loss(
    out: dict[str, torch.Tensor],
    fixed: torch.Tensor,
    moving: torch.Tensor,
    fixed_classes: torch.Tensor | None = None,
    moving_classes: torch.Tensor | None = None,
    weights: dict[str, float] = LOSS_WEIGHTS,
    lcc_window: int = 9,
    sim_blur: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 7, ``w1 (L_recon + L_reg) + w2 L_seg``, and its terms; ``L_seg`` is left out without labels.
    ``sim_blur``: the smoothing (voxels) of both images before eq. 4's terms (module docstring)."""
    warped = warp(smoothed(moving, sim_blur), out["disp"])
    fixed = smoothed(fixed, sim_blur)
    mse = (fixed - warped).square().mean()
    lcc = lncc_loss(fixed, warped, window=lcc_window)
    recon = mse + lcc  # eq. 4
    identity = torch.eye(3, 4, dtype=out["theta"].dtype, device=out["theta"].device)
    affine_l1 = (out["theta"] - identity).abs().mean()
    gradient_l1 = (out["gradients"] - 1.0).abs().mean()
    reg = weights["alpha"] * affine_l1 + weights["beta"] * gradient_l1  # eq. 5
    loss = weights["w1"] * (recon + reg)
    terms = {"mse": mse.item(), "lcc": lcc.item(), "affine_l1": affine_l1.item(), "gradient_l1": gradient_l1.item()}
    if fixed_classes is not None and moving_classes is not None:
        dice_moving = soft_dice_loss(out["seg"], one_hot(moving_classes))
        dice_warped = soft_dice_loss(out["warped_seg"], one_hot(fixed_classes))
        cross_entropy = F.nll_loss(torch.log(out["seg"].clamp_min(1e-8)), moving_classes[:, 0])
        seg = weights["gamma"] * dice_moving + weights["delta"] * dice_warped + weights.get("epsilon", 0.0) * cross_entropy  # eq. 6
        loss = loss + weights["w2"] * seg  # eq. 7
        terms.update({"dice_moving": dice_moving.item(), "dice_warped": dice_warped.item(), "cross_entropy": cross_entropy.item()})
    return loss, terms


def _settings(options: Options) -> dict[str, Any]:
    """The method's settings: its declared options (`options.OPTIONS['uresnet']`), checked."""
    return validate_options("uresnet", options.extra)


def network_grid(geometry: Geometry, spacing: float) -> Geometry:
    """The network grid around ``geometry``: RAS+, isotropic ``spacing``, sizes multiples of 4."""
    return network_geometry(geometry, spacing=spacing, multiple=GRID_MULTIPLE)


def segmentation_volume(probabilities: torch.Tensor, grid: Geometry, target: Geometry, slab: int = 32) -> Volume:
    """Softmax ``(C, I, J, K)`` on the network grid -> FreeSurfer label map on ``target``.

    The class is the argmax of the probabilities sampled trilinearly at ``target``'s voxel centres (zero
    outside the network grid, i.e. background; `class_sampling.argmax_on`, on the probabilities' device); a
    voxel gets the left code of its class where it lies left of the predicted brain's centre of mass along the
    patient's left-right axis (LPS x), the right code otherwise (module docstring).
    """
    probs = probabilities.detach().float()[None]
    brain = (class_map(probs[0], 0) > 0).cpu().numpy()
    index = np.argwhere(brain).mean(axis=0) if brain.any() else (np.asarray(grid.shape) - 1.0) / 2.0
    centre_x = (grid.index_to_physical_matrix @ np.append(index, 1.0))[0]
    to_x = target.index_to_physical_matrix[0]  # LPS x of index (i, j, k): +x is the patient's left
    jk_x = to_x[1] * np.arange(target.shape[1])[:, None] + to_x[2] * np.arange(target.shape[2])[None, :] + to_x[3]
    classes = argmax_on(probs[0], grid, target).cpu().numpy()
    out = np.zeros(target.shape, dtype=np.int16)
    for start in range(0, target.shape[0], slab):
        rows = slice(start, min(start + slab, target.shape[0]))
        x = to_x[0] * np.arange(rows.start, rows.stop)[:, None, None] + jk_x[None]
        out[rows] = classes_to_codes(classes[rows], x > centre_x)
    return Volume(out, target)


def segmentation_dice(predicted: Volume, given: Volume) -> dict[str, Any]:
    """Dice of a predicted label map against given FreeSurfer labels: per output code and per merged class
    (both from one table of how the two maps overlap, `metrics.overlap.LabelCounts`)."""
    from ..metrics.overlap import LabelCounts

    counts = LabelCounts(np.asarray(given.array), np.asarray(predicted.array))
    given_codes = {code for code in counts.values.tolist() if counts.a[counts.index(code)] > 0}
    codes = sorted({c for _, _, left, right in CLASSES[1:] for c in (left, right)} & given_codes)
    per_code = {code: counts.dice(code) for code in codes}
    merged = {name: set(members) | {left, right} for name, members, left, right in CLASSES[1:]}
    per_class = {
        index: score
        for index, (name, _, _, _) in enumerate(CLASSES)
        if index > 0 and (score := counts.group_dice(merged[name])) is not None
    }
    paper = [per_class[i] for i in (1, 2, 3) if i in per_class]
    return {
        "per_label": {str(c): {"name": label_info(c).name, "dice": per_code[c]} for c in codes},
        "per_class": {CLASSES[i][0]: per_class[i] for i in range(1, N_CLASSES) if i in per_class},
        "mean_per_label": float(np.mean(list(per_code.values()))) if per_code else float("nan"),
        "mean_paper_classes": float(np.mean(paper)) if paper else float("nan"),
        "paper_classes_note": "cerebral white matter, cerebral cortex, lateral ventricles, left and right merged (paper 4.1)",
    }


def run_network(
    net: UReSNet,
    inputs: Inputs,
    spacing: float,
    device: torch.device,
    segment_fixed: bool = False,
    warped_seg: str = "auto",
    progress: ProgressCallback | None = None,
    watch: Stopwatch | None = None,
) -> Result:
    """Register and segment with a given network (see the module docstring); ``details`` holds the numbers
    and the seconds of each step (`timing`, on ``watch``)."""
    report = progress or (lambda fraction, stage: None)
    watch = watch or Stopwatch()
    report(0.0, "preparing")
    with watch.step("network grid"):
        grid = network_grid(inputs.fixed.geometry, spacing)
        pair = prepare_pair(inputs, device, spacing=spacing, shape=grid.shape)
    report(0.1, "inference")

    with watch.step("network"):
        net = fast_layout(net, device).eval()
        with torch.no_grad():
            out = forward(net, pair.moving, pair.fixed)
            fixed_probs = net(pair.fixed, pair.moving)["seg"][0] if segment_fixed else None
    report(0.4, "resampling")

    affine_index = out["affine"][0].double().cpu().numpy()
    result = result_from_network_field(inputs, pair.grid, out["disp"], affine_index, watch)
    with watch.step("segmentation"):
        result.moving_seg = segmentation_volume(out["seg"][0], pair.grid, inputs.moving.geometry)
        if warped_seg == "given" and inputs.moving_seg is None:
            raise InputError("uresnet option warped_seg='given' needs a moving label map (--moving-seg)")
        if warped_seg == "predicted" or (warped_seg == "auto" and inputs.moving_seg is None):
            result.warped_seg = warp_volume(result.moving_seg, result.displacement, interpolation="nearest")  # eq. 3
        if fixed_probs is not None:
            result.fixed_seg = segmentation_volume(fixed_probs, pair.grid, inputs.fixed.geometry)
    report(0.9, "resampling")

    details: dict[str, Any] = {
        "network_grid": {"shape": list(pair.grid.shape), "spacing_mm": float(pair.grid.spacing[0])},
        "affine_index": affine_index.tolist(),
        "warped_seg": "predicted" if warped_seg == "predicted" or inputs.moving_seg is None else "given labels warped",
        "classes": [c[0] for c in CLASSES],
    }
    with watch.step("segmentation scores"):
        if inputs.moving_seg is not None:
            details["moving_segmentation_dice"] = segmentation_dice(result.moving_seg, inputs.moving_seg)
        if inputs.fixed_seg is not None and result.fixed_seg is not None:
            details["fixed_segmentation_dice"] = segmentation_dice(result.fixed_seg, inputs.fixed_seg)
    details["timings"], details["cpu_timings"] = watch.seconds, watch.cpu_seconds
    result.details = details
    report(1.0, "resampling")
    return result


class UReSNetMethod:
    """The uresnet method (see the module docstring)."""

    info = method_info("uresnet")

    def register(self, inputs: Inputs, options: Options, progress: ProgressCallback | None = None) -> Result:
        """Register ``inputs.moving`` onto ``inputs.fixed`` and segment it (see the module docstring)."""
        s = _settings(options)
        device = resolve_device(options.device)
        torch.manual_seed(int(options.seed))
        watch = Stopwatch()
        with watch.step("weights"):
            net = build_network()
            checksum = load_into(net, WEIGHT_NAME)
        result = run_network(net, inputs, s["spacing"], device, s["segment_fixed"], s["warped_seg"], progress, watch)
        result.weights = {WEIGHT_NAME: checksum}
        result.details["settings"] = s
        return result


METHOD = UReSNetMethod()

__all__ = [
    "CLASSES",
    "METHOD",
    "UReSNetMethod",
    "build_network",
    "classes_to_codes",
    "forward",
    "labels_to_classes",
    "run_network",
    "segmentation_volume",
    "uresnet_loss",
]
