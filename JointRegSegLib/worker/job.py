"""The job file the worker runs: which inputs, which method, which device, where to write."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

INPUT_KEYS = ("fixed", "moving", "fixed_seg", "moving_seg")


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
    threads: int | None = None

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
    if not isinstance(data, dict):
        raise InputError(f"{source} must be a JSON object with at least 'method' and 'output'.")
    known = set(Job.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{source} has unknown field(s) {unknown}; known fields are {sorted(known)}.")
    for key in ("method", "output"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise InputError(f"{source} needs '{key}' as a non-empty string.")
    for key in INPUT_KEYS:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise InputError(f"{source}: '{key}' must be a file path (string) or null.")
    _check_type(data, "device", str, source)
    _check_type(data, "seed", int, source)
    _check_type(data, "iterations", int, source)
    _check_type(data, "time_budget", (int, float), source)
    _check_type(data, "options", dict, source)
    _check_type(data, "pictures", bool, source)
    _check_type(data, "threads", int, source)
    if data.get("threads") is not None and data["threads"] < 1:
        raise InputError(f"{source}: 'threads' must be at least 1.")
    if data.get("iterations") is not None and data["iterations"] < 0:
        raise InputError(f"{source}: 'iterations' must be >= 0.")
    if data.get("time_budget") is not None and data["time_budget"] <= 0:
        raise InputError(f"{source}: 'time_budget' must be a positive number of seconds.")
    paths = {key: Path(data[key]).expanduser() for key in (*INPUT_KEYS, "output") if data.get(key)}
    return Job(**{**data, **paths})


def _check_type(data: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> None:
    value = data.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        raise InputError(f"{source}: '{key}' has the wrong type ({type(value).__name__}).")
