"""The cohort's pairs: a pair-list CSV (the benchmark's format, `JointRegSegLib.bench.pairs`), or a
folder of images each registered to one fixed image (by default the shipped atlas).

In a folder, every file with a supported image extension is a moving image whose pair id is its
name without the extension; a file whose name (without extension) ends in ``seg_suffix``
(default ``_seg``) is the label map of the image of the same name without the suffix
(``sub01.nii.gz`` and ``sub01_seg.nii.gz``).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..atlas import atlas_paths
from ..bench.pairs import PairSpec, check_pairs, read_pair_list
from ..errors import InputError
from ..imageio.io import SUPPORTED_EXTENSIONS
from . import DEFAULT_SEG_SUFFIX


def cohort_pairs(
    source: Path, fixed: Path | None = None, fixed_seg: Path | None = None, seg_suffix: str = DEFAULT_SEG_SUFFIX
) -> list[PairSpec]:
    """The pairs ``source`` names: a folder of images (see the module docstring) or a pair-list CSV.

    Files are not checked here: a pair whose file is missing becomes one failure of the batch,
    not the end of it.
    """
    source = Path(source).expanduser()
    if source.is_dir():
        return folder_pairs(source, fixed, fixed_seg, seg_suffix)
    if fixed is not None or fixed_seg is not None:
        raise InputError("--fixed and --fixed-seg go with a folder of images; a pair list names each pair's fixed image in its 'fixed' column.")
    return read_pair_list(source, check_files=False)


def folder_pairs(folder: Path, fixed: Path | None, fixed_seg: Path | None, seg_suffix: str = DEFAULT_SEG_SUFFIX) -> list[PairSpec]:
    """Every image in ``folder`` as the moving image of a pair with ``fixed`` (default: the atlas)."""
    if fixed is None:
        if fixed_seg is not None:
            raise InputError("--fixed-seg needs --fixed (without --fixed the shipped atlas and its labels are used).")
        fixed, fixed_seg = atlas_paths()
    fixed = Path(fixed).expanduser().resolve()
    fixed_seg = Path(fixed_seg).expanduser().resolve() if fixed_seg is not None else None
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in sorted(folder.resolve().iterdir()):
        extension = next((e for e in SUPPORTED_EXTENSIONS if path.name.lower().endswith(e)), None)
        if extension is None or not path.is_file() or path in (fixed, fixed_seg):
            continue
        stem = path.name[: -len(extension)]
        if seg_suffix and stem.endswith(seg_suffix) and len(stem) > len(seg_suffix):
            labels[stem[: -len(seg_suffix)]] = path
        else:
            images[stem] = path
    if not images:
        raise InputError(f"the folder {folder} holds no image ({', '.join(SUPPORTED_EXTENSIONS)}); give a folder of images or a pair-list CSV.")
    pairs = [
        PairSpec(pair_id(stem), fixed=fixed, moving=path, fixed_seg=fixed_seg, moving_seg=labels.get(stem))
        for stem, path in images.items()
    ]
    check_pairs(pairs, check_files=False)
    return pairs


def pair_id(stem: str) -> str:
    """A file name as a pair id (a folder name): characters other than letters, digits, '-', '_' and '.' become '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "image"
