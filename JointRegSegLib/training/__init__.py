"""Training of every network: one `loop.Trainer` per network, run by `loop.fit` (resumable, validated).

``train(name, config, progress)`` trains one network (``name`` a `NETWORKS` key; tto's two networks
are one name with ``stage`` teacher or student); `all.train_all` trains them all in sequence. Training
builds on the methods (their networks and losses) and never the other way round; the command line
reaches it through `training.command`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:  # the command line imports this package to list the networks: no numpy for that
    from ..methods.base import ProgressCallback

NETWORKS: dict[str, str] = {
    "tto": "JointRegSegLib.training.tto",
    "segreg": "JointRegSegLib.training.segreg",
    "uresnet": "JointRegSegLib.training.uresnet",
    "jers": "JointRegSegLib.training.jers",
    "hof": "JointRegSegLib.training.hof",
}


def make_trainer(name: str, config: dict[str, Any]) -> Any:
    """The `loop.Trainer` of network ``name`` for ``config`` (its settings; InputError for a bad one)."""
    if name not in NETWORKS:
        raise InputError(f"unknown network '{name}'; choose one of: {', '.join(NETWORKS)} (or 'all').")
    return import_module(NETWORKS[name]).make_trainer(config)


def train(name: str, config: dict[str, Any], progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train network ``name`` within ``config``'s time and iteration limits; returns `loop.fit`'s summary."""
    from .loop import fit

    return fit(make_trainer(name, config), progress)


__all__ = ["NETWORKS", "make_trainer", "train"]
