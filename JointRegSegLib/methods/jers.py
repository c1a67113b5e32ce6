"""jers: one-shot joint brain extraction, affine registration to an atlas, and segmentation (seed 003).

The moving image is a RAW head scan (with skull); the fixed image is a labelled, skull-stripped atlas
(default: the shipped 2 mm MNI152 atlas with tissue labels, `JointRegSegLib.atlas`). Pipeline of
`JERSMethod.register` (networks and composition order: `nets.jers`):

1. the raw image goes onto its own network grid (RAS+, isotropic ``SPACING`` mm, ``GRID_SHAPE``,
   centred on the raw image's field of view) and the atlas onto an atlas network grid of the same
   shape and spacing centred on the atlas; both are percentile-normalised to [0, 1];
2. extraction: ``M`` shared-U-Net stages with the Heaviside step at inference (section 3.1); the
   brain mask is the product of the stage masks;
3. registration: ``N`` shared affine-CNN stages, composed ``A_c^k = A_c^{k-1} A_i^k`` (pull
   convention), always resampling the extracted image (section 3.2);
4. segmentation: the segmentation U-Net on the raw image (section 3.3.2) when the atlas labels are
   the shipped tissue codes (``option segmentation="network"``, the default); with another atlas
   label map, or ``segmentation="atlas"`` (the paper's "w/o Seg" variant), the atlas labels are
   warped into the raw image's space by the inverse affine (eq. 7, nearest neighbour);
5. outputs at the user's resolution: ``Result.affine`` (LPS, atlas point -> raw point) and the
   equivalent ``displacement`` on the atlas grid; ``warped`` = the extracted image (raw x mask at
   full resolution) resampled onto the atlas grid; ``brain_mask`` (uint8) and ``moving_seg`` on the
   raw image's grid (the network-grid mask resampled nearest-neighbour, the labels the argmax of the class
   probabilities interpolated linearly, `class_sampling.argmax_on`; before 2026-11-30 nearest-neighbour); ``fixed_seg`` =
   the atlas labels; ``warped_seg`` = the user's moving label map warped to the atlas, if given.
   ``extracted`` = the raw image times the mask on the raw grid. With the shipped atlas, segmentation
   labels are FreeSurfer's FSL-FAST tissue codes (701 CSF, 702 grey matter, 703 white matter), which
   do not collide with aseg codes in Slicer's lookup table or in the evaluation.

Options (``options.extra``): ``extraction_stages`` (M, default 5), ``registration_stages`` (N,
default 5), ``extraction`` (true; false = the w/o-Ext variant, mask of ones), ``segmentation``
("network" or "atlas"), ``weights`` (name in the manifest, default "jers").

Choices where the paper is silent: see `training.jers` (data, loss scales) and `nets.jers`.
Segmentation codes are the atlas's: for the shipped atlas ``1`` CSF, ``2`` grey matter, ``3`` white
matter (`atlas.TISSUE_CODES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..atlas import TISSUE_CODES
from ..device import resolve_device
from ..errors import InputError
from ..imageio.geometry import Geometry, Volume
from ..imageio.intensity import normalise_intensity
from ..imageio.network_grid import from_network, network_geometry, to_network
from ..nets.jers import JERS
from ..nets.layout import fast_layout
from ..spatial.affine import normalised_affine_to_index
from ..spatial.physical import mapped_coordinates, warp_volume, warp_volume_affine
from ..labels import tissue_codes
from ..timing import Stopwatch
from ..weights import load_into
from .base import Inputs, Options, ProgressCallback, Result
from .catalogue import method_info
from .class_sampling import argmax_on
from .options import validate_options

GRID_SHAPE = (64, 64, 64)
SPACING = 3.0
MIN_EXTENT_MM = GRID_SHAPE[0] * SPACING / 3  # a third of the network's field of view along every axis
CLASSES = len(TISSUE_CODES)


@dataclass
class NetworkImage:
    """An image on its network grid: the grid and the normalised tensor (1, 1, I, J, K)."""

    grid: Geometry
    tensor: torch.Tensor


def to_network_image(volume: Volume, device: torch.device, shape: tuple[int, int, int] = GRID_SHAPE, spacing: float = SPACING) -> NetworkImage:
    """``volume`` resampled onto a RAS+ grid of ``shape`` x ``spacing`` mm centred on it, normalised to [0, 1]."""
    grid = network_geometry(volume.geometry, spacing=spacing, shape=shape)
    array = normalise_intensity(to_network(volume, grid))
    return NetworkImage(grid, torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device))


def labels_to_onehot(labels: np.ndarray, classes: int, device: torch.device) -> torch.Tensor:
    """One-hot ``(1, classes, I, J, K)`` float tensor of an integer array with values in ``0..classes-1``."""
    tensor = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return F.one_hot(tensor, classes).permute(3, 0, 1, 2)[None].float().to(device)


def atlas_on_grid(image: Volume, labels: Volume | None, device: torch.device) -> tuple[NetworkImage, torch.Tensor | None]:
    """The atlas image on its network grid and, when its labels are the tissue codes, their one-hot tensor."""
    atlas = to_network_image(image, device)
    if labels is None or not set(np.unique(labels.array).tolist()) <= set(TISSUE_CODES):
        return atlas, None
    return atlas, labels_to_onehot(to_network(labels, atlas.grid, labels=True), CLASSES, device)


def index_affine(theta: torch.Tensor) -> np.ndarray:
    """The normalised 4x4 ``theta`` as an index affine of the (equal-shaped) network grids."""
    return normalised_affine_to_index(theta.detach().double().cpu().numpy()[0], GRID_SHAPE)


def physical_affine(theta: torch.Tensor, atlas_grid: Geometry, raw_grid: Geometry) -> np.ndarray:
    """LPS 4x4 taking an atlas point to the raw-image point (``G_raw A_index G_atlas^-1``)."""
    return raw_grid.index_to_physical_matrix @ index_affine(theta) @ atlas_grid.physical_to_index_matrix


def affine_displacement(matrix: np.ndarray, grid: Geometry) -> Volume:
    """Physical displacement ``u(x) = M x - x`` (LPS mm) on ``grid`` of an LPS affine ``M``.

    ``u`` is affine in the voxel index ``p`` (``x = G p``): ``u = (M - I) G p``, summed axis by axis in
    float64 with broadcasting, one component at a time, each rounded to float32 as it is stored (no array of every
    voxel's position, no float64 volume).
    """
    b = (np.asarray(matrix, dtype=np.float64) - np.eye(4)) @ grid.index_to_physical_matrix
    i, j, k = (np.arange(n, dtype=np.float64) for n in grid.shape)
    field = np.empty((*grid.shape, 3), dtype=np.float32)
    for c in range(3):
        np.add(b[c, 0] * i[:, None, None], b[c, 1] * j[:, None] + (b[c, 2] * k + b[c, 3]), out=field[..., c], casting="same_kind")
    return Volume(field, grid)


def build_model() -> JERS:
    """A fresh JERS model with the shipped configuration."""
    return JERS(classes=CLASSES)


def _settings(options: Options) -> dict[str, Any]:
    """The method's settings: its declared options (`options.OPTIONS['jers']`), checked."""
    return validate_options("jers", options.extra)


def check_head(raw: Volume) -> None:
    """The raw image spans a head (`MIN_EXTENT_MM` along every axis), not a slab or a few slices."""
    extent = np.asarray(raw.geometry.shape) * np.asarray(raw.geometry.spacing)
    if extent.min() < MIN_EXTENT_MM:
        raise InputError(
            f"jers needs a whole head, but the moving image spans only {extent.min():.0f} mm along one axis (at least "
            f"{MIN_EXTENT_MM:.0f} mm; its network sees {GRID_SHAPE[0] * SPACING:.0f} mm). Give the full 3D head scan."
        )


def _warped(
    image: Volume, labels: Volume | None, matrix: np.ndarray, field: Volume, target: Geometry, device: torch.device
) -> tuple[Volume, Volume | None]:
    """The image (linear) and label map (nearest) warped onto ``target`` by the LPS affine ``matrix``: on the CPU by
    SimpleITK's resampling of the affine itself (threaded, no sampling grid), on a GPU by ``grid_sample`` at the
    points of its displacement ``field``, computed once for both."""
    if device.type != "cuda":
        warped = warp_volume_affine(image, matrix, target)
        return warped, (warp_volume_affine(labels, matrix, target, "nearest") if labels is not None else None)
    coordinates = mapped_coordinates(field, image.geometry, device)
    warped = warp_volume(image, field, coordinates=coordinates)
    if labels is None:
        return warped, None
    same_grid = labels.geometry.same_as(image.geometry)
    return warped, warp_volume(labels, field, "nearest", coordinates=coordinates if same_grid else None)


class JERSMethod:
    """The jers method (see the module docstring)."""

    info = method_info("jers")

    def register(self, inputs: Inputs, options: Options, progress: ProgressCallback | None = None) -> Result:
        """Extract, register ``inputs.moving`` (raw head) to ``inputs.fixed`` (atlas) and segment it."""
        s = _settings(options)
        check_head(inputs.moving)
        report = progress or (lambda fraction, stage: None)
        device = resolve_device(options.device)
        watch = Stopwatch()
        report(0.0, "preparing")
        with watch.step("weights"):
            model = build_model()
            checksum = load_into(model, s["weights"])
            model = fast_layout(model, device).eval()
        with watch.step("network grid"):
            raw = to_network_image(inputs.moving, device)
            atlas, onehot = atlas_on_grid(inputs.fixed, inputs.fixed_seg, device)
        report(0.2, "extraction, registration, segmentation")

        use_network = s["segmentation"] == "network" and onehot is not None
        with watch.step("network"), torch.no_grad():
            out = model(
                raw.tensor, atlas.tensor, None, s["extraction_stages"], s["registration_stages"], hard=True,
                extraction=s["extraction"], segmentation=use_network,
            )
        report(0.6, "resampling")

        with watch.step("brain mask"):
            mask_net = torch.stack(out.masks).prod(dim=0)[0, 0].cpu().numpy().astype(np.uint8)
            brain_mask = from_network(mask_net, raw.grid, inputs.moving.geometry, labels=True)
            brain_mask = brain_mask.with_array(brain_mask.array.astype(np.uint8))
            extracted = inputs.moving.with_array((inputs.moving.array * brain_mask.array).astype(np.float32))
        with watch.step("field to fixed grid"):
            matrix = physical_affine(out.affine, atlas.grid, raw.grid)
            field = affine_displacement(matrix, inputs.fixed.geometry)
        with watch.step("warping"):  # the extracted image and the moving label map
            warped, warped_seg = _warped(extracted, inputs.moving_seg, matrix, field, inputs.fixed.geometry, device)
        with watch.step("segmentation"):
            if use_network:
                probabilities = torch.softmax(out.segmentation_logits, dim=1)[0]
                classes = argmax_on(probabilities, raw.grid, inputs.moving.geometry).cpu().numpy().astype(np.uint8)
                moving_seg = Volume(classes, inputs.moving.geometry)
            elif inputs.fixed_seg is not None:
                moving_seg = warp_volume_affine(inputs.fixed_seg, np.linalg.inv(matrix), inputs.moving.geometry, "nearest")
            else:
                moving_seg = None
            if moving_seg is not None and onehot is not None:  # tissue classes -> FreeSurfer's FSL-FAST codes
                moving_seg = moving_seg.with_array(tissue_codes(moving_seg.array))
        report(1.0, "resampling")
        details: dict[str, Any] = {
            "settings": {k: s[k] for k in sorted(s)},
            "segmentation_source": "network" if use_network else "atlas labels warped by the inverse affine",
            "network_grid": {"shape": list(GRID_SHAPE), "spacing_mm": SPACING},
            "index_affine": index_affine(out.affine).tolist(),
            "stage_affines_normalised": [a[0].cpu().numpy().tolist() for a in out.stage_affines],
            "timings": watch.seconds,
            "cpu_timings": watch.cpu_seconds,
        }
        return Result(
            displacement=field, warped=warped, affine=matrix, moving_seg=moving_seg, warped_seg=warped_seg,
            brain_mask=brain_mask, extracted=extracted, weights={s["weights"]: checksum}, details=details,
        )


METHOD = JERSMethod()

__all__ = [
    "METHOD", "JERSMethod", "affine_displacement", "atlas_on_grid", "build_model", "index_affine", "physical_affine",
    "to_network_image",
]
