"""The job file the worker runs: which inputs, which method, which device, where to write."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..methods.options import FLOAT, SETTINGS, validate_setting

INPUT_KEYS = ("fixed", "moving", "fixed_seg", "moving_seg")
COMMAND_LINE = "the command line"
JACOBIAN_PARTS = ("deformable", "whole")
"""What the written det J map is of: the deformable part (the whole mapping's divided by its affine part's) or the whole mapping."""


@dataclass
class Job:
    """A parsed, checked job (``python -m JointRegSegLib.worker JOB.json``)."""

    method: str
    output: Path
    fixed: Path | None = None
    moving: Path | None = None
    fixed_seg: Path | None = None
    moving_seg: Path | None = None
    device: str = "cpu"
    seed: int = 0
    iterations: int | None = None
    time_budget: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    pictures: bool = True
    jacobian: str = JACOBIAN_PARTS[0]
    compress: bool = True
    threads: int | None = None
    overwrite: bool = False

    def inputs(self) -> dict[str, Path]:
        """The input files given, by what they are ("fixed image", ...)."""
        names = {"fixed": "fixed image", "moving": "moving image", "fixed_seg": "fixed label map", "moving_seg": "moving label map"}
        return {names[key]: getattr(self, key) for key in INPUT_KEYS if getattr(self, key) is not None}

    def to_dict(self) -> dict[str, Any]:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        return data

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))


def parse_job(text: str, source: str = "job") -> Job:
    """Parse and check a job's JSON text; every problem becomes an InputError naming the field."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{source} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}).") from error
    return job_from_dict(data, source)


def job_from_dict(data: Any, source: str = "job") -> Job:
    """A checked `Job` from its fields (a job file's JSON, or the command line's arguments)."""
    if not isinstance(data, dict):
        raise InputError(f"{source} must be a JSON object with at least 'method' and 'output'.")
    data = dict(data)
    known = set(Job.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{source} has unknown field(s) {unknown}; known fields are {sorted(known)}.")
    for key in ("method", "output"):
        if not isinstance(data.get(key), (str, Path)) or not str(data[key]):
            raise InputError(f"{source} needs '{key}' as a non-empty string.")
    for key in INPUT_KEYS:
        if data.get(key) is not None and not isinstance(data[key], (str, Path)):
            raise InputError(f"{source}: '{key}' must be a file path (string) or null.")
    _check_type(data, "device", str, source)
    _check_type(data, "options", dict, source)
    _check_type(data, "pictures", bool, source)
    _check_type(data, "compress", bool, source)
    _check_type(data, "overwrite", bool, source)
    _check_type(data, "jacobian", str, source)
    if data.get("jacobian", JACOBIAN_PARTS[0]) not in JACOBIAN_PARTS:
        label = "--jacobian" if source == COMMAND_LINE else f"{source}: 'jacobian'"
        raise InputError(f"{label} must be one of {', '.join(JACOBIAN_PARTS)}; got {data['jacobian']!r}.")
    for key, spec in SETTINGS.items():
        _check_type(data, key, (int, float) if spec.type == FLOAT else int, source)
        label = f"--{key.replace('_', '-')}" if source == COMMAND_LINE else f"{source}: '{key}'"
        data[key] = validate_setting(key, data.get(key), label)
    paths = {key: Path(data[key]).expanduser() for key in (*INPUT_KEYS, "output") if data.get(key)}
    return Job(**{**data, **paths})


def _check_type(data: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> None:
    value = data.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        raise InputError(f"{source}: '{key}' has the wrong type ({type(value).__name__}).")
