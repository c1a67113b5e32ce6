"""The declared options of every method: name, type, default, accepted values and meaning.

One schema serves every view: the worker and the command line validate a run's options with
`validate_options` before any work starts (each bad value becomes an `InputError` naming the
option and the values it accepts), ``jointregseg register --help`` lists them, and the Slicer and
web panels can build their forms from `OPTIONS`. The methods read their options through
`validate_options` too, so a value is checked in one place only.

This module imports neither torch, numpy, SimpleITK nor nibabel (panels read it at start-up).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import InputError

BOOL, INT, FLOAT, CHOICE, TEXT, INT_LIST, FLOAT_LIST = "bool", "int", "float", "choice", "text", "int list", "float list"

AFFINE_ITERATIONS = (150, 60, 30)
"""Iterations of the affine stage per pyramid level (4, 2, 1) (`affine_stage.fit_affine`)."""
IMAGE_AFFINE_LOSSES = ("nmi", "mi", "ncc", "none")
SEGREG_VARIANTS = ("iterative", "learned")
SEGREG_MASK_LOSSES = ("dice", "edt", "edt-dice")
SEGREG_SIMILARITIES = ("ncc", "mse", "none")
SEGREG_AFFINE_MODES = ("image", "labels", "none")
SEGREG_LEVELS = (1, 2, 4, 8, 16)
SEGREG_DEFAULT_WEIGHTS = {"dice": (1.0, 1.0, 0.5), "edt": (1.0, 10.0, 0.5), "edt-dice": (1.0, 1.0, 0.5)}
REFINE_SIMILARITIES = ("lncc", "mi", "mami")
REFINE_REGULARISERS = ("diffusion", "bending")
REFINE_FIELDS = ("displacement", "velocity")
REFINE_DEFAULTS: dict[str, Any] = {
    "weight": 1.0, "regulariser": "diffusion", "field": "displacement", "lr": 0.1, "window_mm": 9.0, "smoothing": 5,
}
"""Defaults of the refinement stage (`refinement.Settings`), declared here so the schema and the stage share them."""
REFINE_LEVELS: dict[str, dict[str, tuple]] = {
    "cpu": {"spacings": (4.0, 2.0), "iterations": (40, 20)},
    "cuda": {"spacings": (4.0, 2.0, 1.0), "iterations": (100, 100, 50)},
}
"""The refinement's levels by device ("auto" in the schema): mm spacings coarse to fine, Adam steps per level."""


def _by_device(key: str) -> str:
    """How a device-dependent refinement default reads in a help text: "[4,2] on the CPU, [4,2,1] on a GPU"."""
    cpu, gpu = (",".join(f"{v:g}" for v in REFINE_LEVELS[device][key]) for device in ("cpu", "cuda"))
    return f"[{cpu}] on the CPU, [{gpu}] on a GPU"


HOF_WEIGHTS = ("hof", "hof_phase2", "hof_no_aaa", "hof_no_gra", "hof_no_feedback", "hof_unfrozen")
MAX_ITERATIONS = 10**7


@dataclass(frozen=True)
class OptionSpec:
    """One method option. ``default`` None means "chosen at run time" (``help`` says how).

    Numbers lie in [``minimum``, ``maximum``] (``minimum`` excluded when ``above`` is set); a
    ``choices`` tuple lists the accepted words (for an ``int`` option: words accepted besides
    whole numbers) or, for an ``int list``, the accepted items; ``length`` fixes a list's length.
    """

    name: str
    type: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False
    choices: tuple[Any, ...] = ()
    length: int | None = None

    def accepted(self) -> str:
        """The accepted values in words, e.g. "a whole number from 2 to 256"."""
        if self.type == BOOL:
            return "true or false"
        if self.type == CHOICE:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.type == TEXT:
            return "a non-empty name"
        if self.type in (INT_LIST, FLOAT_LIST):
            count = f"{self.length} " if self.length else ""
            item = "whole numbers" if self.type == INT_LIST else "numbers"
            among = f" among {', '.join(str(c) for c in self.choices)}" if self.choices else self._range()
            return f"a list of {count}{item}{among}"
        words = " or ".join(repr(c) for c in self.choices) + " or " if self.choices else ""
        kind = "a whole number" if self.type == INT else "a number"
        return f"{words}{kind}{self._range()}"

    def _range(self) -> str:
        low, high = self.minimum, self.maximum
        if low is not None and high is not None and not self.above:
            return f" from {_text(low)} to {_text(high)}"
        parts = []
        if low is not None:
            parts.append(f"{'>' if self.above else '>='} {_text(low)}")
        if high is not None:
            parts.append(f"<= {_text(high)}")
        return " " + " and ".join(parts) if parts else ""

    def default_text(self) -> str:
        """The default as the user would type it (``auto`` for a run-time choice)."""
        if self.default is None:
            return "auto"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, (list, tuple)):
            return "[" + ",".join(_text(v) for v in self.default) + "]"
        return _text(self.default)


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _spec(name: str, type_: str, default: Any, help_: str, **limits: Any) -> OptionSpec:
    return OptionSpec(name, type_, default, help_, **limits)


_AFFINE = _spec("affine", CHOICE, "nmi", "affine pre-alignment loss (Parzen normalised MI, MI, NCC) or none", choices=IMAGE_AFFINE_LOSSES)
_AFFINE_ITERATIONS = _spec(
    "affine_iterations", INT_LIST, list(AFFINE_ITERATIONS), "affine iterations per pyramid level (4, 2, 1)",
    minimum=0, maximum=100000, length=3,
)

OPTIONS: dict[str, tuple[OptionSpec, ...]] = {
    "tto": (
        _spec("tto", BOOL, True, "fine-tune the network on this pair (test-time optimisation); false: the shipped network as is"),
        _spec("network", CHOICE, "student", "which pretrained U-Net predicts the field (none: start from the affine)", choices=("student", "teacher", "none")),
        _spec("spacing", FLOAT, None, "network grid spacing in mm (auto: 3 on the CPU, 2 on a GPU)", minimum=0.5, maximum=16),
        _spec("lr", FLOAT, 1e-3, "Adam learning rate of the test-time optimisation", minimum=0, maximum=1, above=True),
        _spec("lambda_smooth", FLOAT, 0.3, "weight of the smoothness term (gradient L2)", minimum=0, maximum=1000),
        _spec("alpha_div", FLOAT, 0.03, "weight of the divergence term", minimum=0, maximum=1000),
        _spec("mi_bins", INT, 32, "histogram bins of the multi-axis mutual information", minimum=2, maximum=256),
        _spec("mi_stride", INT, 2, "the MI loss samples every n-th voxel along each axis", minimum=1, maximum=16),
        _AFFINE,
        _AFFINE_ITERATIONS,
        _spec("refine", BOOL, True, "refine the field on the fixed image's grid after the network (false: the paper's method alone)"),
        _spec("refine_similarity", CHOICE, "auto", "similarity of the refinement (auto: local NCC for one contrast, MI for two)", choices=("auto", *REFINE_SIMILARITIES)),
        _spec("refine_spacings", FLOAT_LIST, None, f"refinement levels' spacings in mm, coarse to fine (auto: {_by_device('spacings')})", minimum=0.25, maximum=16),
        _spec("refine_iterations", INT_LIST, None, f"refinement Adam steps per level (auto: {_by_device('iterations')})", minimum=0, maximum=MAX_ITERATIONS),
        _spec("refine_weight", FLOAT, REFINE_DEFAULTS["weight"], "weight of the refinement's regulariser", minimum=0, maximum=1000),
        _spec("refine_regulariser", CHOICE, REFINE_DEFAULTS["regulariser"], "the refinement's regulariser", choices=REFINE_REGULARISERS),
        _spec("refine_field", CHOICE, REFINE_DEFAULTS["field"], "what the refinement optimises (velocity: integrated by scaling and squaring)", choices=REFINE_FIELDS),
        _spec("refine_lr", FLOAT, REFINE_DEFAULTS["lr"], "Adam learning rate of the refinement (voxels of the level)", minimum=0, maximum=100, above=True),
        _spec("refine_window_mm", FLOAT, REFINE_DEFAULTS["window_mm"], "local NCC window of the refinement, in mm", minimum=0, maximum=100, above=True),
        _spec("refine_smoothing", INT, REFINE_DEFAULTS["smoothing"], "box smoothing of the refinement's update, in voxels (odd; 1: none)", minimum=1, maximum=31),
    ),
    "segreg": (
        _spec("variant", CHOICE, "iterative", "optimise each region (iterative, no training) or the trained network (learned)", choices=SEGREG_VARIANTS),
        _spec("mask_loss", CHOICE, "dice", "the mask term of the loss (eq. 4-5)", choices=SEGREG_MASK_LOSSES),
        _spec("regions", INT, "all", "which regions move separately: every label, coarse groups, or a number of groups", minimum=1, maximum=1000, choices=("all", "coarse")),
        _spec("similarity", CHOICE, "ncc", "the image term of the loss", choices=SEGREG_SIMILARITIES),
        _spec("weights", FLOAT_LIST, None, "[image, mask, smoothness] weights of eq. 5 (auto: [1,1,0.5] for dice and edt-dice, [1,10,0.5] for edt)", minimum=0, maximum=10000, length=3),
        _spec("levels", INT_LIST, [4, 2], "iterative: pooling factors of the pyramid, coarse to fine", choices=SEGREG_LEVELS),
        _spec("level_iterations", INT_LIST, [60, 40], "iterative: Adam iterations per pyramid level (one per level)", minimum=0, maximum=MAX_ITERATIONS),
        _spec("fine_iterations", INT, 60, "iterative: iterations of the sampled fine stage", minimum=0, maximum=MAX_ITERATIONS),
        _spec("lr", FLOAT, 0.25, "iterative: Adam learning rate (voxels of the level)", minimum=0, maximum=100, above=True),
        _spec("integration_steps", INT, 0, "iterative: scaling-and-squaring steps (0: the field is a displacement)", minimum=0, maximum=20),
        _spec("field_smoothing", INT, 2, "iterative: 3x3x3 box-smoothing passes of the optimised field", minimum=0, maximum=50),
        _spec("margin_mm", FLOAT, 5.0, "iterative: context kept around each region, in mm", minimum=0, maximum=100),
        _spec("mask_smoothing", FLOAT, 0.0, "Gaussian sigma (voxels) of the composition masks (0: hard masks)", minimum=0, maximum=20),
        _spec("background_reach_mm", FLOAT, 0.0, "iterative: background voxels this close to a region (mm) follow that region's field (0: off)", minimum=0, maximum=100),
        _spec("affine", CHOICE, "image", "pre-alignment: MI on the images, least squares on the label centroids, or none", choices=SEGREG_AFFINE_MODES),
        _spec("spacing", FLOAT, None, "fine grid spacing in mm (auto: the fixed image's smallest voxel size, at least 1)", minimum=0.25, maximum=16),
        _spec("weights_name", TEXT, None, "learned: which shipped weights (auto: segreg-<mask_loss>)"),
        _spec("batch", INT, 4, "learned: region crops per network call", minimum=1, maximum=256),
    ),
    "uresnet": (
        _spec("spacing", FLOAT, 4.0, "network grid spacing in mm", minimum=0.5, maximum=16),
        _spec("segment_fixed", BOOL, False, "also segment the fixed image (a second network pass)"),
        _spec("warped_seg", CHOICE, "auto", "warped label map: the given moving one if any (auto), the predicted one, or the given one", choices=("auto", "predicted", "given")),
    ),
    "jers": (
        _spec("extraction_stages", INT, 5, "brain-extraction stages M", minimum=1, maximum=20),
        _spec("registration_stages", INT, 5, "affine registration stages N", minimum=1, maximum=20),
        _spec("extraction", BOOL, True, "extract the brain (false: the w/o-Ext variant, mask of ones)"),
        _spec("segmentation", CHOICE, "network", "segment with the network, or warp the atlas labels", choices=("network", "atlas")),
        _spec("weights", TEXT, "jers", "name of the shipped weights"),
    ),
    "hof": (
        _spec("weights", CHOICE, "hof", "shipped weights: the full method, before refinement, or a Table 3 ablation", choices=HOF_WEIGHTS),
        _spec("spacing", FLOAT, 3.0, "network grid spacing in mm (trained at 3)", minimum=1, maximum=8),
        _spec("symmetric", BOOL, True, "register with the antisymmetric part of both directions' velocities (cancels what the network adds to any pair); false: eq. 2 one way"),
        _spec("mirror", BOOL, True, "average each segmentation with that of the left-right mirror image (left and right swapped back); false: one pass"),
        _AFFINE,
        _AFFINE_ITERATIONS,
    ),
}


SETTINGS: dict[str, OptionSpec] = {
    spec.name: spec
    for spec in (
        _spec("seed", INT, 0, "random seed (same seed, same result on the CPU)", minimum=0, maximum=2**32 - 1),
        _spec("threads", INT, None, "CPU threads for torch (auto: torch's choice, usually the core count)", minimum=1, maximum=1024),
        _spec("iterations", INT, None, "iteration cap of the optimisation (tto: network fine-tuning steps; auto: the method's default, tto 0 on the CPU and 100 on a GPU)", minimum=0, maximum=MAX_ITERATIONS),
        _spec("time_budget", FLOAT, None, "seconds the optimisation may take (tto: fine-tuning and refinement; auto: no limit, so the result does not depend on how busy the machine is)", minimum=0, maximum=10**7, above=True),
    )
}
"""The run settings every method shares (the job's fields, the command line's flags, the panels' fields)."""


def validate_setting(name: str, value: Any, label: str) -> Any:
    """The run setting ``name`` (`SETTINGS`) checked and converted; None stands for the default.

    Raises `InputError` naming ``label`` (the flag, field or panel entry the user typed it in) and the accepted values.
    """
    spec = SETTINGS[name]
    if value is None:
        return spec.default
    try:
        return _convert(spec, value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{label} must be {spec.accepted()}; got {_shown(value)}.") from None


def method_option_names() -> list[str]:
    """The methods whose options are declared here."""
    return sorted(OPTIONS)


def specs(method: str) -> tuple[OptionSpec, ...]:
    """The declared options of ``method`` (InputError for an unknown method)."""
    if method not in OPTIONS:
        raise InputError(f"unknown method '{method}'; choose one of: {', '.join(method_option_names())}.")
    return OPTIONS[method]


def defaults(method: str) -> dict[str, Any]:
    """Every option of ``method`` at its default."""
    return {spec.name: spec.default for spec in specs(method)}


def validate_options(method: str, raw: dict[str, Any] | None) -> dict[str, Any]:
    """Every option of ``method``: the given values checked and converted, the others at their defaults.

    A value of None stands for the default. Lists come back as tuples. Raises `InputError` naming
    the option and the values it accepts.
    """
    declared = {spec.name: spec for spec in specs(method)}
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(declared))
    if unknown:
        raise InputError(f"unknown {method} option(s) {', '.join(unknown)}; the {method} options are: {', '.join(declared)}.")
    values = {}
    for name, spec in declared.items():
        value = raw.get(name)
        values[name] = _as_tuple(spec.default) if value is None else convert(method, spec, value)
    return values


def convert(method: str, spec: OptionSpec, value: Any) -> Any:
    """``value`` as the option's type, within its range, or an InputError naming both."""
    try:
        return _convert(spec, value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{method} option '{spec.name}' must be {spec.accepted()}; got {_shown(value)}.") from None


def _convert(spec: OptionSpec, value: Any) -> Any:
    if spec.type == BOOL:
        return _bool(value)
    if spec.type == CHOICE:
        return _word(value, spec.choices)
    if spec.type == TEXT:
        if not isinstance(value, str) or not value.strip():
            raise ValueError
        return value.strip()
    if spec.type in (INT_LIST, FLOAT_LIST):
        items = _items(value)
        if spec.length is not None and len(items) != spec.length or not items:
            raise ValueError
        kind = INT if spec.type == INT_LIST else FLOAT
        return tuple(_number(OptionSpec(spec.name, kind, None, "", spec.minimum, spec.maximum, spec.above, spec.choices), item) for item in items)
    if spec.choices and isinstance(value, str) and not _looks_numeric(value):
        return _word(value, spec.choices)
    return _number(spec, value)


def _number(spec: OptionSpec, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError
    number = float(value)  # a text such as "abc" raises ValueError; "1e999" gives inf
    if not math.isfinite(number):
        raise ValueError
    if spec.type == INT:
        if number != int(number):
            raise ValueError
        number = int(value) if isinstance(value, int) else int(number)
    if spec.choices and all(isinstance(c, int) for c in spec.choices) and number not in spec.choices:
        raise ValueError
    if spec.minimum is not None and (number <= spec.minimum if spec.above else number < spec.minimum):
        raise ValueError
    if spec.maximum is not None and number > spec.maximum:
        raise ValueError
    return number


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError


def _word(value: Any, choices: tuple[Any, ...]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise ValueError
    return value.strip().lower()


def _items(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [item for item in value.strip().strip("[]()").replace(",", " ").split()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError
    raise TypeError


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (bool, int, float, list, dict)) and value == value else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict, VALUE parsed as JSON where it is JSON (else kept as text)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"option '{pair}' is not KEY=VALUE (e.g. --option lr=0.001).")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def describe(method: str, width: int = 24) -> list[str]:
    """One line per option of ``method``: name=default, meaning, accepted values (for --help and panels)."""
    return [
        f"  {(spec.name + '=' + spec.default_text()).ljust(width)} {spec.help} ({spec.accepted()})" for spec in specs(method)
    ]
