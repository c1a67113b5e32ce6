"""What a result or a failure was made from, so that a rerun repeats no work.

A result is made from its `Recipe`: the SHA-256 of each input file (``inputs_sha256`` in the
worker's provenance.json) and the job's definition (method, its options, seed, iterations, time
budget, pictures: ``job`` in provenance.json). The device and thread count are not part of it: a
result computed on a GPU is kept when the cohort is rerun on the CPU.

A rerun keeps a result that is complete (every file its result.json lists is there) and was made
from the same recipe, and reports a recorded failure of the same recipe again instead of
repeating it (``--retry-failed`` tries failures anew). Anything else runs; a changed input runs
again and its new result replaces the earlier one only once it is complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..weights import sha256_of
from ..worker.outputs import MANIFEST
from ..worker.staging import PROVENANCE

DEFINITION_KEYS = ("method", "options", "seed", "iterations", "time_budget", "pictures")


@dataclass(frozen=True)
class Recipe:
    """The SHA-256 of each input file (by job key: fixed, moving, fixed_seg, moving_seg) and the job's definition."""

    inputs_sha256: dict[str, str]
    definition: dict[str, Any]


def definition_of(job: dict[str, Any]) -> dict[str, Any]:
    """The part of a worker job that decides its result (`DEFINITION_KEYS`), as plain JSON values."""
    return json.loads(json.dumps({key: job.get(key) for key in DEFINITION_KEYS}, sort_keys=True))


class Checksums:
    """SHA-256 of files, each file read once per run (a fixed image or atlas shared by many pairs is hashed once)."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}

    def __call__(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._known:
            self._known[key] = sha256_of(path)
        return self._known[key]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def finished_result(folder: Path, recipe: Recipe) -> bool:
    """Whether ``folder`` holds a complete worker output made from ``recipe``."""
    manifest, provenance = _read_json(folder / MANIFEST), _read_json(folder / PROVENANCE)
    if manifest is None or provenance is None:
        return False
    if not all(isinstance(name, str) and (folder / name).is_file() for name in manifest.values()):
        return False
    return provenance.get("inputs_sha256") == recipe.inputs_sha256 and definition_of(provenance.get("job") or {}) == recipe.definition


def foreign_files(folder: Path) -> list[str]:
    """Files in an existing output folder that the worker did not write (listed in its result.json)."""
    if not folder.is_dir():
        return []
    manifest = _read_json(folder / MANIFEST) or {}
    ours = {MANIFEST, *(name for name in manifest.values() if isinstance(name, str))}
    files = (path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir())
    return sorted(name for name in files if name not in ours)


def recorded_failure(record: Path, recipe: Recipe) -> dict[str, Any] | None:
    """The failure recorded in ``record`` when it was made from ``recipe``, else None."""
    data = _read_json(record)
    if data is None or data.get("recipe") != json.loads(json.dumps(asdict(recipe), sort_keys=True)):
        return None
    return data


def record_failure(record: Path, recipe: Recipe, error: str, attempts: int, log: str) -> None:
    """Write the record of a failure (whole: written beside, then renamed)."""
    record.parent.mkdir(parents=True, exist_ok=True)
    data = {"recipe": asdict(recipe), "error": error, "attempts": attempts, "log": log, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    partial = record.with_name(record.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    partial.replace(record)
