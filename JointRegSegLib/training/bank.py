"""The training data bank: label maps and scans resampled once onto each network's grid, kept on disk.

Every training run used to resample the 20 SynthSeg label maps (256^3 at 1 mm) and the real scans
onto its network grid at start-up. The bank does it once: each entry is a compressed ``.npz`` of
arrays on one network grid, built from the shared data folder on first use and read back in well
under a second afterwards. Training draws its pairs from these arrays and augments them on the
network grid (`training.augment`), so generating a pair costs a fraction of the network step.

Where: ``bank_dir()`` = ``$JRS_TRAINING_DIR/bank``, by default ``<repository>/.training/bank``
(git-ignored, like the checkpoints and logs beside it). The entries are built from
``data_paths.shared_data_dir()`` (``../shared/data`` beside the repository, or
``$JRS_SHARED_DATA``); a bank copied to another machine (the GPU run, `training.all`) needs no
shared data and no SimpleITK or nibabel: reading it takes numpy alone.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..data_paths import shared_data_dir
from ..errors import InputError

Arrays = dict[str, np.ndarray]
SYNTHSEG_VERSION = 2  # of the label maps as `synth.load_synthseg_maps` makes them (2: brain maps without the spinal CSF)


def training_dir() -> Path:
    """Where training keeps what is not shipped (bank, checkpoints, logs): ``$JRS_TRAINING_DIR``,
    else ``<repository>/.training`` (git-ignored)."""
    if os.environ.get("JRS_TRAINING_DIR"):
        return Path(os.environ["JRS_TRAINING_DIR"])
    return Path(__file__).resolve().parents[2] / ".training"


def bank_dir() -> Path:
    """The bank's folder (``training_dir() / "bank"``)."""
    return training_dir() / "bank"


def require_shared_data() -> Path:
    """The shared data folder, or an InputError saying plainly where training data come from."""
    root = shared_data_dir()
    if not (root / "synthseg_labelmaps").is_dir():
        raise InputError(
            f"training data come from the shared data folder ../shared/data beside the repository (looked in {root}), "
            "which is absent here: set JRS_SHARED_DATA to its location, or copy a bank built with "
            "`jointregseg train pack` into .training/bank (JRS_TRAINING_DIR)."
        )
    return root


def entry(name: str, build: Callable[[], Arrays]) -> Arrays:
    """The bank entry ``name``: read from ``bank_dir()/<name>.npz``, else made by ``build()`` and written there
    (whole or not at all)."""
    path = bank_dir() / f"{name}.npz"
    if path.exists():
        with np.load(path) as stored:
            return {key: stored[key] for key in stored.files}
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return arrays


def synthseg_key(kind: str, spacing: float, shape: tuple[int, int, int]) -> str:
    """The bank entry of `synthseg_maps` ``kind`` on a grid (named with `SYNTHSEG_VERSION`, so a bank made before the
    maps changed is not read)."""
    return f"synthseg{SYNTHSEG_VERSION}_{kind}_{grid_key(spacing, shape)}"


def grid_key(spacing: float, shape: tuple[int, ...]) -> str:
    """``3mm_64x64x64``: the part of an entry's name that says its grid."""
    return f"{spacing:g}mm_{'x'.join(str(int(s)) for s in shape)}"


def synthseg_maps(kind: str, spacing: float, shape: tuple[int, int, int]) -> np.ndarray:
    """The 20 SynthSeg label maps ``(20, I, J, K)`` int16 on a RAS+ grid of ``shape`` x ``spacing`` mm centred on
    each map's labelled box (mode pooling, `synth.load_synthseg_maps`): ``kind`` ``"brain"`` (extra-cerebral
    classes set to background, like skull-stripped scans) or ``"head"`` (skull, scalp, eyes kept)."""
    if kind not in ("brain", "head"):
        raise InputError(f"label-map kind must be 'brain' or 'head'; got {kind!r}")

    def build() -> Arrays:
        from ..synth.labelmaps import load_synthseg_maps

        root = require_shared_data()
        maps = load_synthseg_maps(
            root / "synthseg_labelmaps", shape, spacing=spacing, drop_extracerebral=kind == "brain", orientation="RAS"
        )
        return {"maps": np.asarray(maps, dtype=np.int16)}

    return entry(synthseg_key(kind, spacing, shape), build)["maps"]


def real_scan(relative: str, spacing: float, shape: tuple[int, int, int]) -> np.ndarray:
    """The scan ``<shared data>/<relative>`` on a RAS+ grid of ``shape`` x ``spacing`` mm centred on its field
    of view (`imageio.network_geometry`, as the methods resample their inputs), percentile-normalised to
    [0, 1] (`imageio.normalise_intensity`): float32 ``(I, J, K)``."""
    stem = relative.replace("/", "_").split(".")[0]

    def build() -> Arrays:
        from ..imageio.intensity import normalise_intensity
        from ..imageio.io import read_image
        from ..imageio.network_grid import network_geometry, to_network

        root = require_shared_data()
        volume = read_image(root / relative, relative)
        grid = network_geometry(volume.geometry, spacing=spacing, shape=shape)
        return {"image": normalise_intensity(to_network(volume, grid)).astype(np.float32)}

    return entry(f"scan_{stem}_{grid_key(spacing, shape)}", build)["image"]


def size_mb() -> float:
    """Megabytes the bank holds on disk."""
    folder = bank_dir()
    return sum(p.stat().st_size for p in folder.glob("*.npz")) / 1e6 if folder.is_dir() else 0.0
