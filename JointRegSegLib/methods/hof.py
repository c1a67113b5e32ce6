"""hof: hierarchical bi-level joint registration and few-shot segmentation (seed 000).

One frozen shared encoder, a registration decoder (the leader of the bi-level problem) and a
segmentation decoder (the follower), trained by `training.hof` (pretraining, decoder training
with AAA pseudo-labels, GRA refinement; networks in `nets.hof`). `HOFMethod.register`:

1. both images are resampled onto the fixed image's network grid (`common.prepare_pair`, RAS+,
   isotropic ``spacing``, default 3 mm: the training grid) and normalised to [0, 1];
2. an affine stage (`affine_stage.fit_affine`; option ``affine``: ``"nmi"`` default, ``"mi"``,
   ``"ncc"`` or ``"none"``) - the paper registers affinely pre-aligned volumes (section 4.1), so
   this replaces its preprocessing;
3. the registration decoder predicts ``psi = f_r(F_moving, F_fixed)`` (eq. 2) from the affinely
   aligned moving image; with option ``symmetric`` (default; ours) of the antisymmetric part of both
   directions' velocities, ``(v(m, f) - v(f, m)) / 2`` (`nets.hof`): the shipped network moves any pair
   by about a voxel, an image registered to itself included, and this cancels that part (benchmark
   pair: Dice after the affine stage 0.620, the network one way 0.564, symmetric 0.643); the whole
   mapping ``compose(affine, psi)`` goes back to the fixed grid as a physical field with the warped
   image (`common.result_from_network_field`);
4. the segmentation decoder labels the fixed image (on its network grid) and the moving image (on
   its OWN network grid, so nothing outside the fixed field of view is lost); the classes are
   mapped to FreeSurfer codes (`HOF_LABELS`, 28 of the 30 evaluation structures); each image's label map
   on its own grid is the argmax of the class probabilities interpolated linearly there
   (`class_sampling.argmax_on`, as nnU-Net brings its labels to the scan; before 2026-11-30 the 3 mm labels
   by nearest neighbour). With option ``mirror`` (default; ours, as nnU-Net's
   test-time mirroring) the class probabilities are averaged with those of the image mirrored left to
   right (the network grid's first axis, RAS+), mirrored back with each left structure's class swapped
   for its right one (`mirrored_probabilities`): benchmark pair, Dice over its 28 structures 0.605 / 0.580
   -> 0.612 / 0.596 (fixed / moving). On the CPU the fixed image is segmented beside the affine stage, which runs
   on one thread (`device.Beside`: the other core segments, on one thread too; the same labels), the moving image
   after the network; the step "segmentation" is the moving image's and what was left of the fixed image's.

Option ``weights`` picks the shipped weights: ``hof`` (the full method) or a Table 3 ablation
(``hof_no_aaa``, ``hof_no_gra``, ``hof_no_feedback``, ``hof_unfrozen``) or the model before refinement
(``hof_phase2``). No test-time
optimisation (the paper has none); ``options.iterations`` and ``options.time_budget`` are unused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..device import Beside, resolve_device
from ..errors import InputError
from ..imageio.geometry import Volume
from ..imageio.intensity import normalise_intensity
from ..imageio.network_grid import network_geometry, to_network
from ..labels import EVALUATION_LABELS, label_info
from ..nets.hof import HOFNet
from ..nets.layout import fast_layout
from ..spatial import affine_to_displacement, compose, warp
from ..timing import Stopwatch
from ..weights import load_into
from .affine_stage import affine_or_identity
from .base import Inputs, Options, ProgressCallback, Result
from .catalogue import method_info
from .class_sampling import argmax_on
from .common import prepare_pair, result_from_network_field
from .options import validate_options

# Segmentation classes: background plus the 28 of the 30 evaluation structures that the SynthSeg
# training maps contain (the choroid plexus, 31 and 63, is absent from them); other codes are background.
HOF_LABELS: tuple[int, ...] = tuple(code for code in EVALUATION_LABELS if code not in (31, 63))
N_CLASSES = len(HOF_LABELS) + 1
_STAGES = {"preparing": (0.0, 0.1), "affine": (0.1, 0.5), "inference": (0.5, 0.7), "segmentation": (0.7, 0.85),
           "resampling": (0.85, 1.0)}


def _settings(options: Options) -> dict[str, Any]:
    """The method's settings: its declared options (`options.OPTIONS['hof']`), checked."""
    return validate_options("hof", options.extra)


def build_net(integration_steps: int = 5) -> HOFNet:
    """The HOF network the method runs and the training trains (`nets.hof`)."""
    return HOFNet(N_CLASSES, integration_steps=integration_steps)


def class_lookup(max_code: int) -> np.ndarray:
    """Array mapping a FreeSurfer code (0..max_code) to its HOF class (0 = background)."""
    lut = np.zeros(max(max_code, max(HOF_LABELS)) + 1, dtype=np.int64)
    for index, code in enumerate(HOF_LABELS, start=1):
        lut[code] = index
    return lut


def codes_to_classes(codes: np.ndarray) -> np.ndarray:
    """FreeSurfer label map -> HOF class map (codes outside `HOF_LABELS` become 0)."""
    codes = np.asarray(codes).astype(np.int64)
    if codes.min() < 0:
        raise InputError("label maps must hold non-negative FreeSurfer codes")
    return class_lookup(int(codes.max()))[codes]


def classes_to_codes(classes: np.ndarray) -> np.ndarray:
    """HOF class map -> FreeSurfer codes (`labels.py` codes; 0 stays background)."""
    table = np.asarray((0, *HOF_LABELS), dtype=np.int16)
    return table[np.asarray(classes, dtype=np.int64)]


def mirror_classes() -> list[int]:
    """For each class (background first), the class of the same structure on the other side (itself on the midline)."""
    names = [label_info(code).name for code in HOF_LABELS]
    other = {name: name.replace("Left-", "Right-") if name.startswith("Left-") else name.replace("Right-", "Left-") for name in names}
    return [0] + [1 + names.index(other[name]) for name in names]


def mirrored_probabilities(net: HOFNet, image: torch.Tensor) -> torch.Tensor:
    """Class probabilities of ``image (B, 1, I, J, K)`` (RAS+ grid) averaged with those of its left-right mirror image,
    mirrored back with left and right classes swapped (module docstring): mirroring the image mirrors the result."""
    n = len(image)
    both = torch.softmax(net.segment(torch.cat([image, image.flip(2)])), dim=1)  # one batch: faster than two on the CPU
    return 0.5 * (both[:n] + both[n:].flip(2)[:, mirror_classes()])


def class_probabilities(net: HOFNet, image: torch.Tensor, mirror: bool) -> torch.Tensor:
    """Class probabilities of ``image (B, 1, I, J, K)``: averaged with the mirror image's where ``mirror``
    (`mirrored_probabilities`), else the softmax of the segmentation decoder's one pass."""
    return mirrored_probabilities(net, image) if mirror else torch.softmax(net.segment(image), dim=1)


def segment_volume(
    net: HOFNet, volume: Volume, spacing: float, device: torch.device, on_grid: torch.Tensor | None = None, mirror: bool = True
) -> Volume:
    """Label map (FreeSurfer codes) of ``volume`` on its own grid: the segmentation decoder's class probabilities on
    its network grid, interpolated linearly at the volume's voxels, and their argmax (`class_sampling.argmax_on`).
    ``on_grid``: the volume already on that grid and normalised (`common.prepare_pair`'s fixed image), where at hand;
    ``mirror``: averaged with the mirror image's (`mirrored_probabilities`)."""
    grid = network_geometry(volume.geometry, spacing=spacing)
    image = on_grid if on_grid is not None else torch.from_numpy(normalise_intensity(to_network(volume, grid)))[None, None].to(device)
    with torch.no_grad():
        classes = argmax_on(class_probabilities(net, image, mirror)[0], grid, volume.geometry).cpu().numpy()
    return Volume(classes_to_codes(classes), volume.geometry)


class HOFMethod:
    """The hof method (see the module docstring)."""

    info = method_info("hof")

    def register(self, inputs: Inputs, options: Options, progress: ProgressCallback | None = None) -> Result:
        """Register ``inputs.moving`` onto ``inputs.fixed`` and segment both (see the module docstring)."""
        s = _settings(options)
        device = resolve_device(options.device)
        torch.manual_seed(int(options.seed))

        def report(fraction: float, stage: str) -> None:
            if progress is not None:
                low, high = _STAGES[stage]
                progress(low + (high - low) * min(1.0, max(0.0, fraction)), stage)

        watch = Stopwatch()
        report(0.0, "preparing")
        with watch.step("weights"):
            net = build_net()
            checksum = load_into(net, s["weights"])
            net = fast_layout(net, device).eval()
        with watch.step("network grid"):
            pair = prepare_pair(inputs, device, spacing=s["spacing"])
        shape = pair.grid.shape
        report(1.0, "preparing")

        fixed_labels = Beside(lambda: segment_volume(net, inputs.fixed, s["spacing"], device, pair.fixed, s["mirror"]), device)
        with watch.step("affine stage"):
            affine_index = affine_or_identity(
                pair.fixed, pair.moving, s["affine"], s["affine_iterations"], int(options.seed),
                progress=lambda f, _stage: report(f, "affine"),
            )
            affine_disp = affine_to_displacement(torch.as_tensor(affine_index, dtype=torch.float32, device=device), shape)
            moved = warp(pair.moving, affine_disp)
        report(1.0, "affine")

        with watch.step("network"):
            with torch.no_grad():
                psi = net.register(moved, pair.fixed, symmetric=s["symmetric"])  # eq. 2: psi = f_r(F_moving, F_fixed)
            total = compose(affine_disp, psi)
        report(1.0, "inference")

        with watch.step("segmentation"):
            moving_seg = segment_volume(net, inputs.moving, s["spacing"], device, mirror=s["mirror"])
            report(0.5, "segmentation")
            fixed_seg = fixed_labels.result()
        report(1.0, "segmentation")

        result = result_from_network_field(inputs, pair.grid, total, affine_index, watch)
        result.fixed_seg, result.moving_seg = fixed_seg, moving_seg
        report(1.0, "resampling")
        result.weights = {s["weights"]: checksum}
        result.details = {
            "weights": s["weights"],
            "network_grid": {"shape": list(shape), "spacing_mm": s["spacing"]},
            "settings": {k: s[k] for k in sorted(s)},
            "timings": watch.seconds,
            "cpu_timings": watch.cpu_seconds,
        }
        return result


METHOD = HOFMethod()

__all__ = [
    "HOF_LABELS", "METHOD", "N_CLASSES", "HOFMethod", "build_net", "classes_to_codes", "codes_to_classes", "mirror_classes",
    "class_probabilities", "mirrored_probabilities", "segment_volume",
]
