"""``jointregseg train all``: every network in sequence, with shares of the time, resumable.

`SCHEDULE` lists the networks in the order they are trained (the tto student distils the teacher, so
it follows it) and each one's share of a round. ``train_all(minutes, round_minutes)`` runs rounds of
``round_minutes`` until ``minutes`` are spent: in every round each network trains for its share
(`loop.fit`: it resumes from its checkpoint, validates on its held-apart set, and writes weights
only when they improve), so a long background run improves every network along the way and a
stopped one loses at most one validation interval of one network. A network that fails (a bug, the
GPU's memory, data it cannot find) is reported in the log and in its summary (``error``) and left out of
the rounds after; the others go on, so one failure does not cost a GPU run the remaining networks.

On a GPU (``device="cuda"``), `GPU_SETTINGS` apply: batches of 4 and hof's phases shortened, so the
whole schedule fits in minutes (the prepared run of the README: 8 minutes on one GPU). The networks train in
turn there too: on one H200 (2026-11-30) seven training processes side by side took turns on the GPU and made
about as many iterations together as one alone (docs/results/gpu_training.md).
"""

from __future__ import annotations

import json
import sys
import tarfile
import time
import traceback
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import make_trainer
from .loop import fit, rounded_scores, validate_weights

# (network, its fixed settings, share of each round's time)
SCHEDULE: tuple[tuple[str, dict[str, Any], float], ...] = (
    ("uresnet", {}, 0.20),
    ("jers", {}, 0.18),
    ("hof", {}, 0.27),
    ("tto", {"stage": "teacher"}, 0.17),
    ("tto", {"stage": "student"}, 0.10),
    ("segreg", {}, 0.08),
)
GPU_SETTINGS: dict[str, dict[str, Any]] = {
    "tto": {"batch_size": 4},
    "segreg": {"batch_size": 4},
    "uresnet": {"batch_size": 4},
    "jers": {"batch_size": 4},
    "hof": {"batch_size": 4, "phases": [300, 150, 300], "lambda3_ramp": 150},
}
STARTUP_S = 20.0  # below this many seconds a network's slice is skipped (start-up and validation would fill it)


def label(name: str, settings: dict[str, Any]) -> str:
    """``tto teacher``, ``uresnet``, ...: a schedule entry's name."""
    return " ".join([name, *[str(v) for v in settings.values()]])


def train_all(
    minutes: float,
    device: str = "cpu",
    round_minutes: float | None = None,
    output: str | None = None,
    threads: int | None = None,
    seed: int = 0,
    only: list[str] | None = None,
    options: dict[str, Any] | None = None,
    log: Any = sys.stderr,
) -> list[dict[str, Any]]:
    """Train every network (`SCHEDULE`, or the entries whose label starts with one of ``only``) for ``minutes``
    in rounds of ``round_minutes`` (default: one round); returns each slice's summary."""
    if not minutes > 0:
        raise InputError(f"--minutes must be positive; got {minutes}")
    round_minutes = float(round_minutes or minutes)
    if not round_minutes > 0:
        raise InputError(f"--round-minutes must be positive; got {round_minutes}")
    schedule = [e for e in SCHEDULE if not only or any(label(e[0], e[1]).startswith(o) for o in only)]
    if not schedule:
        raise InputError(f"no network matches {only}; the networks are {[label(n, s) for n, s, _ in SCHEDULE]}")
    total_share = sum(share for _, _, share in schedule)
    deadline = time.monotonic() + 60.0 * minutes
    summaries: list[dict[str, Any]] = []
    failed: set[str] = set()
    while time.monotonic() < deadline - STARTUP_S:
        round_end = min(deadline, time.monotonic() + 60.0 * round_minutes)
        for index, (name, settings, share) in enumerate(schedule):
            left_shares = sum(s for _, _, s in schedule[index:])
            seconds = (round_end - time.monotonic()) * share / left_shares
            if seconds < STARTUP_S:
                continue
            config = {
                **(GPU_SETTINGS.get(name, {}) if device.startswith("cuda") else {}),
                **(options or {}), **settings,
                "time_limit": seconds, "device": device, "seed": seed, "output": output, "threads": threads,
                "validate_every": max(30.0, min(300.0, seconds / 3.0)),
            }
            tick = time.monotonic()
            print(f"== {label(name, settings)}: {seconds / 60:.1f} minutes ({share / total_share:.0%} of the round)", file=log, flush=True)
            try:
                summary = fit(make_trainer(name, config), log=log)
            except Exception as error:  # one network's failure must not end the others' training
                traceback.print_exc(file=log)
                failed.add(label(name, settings))
                summary = {"name": label(name, settings), "error": f"{type(error).__name__}: {error}"}
                print(f"== {label(name, settings)} failed and is left out from now on: {summary['error']}", file=log, flush=True)
            summary["slice_seconds"] = round(time.monotonic() - tick, 1)
            summaries.append(summary)
            print(json.dumps({k: summary.get(k) for k in ("name", "iterations", "best_score", "seconds_per_iteration", "step_share", "error")}), file=log, flush=True)
        schedule = [entry for entry in schedule if label(entry[0], entry[1]) not in failed]
        if not schedule:
            break
    return summaries


def failures(summaries: list[dict[str, Any]]) -> list[str]:
    """``"<network>: <error>"`` for each slice of `train_all`'s summaries that failed."""
    return [f"{s['name']}: {s['error']}" for s in summaries if "error" in s]


def archive(folder: Path, path: Path) -> Path:
    """The weights, manifest, curves and log of a run's ``folder`` (not its checkpoints) as one tar file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for item in sorted(folder.iterdir()):
            if item.is_file():
                tar.add(item, arcname=item.name)
    return path


def adopt(folder: Path, target: Path | None = None, device: str = "cpu", log: Any = sys.stderr) -> list[str]:
    """Copy the weights of another run's ``folder`` (a GPU run's output) into ``target`` (default the shipped
    weights) where they validate better than the weights there. Both are scored here, on ``device``, by one trainer
    made with the run's own settings, so on one held-apart set: the scores the two manifests record may come from
    other sets (another device's draw before `loop.held_apart_generator`, a validation changed since). The adopted
    weights' provenance holds this validation (``validation``; the run's own in ``validation_in_run``) and the
    weights they replaced with their score; their curves come along. Returns the names."""
    import shutil

    from ..weights import read_manifest, record_weights, sha256_of, weights_dir

    target = target or weights_dir()
    theirs, ours = read_manifest(folder), read_manifest(target)
    adopted = []
    for name, entry in theirs.items():
        if not (folder / entry["file"]).is_file() or entry["sha256"] == ours.get(name, {}).get("sha256"):
            continue  # listed but not in the folder (an archive of the run's new files), or the weights there already
        if sha256_of(folder / entry["file"]) != entry["sha256"]:
            raise InputError(f"{folder / entry['file']} does not match its checksum in {folder / 'manifest.json'}")
        provenance = entry.get("provenance", {})
        trainer = _validating_trainer(provenance, folder, device)
        score = rounded_scores(validate_weights(trainer, folder)[0])
        if score is None:
            raise InputError(f"{folder / entry['file']} does not fit the {provenance['method']} network it was trained as")
        mine = rounded_scores(validate_weights(trainer, target)[0])  # None: none there, or none that fit
        verdict = "adopted" if mine is None or score["score"] > mine["score"] else "kept the weights there"
        print(f"{name}: run {score['score']:.4f}, {target} {'-' if mine is None else format(mine['score'], '.4f')}: {verdict}", file=log, flush=True)
        if verdict != "adopted":
            continue
        for suffix in (".pt", "_loss.csv", "_validation.csv", "_training.png"):
            if (folder / f"{name}{suffix}").is_file():
                shutil.copy2(folder / f"{name}{suffix}", target / f"{name}{suffix}")
        replaced = {"sha256": ours[name]["sha256"], "score": mine and mine["score"]} if name in ours else None
        record_weights(name, target / entry["file"], {
            **provenance, "validation": {"iteration": provenance.get("iterations"), **score},
            "validation_in_run": provenance.get("validation"), "replaced_weights": replaced,
        })
        adopted.append(name)
    return adopted


def _validating_trainer(provenance: dict[str, Any], folder: Path, device: str) -> Any:
    """The trainer of the run that wrote weights with ``provenance`` (its method and settings), on ``device``."""
    config = {k: v for k, v in provenance.get("config", {}).items() if k not in ("resume", "warm_start", "threads", "workers")}
    return make_trainer(provenance["method"], {**config, "device": device, "output": str(folder), "iterations": 1})

