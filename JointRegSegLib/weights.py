"""Shipped model weights: where they live, their checksums, and safe loading.

Weights are trained by this repository's own scripts (``jointregseg train ...``) and shipped in
``Resources/weights/`` with ``manifest.json`` recording each file's SHA-256 and provenance. They
are always loaded with ``torch.load(..., weights_only=True)`` after the checksum is verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import WeightsError

if TYPE_CHECKING:  # torch is imported where weights are loaded: finding Resources/ needs no torch (the web page)
    import torch

MANIFEST = "manifest.json"


def resources_dir() -> Path:
    """The repository's Resources/ folder (override with JRS_RESOURCES)."""
    return Path(os.environ.get("JRS_RESOURCES", Path(__file__).resolve().parents[1] / "Resources"))


def weights_dir() -> Path:
    """Where weight files and their manifest live (override with JRS_WEIGHTS_DIR)."""
    return Path(os.environ.get("JRS_WEIGHTS_DIR", resources_dir() / "weights"))


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path | None = None) -> dict[str, Any]:
    """The manifest of a weights folder ({} when there is none)."""
    path = (folder or weights_dir()) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise WeightsError(f"the weights manifest {path} is not valid JSON ({error}); restore it from the repository.") from error


@contextmanager
def _manifest_lock(folder: Path, stale_s: float = 60.0) -> Iterator[None]:
    """Hold ``folder``'s manifest lock: a file created exclusively (portable; a lock older than
    ``stale_s`` seconds is left over from a killed process and is taken over)."""
    lock = folder / f".{MANIFEST}.lock"
    while True:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > stale_s:
                    lock.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def record_weights(name: str, path: Path, provenance: dict[str, Any]) -> str:
    """Add or update a manifest entry for a freshly written weights file; returns its SHA-256."""
    folder = path.parent
    checksum = sha256_of(path)
    with _manifest_lock(folder):  # two training runs saving at once must not drop each other's entry
        manifest = read_manifest(folder)
        manifest[name] = {"file": path.name, "sha256": checksum, "provenance": provenance}
        staged = folder / f".{MANIFEST}.{os.getpid()}"
        staged.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(staged, folder / MANIFEST)
    return checksum


def load_weights(name: str, folder: Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Verified state dict and SHA-256 of the shipped weights called ``name``."""
    folder = folder or weights_dir()
    entry = read_manifest(folder).get(name)
    if entry is None:
        raise WeightsError(
            f"no weights named '{name}' in {folder / MANIFEST}. Train them with `jointregseg train` "
            "(see README.md) or restore Resources/weights from the repository."
        )
    path = folder / entry["file"]
    if not path.exists():
        raise WeightsError(f"weights file {path} is missing. Restore Resources/weights from the repository or retrain.")
    checksum = sha256_of(path)
    if checksum != entry["sha256"]:
        raise WeightsError(
            f"weights file {path} does not match its recorded checksum (expected {entry['sha256'][:12]}..., "
            f"found {checksum[:12]}...): it is corrupt or was modified. Restore it from the repository or retrain."
        )
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unreadable files
        raise WeightsError(f"weights file {path} cannot be read ({type(error).__name__}); restore it or retrain.") from error
    broken = [key for key, value in state.items() if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise WeightsError(
            f"weights file {path} holds NaN or infinite values ({len(broken)} tensors, e.g. '{broken[0]}'): a training run "
            "diverged or the file is damaged. Restore it from the repository or retrain."
        )
    return state, checksum


def fit_state(net: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Load the state dict of the weights called ``name`` into ``net``; WeightsError when they do not
    fit the network (another architecture, or stale weights)."""
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise WeightsError(f"weights '{name}' do not fit the {type(net).__name__} network ({misfit(net, state)}); retrain them.") from error


def misfit(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    """How a state dict differs from a network's, in one line (torch's own message spans many)."""
    expected = net.state_dict()
    shapes = [key for key in state if key in expected and tuple(state[key].shape) != tuple(expected[key].shape)]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    parts = []
    if shapes:
        key = shapes[0]
        parts.append(
            f"{len(shapes)} tensor(s) of another shape, e.g. '{key}' {list(state[key].shape)} in the file, "
            f"{list(expected[key].shape)} in the network"
        )
    parts += [f"{len(names)} {what}, e.g. '{names[0]}'" for names, what in ((missing, "missing"), (unexpected, "unexpected")) if names]
    return "; ".join(parts) or "they differ"


def load_into(net: torch.nn.Module, name: str, folder: Path | None = None) -> str:
    """Load the verified shipped weights called ``name`` (`load_weights`) into ``net`` (`fit_state`);
    returns their SHA-256."""
    state, checksum = load_weights(name, folder)
    fit_state(net, state, name)
    return checksum
