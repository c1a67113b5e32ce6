"""The shipped atlas: a 2 mm MNI152 brain (skull-stripped) with a derived tissue label map.

`build_atlas` makes ``Resources/Atlas/mni152_t1_2mm.nii.gz`` and ``mni152_tissue_2mm.nii.gz`` from
the nilearn MNI152 2009a (symmetric) files in ../shared/data/mni152, which share one 1 mm grid
(197 x 233 x 189):

1. brain mask: the skull-stripped template's non-zero voxels (``t1 > 0``);
2. each input (the T1 template, the brain mask, the GM and WM probability maps, read as [0, 1])
   is smoothed with a Gaussian of sigma 0.85 mm (anti-aliasing for a 2x downsampling) and
   resampled linearly onto a 2 mm grid with the same orientation and field-of-view centre, then
   cropped to the brain's bounding box plus an 8 mm margin;
3. labels, inside the resampled mask (> 0.5): CSF probability ``p_csf = max(0, 1 - p_gm - p_wm)``
   and the label is the largest of ``(p_csf, p_gm, p_wm)``; outside the mask 0.

Tissue codes (FSL FAST's convention, the same as ``mni152_pveseg`` in ../shared/data):
``TISSUE_CODES = {0: background, 1: CSF, 2: grey matter, 3: white matter}``. Grey matter includes
deep grey matter and the cerebellar cortex: the probability maps do not separate structures, so no
finer label (cortex, thalamus, ...) is derived. The T1 image is written as float32 in [0, 1] (the
template's 0..255 divided by 255).

`atlas_paths` / `load_atlas` give the shipped files (folder overridable with JRS_ATLAS_DIR).
Rebuild with ``python -m JointRegSegLib.atlas [SHARED_DATA_DIR]``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .imageio.geometry import Geometry, Volume
from .weights import resources_dir

if TYPE_CHECKING:  # SimpleITK and the readers are imported where used: TISSUE_CODES needs numpy alone
    import SimpleITK as sitk

IMAGE_NAME = "mni152_t1_2mm.nii.gz"
LABELS_NAME = "mni152_tissue_2mm.nii.gz"
SOURCE_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
SOURCE_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
SOURCE_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
TISSUE_CODES = {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"}
SPACING_MM = 2.0
SMOOTHING_SIGMA_MM = 0.85
MARGIN_MM = 8.0


def atlas_dir() -> Path:
    """Folder of the shipped atlas: $JRS_ATLAS_DIR, else Resources/Atlas."""
    return Path(os.environ.get("JRS_ATLAS_DIR", resources_dir() / "Atlas"))


def atlas_paths() -> tuple[Path, Path]:
    """Paths of the shipped atlas image and its tissue label map (InputError when missing)."""
    folder = atlas_dir()
    image, labels = folder / IMAGE_NAME, folder / LABELS_NAME
    for path in (image, labels):
        if not path.exists():
            raise InputError(
                f"the shipped atlas file {path} is missing: restore Resources/Atlas from the repository or rebuild it "
                "with `python -m JointRegSegLib.atlas`, or pass --fixed ATLAS --fixed-seg LABELS."
            )
    return image, labels


def load_atlas() -> tuple[Volume, Volume]:
    """The shipped atlas image and tissue label map."""
    from .imageio.io import read_image, read_labels

    image, labels = atlas_paths()
    return read_image(image, "atlas image"), read_labels(labels, "atlas labels")


def _target_grid(image: sitk.Image) -> Geometry:
    """A 2 mm grid with ``image``'s direction whose voxel centres span the same extent about the same centre."""
    size = np.asarray(image.GetSize())
    spacing = np.asarray(image.GetSpacing())
    shape = np.floor((size - 1) * spacing / SPACING_MM).astype(int) + 1
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2.0).tolist()))
    origin = centre - direction @ ((shape - 1) * SPACING_MM / 2.0)
    return Geometry(tuple(int(s) for s in shape), (SPACING_MM,) * 3, tuple(origin), direction)


def _downsample(image: sitk.Image, grid: Geometry) -> np.ndarray:
    """Gaussian anti-aliasing then linear resampling onto ``grid`` (array in ``[i, j, k]`` order)."""
    import SimpleITK as sitk

    from .imageio.sitk_bridge import from_sitk, reference_image

    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), SMOOTHING_SIGMA_MM)
    resampled = sitk.Resample(smooth, reference_image(grid), sitk.Transform(), sitk.sitkLinear, 0.0)
    return from_sitk(resampled).array


def build_atlas(source: Path, output: Path) -> dict[str, object]:
    """Write the 2 mm atlas image and tissue labels derived from the MNI152 files in ``source`` (see the module docstring)."""
    import SimpleITK as sitk

    from .imageio.sitk_bridge import to_sitk

    paths = {name: source / file for name, file in (("t1", SOURCE_T1), ("gm", SOURCE_GM), ("wm", SOURCE_WM))}
    for path in paths.values():
        if not path.exists():
            raise InputError(f"MNI152 source file {path} is missing: pass the ../shared/data folder")
    images = {name: sitk.ReadImage(str(path), sitk.sitkFloat32) / 255.0 for name, path in paths.items()}
    images["mask"] = sitk.Cast(images["t1"] > 0, sitk.sitkFloat32)
    grid = _target_grid(images["t1"])
    arrays = {name: _downsample(image, grid) for name, image in images.items()}
    mask = arrays["mask"] > 0.5
    present = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    margin = round(MARGIN_MM / SPACING_MM)
    box = tuple(slice(max(p[0] - margin, 0), min(p[-1] + margin + 1, n)) for p, n in zip(present, grid.shape))
    start = np.asarray([s.start for s in box], dtype=np.float64)
    cropped = Geometry(
        tuple(s.stop - s.start for s in box), grid.spacing, tuple(grid.index_to_physical(start)), grid.direction
    )
    gm, wm = arrays["gm"][box], arrays["wm"][box]
    csf = np.clip(1.0 - gm - wm, 0.0, None)
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    labels[~mask[box]] = 0
    image = np.clip(arrays["t1"][box], 0.0, 1.0).astype(np.float32) * mask[box]
    output.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_sitk(Volume(image, cropped)), str(output / IMAGE_NAME), useCompression=True)
    sitk.WriteImage(to_sitk(Volume(labels, cropped)), str(output / LABELS_NAME), useCompression=True)
    counts = {TISSUE_CODES[c]: int((labels == c).sum()) for c in TISSUE_CODES}
    return {"shape": list(cropped.shape), "spacing_mm": SPACING_MM, "voxels_per_label": counts}


def main(argv: list[str] | None = None) -> int:
    """``python -m JointRegSegLib.atlas [SHARED_DATA_DIR]``: rebuild Resources/Atlas."""
    args = sys.argv[1:] if argv is None else argv
    shared = Path(args[0]) if args else Path(os.environ.get("JRS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    summary = build_atlas(shared / "mni152", atlas_dir())
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
