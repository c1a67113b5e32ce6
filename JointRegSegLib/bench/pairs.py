"""Benchmark pairs: the pair-list CSV format, ready lists, and the synthetic pair set.

Pair-list CSV (a header row, then one pair per row; only ``fixed`` and ``moving`` are required)::

    name,fixed,fixed_seg,moving,moving_seg,fixed_mask,moving_mask,true_field
    pair,fixed_img.nii.gz,fixed_seg.nii.gz,moving_img.nii.gz,moving_seg.nii.gz,,,

``id`` may stand for ``name`` (the cohort runner's word). Paths may use ``~`` and
``$VARIABLES``; relative paths are relative to the CSV file's folder.
Label maps give Dice and HD95; ``true_field`` (a displacement field on the fixed grid, our
convention) gives the end-point error; ``fixed_mask`` is the region the end-point error is
averaged over (default: the fixed label map's foreground, else the fixed image's foreground).
``moving_mask`` is recorded but no tool uses it, so that every tool gets the same inputs.

Ready lists: ``shared`` (../shared/data/pair, or ``$JRS_SHARED_DATA/pair``), ``sample`` (the
bundled Resources/SampleData pair, 2 mm) and ``synthetic`` (`make_synthetic_set`: a real brain
from the shared data under known random smooth deformations).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..data_paths import shared_data_dir
from ..errors import InputError
from ..imageio.geometry import Geometry
from ..imageio.io import read_image, read_labels, write_volume
from ..imageio.network_grid import resample
from ..sample_data import sample_pair
from ..spatial.field_io import write_displacement_field
from ..spatial.physical import voxel_to_physical_field, warp_volume
from ..synth.deform import AffineRanges, DeformationOptions, random_deformation

COLUMNS = ("name", "fixed", "fixed_seg", "moving", "moving_seg", "fixed_mask", "moving_mask", "true_field")
ALIASES = {"id": "name"}
READY_LISTS = ("shared", "sample", "synthetic")
SHARED_PAIR_FILES = {
    "fixed": "fixed_img.nii.gz",
    "fixed_seg": "fixed_seg.nii.gz",
    "moving": "moving_img.nii.gz",
    "moving_seg": "moving_seg.nii.gz",
}


@dataclass(frozen=True)
class PairSpec:
    """One benchmark pair: image files, optional label maps, masks and the true field."""

    name: str
    fixed: Path
    moving: Path
    fixed_seg: Path | None = None
    moving_seg: Path | None = None
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    true_field: Path | None = None

    def files(self) -> dict[str, Path]:
        """The files this pair names, by column."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name" and getattr(self, f.name)}


def _resolve(value: str, folder: Path) -> Path | None:
    value = value.strip()
    if not value:
        return None
    path = Path(os.path.expandvars(os.path.expanduser(value)))
    return path if path.is_absolute() else (folder / path).resolve()


def read_pair_list(path: str | Path, check_files: bool = True) -> list[PairSpec]:
    """Pairs from a pair-list CSV (see the module docstring); with ``check_files`` every named file must exist."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pair list '{path}' not found; give a CSV file or one of: {', '.join(READY_LISTS)}.")
    with path.open(newline="") as stream:
        reader = csv.DictReader(stream)
        header = [ALIASES.get(column.strip(), column.strip()) for column in reader.fieldnames or ()]
        if len(set(header)) < len(header):
            raise InputError(f"pair list '{path}' names a column twice (note: 'id' and 'name' are the same column).")
        reader.fieldnames = header
        unknown = sorted(set(header) - set(COLUMNS))
        if unknown:
            raise InputError(f"pair list '{path}' has unknown column(s) {unknown}; the columns are {', '.join(COLUMNS)} ('id' for 'name').")
        if not {"fixed", "moving"} <= set(header):
            raise InputError(f"pair list '{path}' needs at least the columns 'fixed' and 'moving'.")
        pairs = []
        for number, row in enumerate(reader, start=1):
            values = {key: _resolve(row.get(key) or "", path.parent) for key in COLUMNS if key != "name"}
            if values["fixed"] is None or values["moving"] is None:
                raise InputError(f"pair list '{path}', row {number}: 'fixed' and 'moving' must name image files.")
            name = (row.get("name") or "").strip() or f"pair{number}"
            pairs.append(PairSpec(name=name, **values))
    if not pairs:
        raise InputError(f"pair list '{path}' has no pairs (only a header?).")
    check_pairs(pairs, check_files)
    return pairs


def check_pairs(pairs: list[PairSpec], check_files: bool = True) -> None:
    """Raise `InputError` for a repeated or unusable pair name (names become folder names) and, with
    ``check_files``, for a missing file."""
    names = [pair.name for pair in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"pair names must be unique (they name output folders); repeated: {', '.join(repeated)}.")
    for pair in pairs:
        if not pair.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise InputError(f"pair name '{pair.name}' may use only letters, digits, '-', '_' and '.'.")
        for column, file in pair.files().items() if check_files else ():
            if not file.is_file():
                raise InputError(f"pair '{pair.name}': the {column} file '{file}' does not exist.")


def write_pair_list(pairs: list[PairSpec], path: str | Path) -> Path:
    """Write pairs as a pair-list CSV (paths relative to its folder where they lie below it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()

    def text(file: Path | None) -> str:
        if file is None:
            return ""
        file = Path(file).resolve()
        return str(file.relative_to(folder)) if file.is_relative_to(folder) else str(file)

    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(COLUMNS)
        for pair in pairs:
            writer.writerow([pair.name] + [text(getattr(pair, column)) for column in COLUMNS[1:]])
    return path


def shared_pair_list(data: Path | None = None) -> list[PairSpec]:
    """The benchmark pair of the shared data (``pair/``: two subjects' T1 scans with aseg labels)."""
    folder = (data or shared_data_dir()) / "pair"
    if not folder.is_dir():
        raise InputError(
            f"{folder} does not exist: set JRS_SHARED_DATA to the shared data folder (the one holding pair/)."
        )
    pairs = [PairSpec("pair", **{key: folder / name for key, name in SHARED_PAIR_FILES.items()})]
    check_pairs(pairs)
    return pairs


def sample_pair_list() -> list[PairSpec]:
    """The bundled sample pair (Resources/SampleData: the shared pair cropped, at 2 mm)."""
    return [PairSpec("sample", **sample_pair())]


@dataclass(frozen=True)
class SyntheticOptions:
    """How the synthetic set is made (see `make_synthetic_set`)."""

    count: int = 3
    seed: int = 0
    spacing: float | None = None
    rms_mm: float = 2.5
    control_mm: float = 16.0
    rotation_deg: float = 5.0
    scale: float = 0.04
    shear: float = 0.02
    translation_mm: float = 4.0


def _regrid(geometry: Geometry, spacing: float) -> Geometry:
    """An isotropic grid with ``spacing`` over the same extent and orientation (first voxel centre kept)."""
    extent = (np.asarray(geometry.shape) - 1) * np.asarray(geometry.spacing)
    shape = tuple(int(n) for n in np.floor(extent / spacing + 1e-6).astype(int) + 1)
    return Geometry(shape, (spacing,) * 3, geometry.origin, geometry.direction)


def make_synthetic_set(
    image: Path, labels: Path, out: Path, options: SyntheticOptions = SyntheticOptions()
) -> list[PairSpec]:
    """Synthetic pairs with a known true field, written to ``out`` (with ``pairs.csv``).

    The real brain (``image``, ``labels``) is the moving image of every pair. For pair ``n`` a
    random smooth diffeomorphic displacement ``u`` is drawn on the moving grid (`synth.deform`:
    a stationary velocity field on a control grid every ``control_mm`` with component RMS
    ``U(rms_mm / 2, rms_mm)``, integrated by scaling and squaring, then a random affine with the
    given half-ranges about the grid centre), and the fixed image is the moving image pulled
    through it: ``fixed(x) = moving(x + u(x))`` (linear; labels nearest). So ``u`` itself, in our
    convention, is exactly the field that registers the pair (no inversion error), and it is
    written as ``true_field``. ``spacing`` (mm) resamples the brain first (a cheaper set);
    ``None`` keeps its grid. The seed of pair ``n`` is ``seed + n``.
    """
    if options.count < 1:
        raise InputError(f"the synthetic set needs at least one pair; got count={options.count}.")
    moving = read_image(image, "synthetic-set source image")
    moving_seg = read_labels(labels, "synthetic-set source label map")
    if not moving.geometry.same_as(moving_seg.geometry):
        raise InputError(f"'{image}' and '{labels}' must lie on the same grid.")
    if options.spacing is not None:
        grid = _regrid(moving.geometry, float(options.spacing))
        moving, moving_seg = resample(moving, grid), resample(moving_seg, grid, "nearest")
    grid = moving.geometry
    voxel = float(np.mean(grid.spacing))
    out.mkdir(parents=True, exist_ok=True)
    moving_path, moving_seg_path = out / "moving_img.nii.gz", out / "moving_seg.nii.gz"
    write_volume(moving, moving_path)
    write_volume(moving_seg, moving_seg_path)
    deformation = DeformationOptions(
        max_std=options.rms_mm / voxel,
        min_std=0.5 * options.rms_mm / voxel,
        resolution=min(1.0, voxel / options.control_mm),
        affine=AffineRanges(options.rotation_deg, options.scale, options.shear, options.translation_mm / voxel),
    )
    pairs = []
    for number in range(options.count):
        generator = torch.Generator().manual_seed(int(options.seed) + number)
        disp = random_deformation(grid.shape, generator, 1, deformation)
        true_field = voxel_to_physical_field(disp[0], grid, grid)
        name = f"synthetic{number:02d}"
        paths = {
            "fixed": out / f"{name}_fixed_img.nii.gz",
            "fixed_seg": out / f"{name}_fixed_seg.nii.gz",
            "true_field": out / f"{name}_true_field.nii.gz",
        }
        write_volume(warp_volume(moving, true_field), paths["fixed"])
        write_volume(warp_volume(moving_seg, true_field, interpolation="nearest"), paths["fixed_seg"])
        write_displacement_field(true_field, paths["true_field"])
        pairs.append(PairSpec(name, moving=moving_path, moving_seg=moving_seg_path, **paths))
    write_pair_list(pairs, out / "pairs.csv")
    return pairs


def synthetic_pair_list(out: Path, options: SyntheticOptions = SyntheticOptions(), data: Path | None = None) -> list[PairSpec]:
    """The synthetic set made from the shared pair's fixed brain (a T1 scan with its aseg labels)."""
    source = shared_pair_list(data)[0]
    return make_synthetic_set(source.fixed, source.fixed_seg, out, options)


def resolve_pairs(spec: str, out: Path, synthetic: SyntheticOptions = SyntheticOptions()) -> list[PairSpec]:
    """Pairs named by ``spec``: a ready list (``shared``, ``sample``, ``synthetic``) or a pair-list CSV."""
    if spec == "shared":
        return shared_pair_list()
    if spec == "sample":
        return sample_pair_list()
    if spec == "synthetic":
        return synthetic_pair_list(out / "synthetic_pairs", synthetic)
    return read_pair_list(spec)
