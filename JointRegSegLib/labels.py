"""FreeSurfer-style label lookup table: names and colours of the anatomical labels JointRegSeg meets.

Codes, names and colours follow FreeSurfer's ``FreeSurferColorLUT.txt`` for the aseg structures
(the labels of ../shared/data/pair and of the SynthSeg maps). SynthSeg's generation classes
(codes >= 500: skull, scalp, eyes, ...) are not in FreeSurfer's table and are named generically.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Label:
    code: int
    name: str
    rgb: tuple[int, int, int]


_TABLE: tuple[tuple[int, str, tuple[int, int, int]], ...] = (
    (0, "Unknown", (0, 0, 0)),
    (2, "Left-Cerebral-White-Matter", (245, 245, 245)),
    (3, "Left-Cerebral-Cortex", (205, 62, 78)),
    (4, "Left-Lateral-Ventricle", (120, 18, 134)),
    (5, "Left-Inf-Lat-Vent", (196, 58, 250)),
    (7, "Left-Cerebellum-White-Matter", (220, 248, 164)),
    (8, "Left-Cerebellum-Cortex", (230, 148, 34)),
    (10, "Left-Thalamus", (0, 118, 14)),
    (11, "Left-Caudate", (122, 186, 220)),
    (12, "Left-Putamen", (236, 13, 176)),
    (13, "Left-Pallidum", (12, 48, 255)),
    (14, "3rd-Ventricle", (204, 182, 142)),
    (15, "4th-Ventricle", (42, 204, 164)),
    (16, "Brain-Stem", (119, 159, 176)),
    (17, "Left-Hippocampus", (220, 216, 20)),
    (18, "Left-Amygdala", (103, 255, 255)),
    (24, "CSF", (60, 60, 60)),
    (25, "Left-Lesion", (255, 165, 0)),
    (26, "Left-Accumbens-area", (255, 165, 0)),
    (28, "Left-VentralDC", (165, 42, 42)),
    (30, "Left-vessel", (160, 32, 240)),
    (31, "Left-choroid-plexus", (0, 200, 200)),
    (41, "Right-Cerebral-White-Matter", (245, 245, 245)),
    (42, "Right-Cerebral-Cortex", (205, 62, 78)),
    (43, "Right-Lateral-Ventricle", (120, 18, 134)),
    (44, "Right-Inf-Lat-Vent", (196, 58, 250)),
    (46, "Right-Cerebellum-White-Matter", (220, 248, 164)),
    (47, "Right-Cerebellum-Cortex", (230, 148, 34)),
    (49, "Right-Thalamus", (0, 118, 14)),
    (50, "Right-Caudate", (122, 186, 220)),
    (51, "Right-Putamen", (236, 13, 176)),
    (52, "Right-Pallidum", (13, 48, 255)),
    (53, "Right-Hippocampus", (220, 216, 20)),
    (54, "Right-Amygdala", (103, 255, 255)),
    (57, "Right-Lesion", (255, 165, 0)),
    (58, "Right-Accumbens-area", (255, 165, 0)),
    (60, "Right-VentralDC", (165, 42, 42)),
    (62, "Right-vessel", (160, 32, 240)),
    (63, "Right-choroid-plexus", (0, 200, 221)),
    (72, "5th-Ventricle", (120, 190, 150)),
    (77, "WM-hypointensities", (200, 70, 255)),
    (80, "non-WM-hypointensities", (164, 108, 226)),
    (85, "Optic-Chiasm", (234, 169, 30)),
    (136, "Left-Cerebral-Exterior-Fluid", (220, 220, 180)),
    (137, "Right-Cerebral-Exterior-Fluid", (220, 220, 180)),
    (163, "Left-Skull-Interior", (220, 180, 140)),
    (164, "Right-Skull-Interior", (220, 180, 140)),
    (251, "CC_Posterior", (0, 0, 64)),
    (252, "CC_Mid_Posterior", (0, 0, 112)),
    (253, "CC_Central", (0, 0, 160)),
    (254, "CC_Mid_Anterior", (0, 0, 208)),
    (255, "CC_Anterior", (0, 0, 255)),
    (701, "CSF-FSL-FAST", (120, 18, 134)),
    (702, "GrayMatter-FSL-FAST", (205, 62, 78)),
    (703, "WhiteMatter-FSL-FAST", (245, 245, 245)),
)

LUT: dict[int, Label] = {code: Label(code, name, rgb) for code, name, rgb in _TABLE}

# The 30 structures VoxelMorph evaluates on (../shared/data/README.md).
EVALUATION_LABELS: tuple[int, ...] = (
    2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31,
    41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60, 63,
)


def label_info(code: int) -> Label:
    """Name and colour of a label code; unknown codes get a generic name and a stable colour."""
    if code in LUT:
        return LUT[code]
    name = f"Extra-cerebral-class-{code}" if code >= 500 else f"Label-{code}"
    rgb = ((code * 97) % 200 + 40, (code * 57) % 200 + 40, (code * 31) % 200 + 40)
    return Label(code, name, rgb)



def _normalised(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip()).lower()


_CODE_OF_NAME: dict[str, int] = {_normalised(label.name): code for code, label in LUT.items() if code != 0}
_NUMBERED = re.compile(r"^(?:label|segment)?-?(\d+)$")


def codes_for_names(names: Iterable[str]) -> dict[str, int]:
    """A label code for each segment name, the same for the same name whatever the order or the source.

    FreeSurfer names (any case, spaces or underscores for dashes) get their FreeSurfer code; names
    such as 'Label-17', 'Label_17', 'Segment_17' or '17' get 17; any other name gets a code above
    every code in use, in alphabetical order of those names, so two segmentations exported
    together agree whenever their segment names do.
    """
    unique = sorted(set(names))
    codes: dict[str, int] = {}
    for name in unique:
        key = _normalised(name)
        numbered = _NUMBERED.match(key)
        if key in _CODE_OF_NAME:
            codes[name] = _CODE_OF_NAME[key]
        elif numbered and int(numbered.group(1)) > 0:
            codes[name] = int(numbered.group(1))
    next_code = max([*codes.values(), *LUT]) + 1
    for name in unique:
        if name not in codes:
            codes[name], next_code = next_code, next_code + 1
    return codes

# Tissue classes in FreeSurfer's codes for FSL FAST segmentations (what jers segments).
TISSUE_CSF, TISSUE_GREY, TISSUE_WHITE = 701, 702, 703
TISSUE_LABELS: tuple[int, ...] = (TISSUE_CSF, TISSUE_GREY, TISSUE_WHITE)
WHITE_MATTER_CODES: tuple[int, ...] = (2, 7, 16, 28, 41, 46, 60, 85, 192, 251, 252, 253, 254, 255)
CSF_CODES: tuple[int, ...] = (4, 5, 14, 15, 24, 30, 31, 43, 44, 62, 63, 72)
EXTRACEREBRAL_FIRST_CODE = 500  # SynthSeg generation classes (skull, scalp, eyes, ...) start here


def tissue_codes(classes: np.ndarray) -> np.ndarray:
    """Tissue classes 0-3 (the shipped atlas's codes, FSL FAST's: 1 CSF, 2 grey matter, 3 white matter) to 0 and
    FreeSurfer's FSL-FAST codes 701 CSF, 702 grey matter, 703 white matter."""
    return np.asarray((0, *TISSUE_LABELS), dtype=np.int16)[np.asarray(classes, dtype=np.int64)]


def is_tissue_map(values: Iterable[int]) -> bool:
    """Whether a label map's values are tissue codes only (0, 701-703: jers' segmentation, the shipped atlas scored)."""
    present = set(values) - {0}
    return bool(present) and present <= set(TISSUE_LABELS)


def tissue_of(labels: np.ndarray) -> np.ndarray:
    """FreeSurfer codes to tissue codes (701 CSF, 702 grey matter, 703 white matter, 0 elsewhere);
    brain codes that are neither CSF nor white matter count as grey matter."""
    labels = np.asarray(labels)
    out = np.where((labels > 0) & (labels < EXTRACEREBRAL_FIRST_CODE), TISSUE_GREY, 0).astype(np.int16)
    out[np.isin(labels, CSF_CODES)] = TISSUE_CSF
    out[np.isin(labels, WHITE_MATTER_CODES)] = TISSUE_WHITE
    return out
