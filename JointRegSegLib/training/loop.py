"""The loop every network trains in: resumable, time-boxed, validated, writing weights only when they improve.

A network's training module supplies a `Trainer` (its data, its optimisation step, its validation);
`fit` runs it:

- **resume**: a checkpoint (networks, optimisers, iteration, wall time, best validation score and the
  trainer's own state) in ``<checkpoints>/<name>.pt`` is written at every validation and at the end,
  so a killed run loses at most one validation interval and a later call continues where it stopped.
  Where the checkpoint is lost (a fresh clone, another machine), ``warm_start`` continues from the weights in
  the output folder, or from the shipped ones where it has none (a GPU run's own folder) instead: their networks,
  iteration count, wall time and curves, with fresh optimisers; the run writes weights only where they beat them.
  Iteration ``n`` draws its data from generators seeded with ``(seed, n)``, so a resumed run sees the
  data an uninterrupted one would have seen;
- **time**: ``time_limit`` seconds of this call and/or ``iterations`` in total, whichever ends first;
- **validation**: a fixed, held-apart set (`Trainer.validate`: synthetic pairs from label maps never
  trained on, and the real OASIS scans; never augmented, same seeds at every call, drawn on the CPU on any
  device, `held_apart_generator`) every
  ``validate_every`` seconds and at the end. Its ``score`` (higher is better) decides:
- **weights**: ``<output>/<name>.pt`` (the shipped state dict, loaded with ``weights_only=True``) and its
  manifest entry (SHA-256 and provenance: data, command, iterations, seed, device, validation scores)
  are written only when the score beats every earlier one of this network, the weights that were
  shipped before this run's first validation included;
- **curves**: ``<name>_loss.csv`` (mean of every ``log_every`` iterations: loss terms, seconds of data
  generation and of the network step), ``<name>_validation.csv`` and ``<name>_training.png`` (both)
  of the whole run, rewritten at every validation in the run's logs (`log_dir`: ``<output>/logs``,
  else ``.training/logs``), and copied beside the weights whenever weights are written: the curves
  next to shipped weights always end at those weights' validation.

The split of each iteration into data generation and network step (``data_s``, ``step_s``) is what
the throughput table reports (`training.throughput`); on a GPU the loop synchronises the device
before reading the clock.

Speed on the CPU: every batch holds at least 2 samples (PyTorch sends a batch of one small volume to
its slow reference 3D convolution, several times slower per sample), and networks and images use the
channels-last memory layout (`fast_layout`), whose mkldnn convolution backward is 2-7 times faster
for the few channels these networks have.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import InputError, WeightsError
from ..methods.base import ProgressCallback
from ..nets.layout import fast_layout
from ..weights import fit_state, load_weights, read_manifest, record_weights, weights_dir
from .bank import training_dir
from .common import (
    atomic_torch_save,
    atomic_write_bytes,
    device_name,
    plot_running_mean,
    pyplot,
    read_history,
    save_figure,
    write_history,
)


@dataclass
class CommonConfig:
    """Settings every training run has (each network's config adds its own)."""

    iterations: int | None = None
    time_limit: float | None = None
    batch_size: int = 2
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    output: str | None = None
    resume: bool = True
    warm_start: bool = False
    validate_every: float = 300.0
    log_every: int = 10
    workers: int = 0

    def check_common(self, what: str) -> None:
        """InputError naming ``what`` for a bad common setting; converts the numbers."""
        if self.iterations is None and self.time_limit is None:
            raise InputError(f"{what}: give a number of iterations or a time limit (seconds)")
        for key in ("iterations", "batch_size", "log_every", "workers", "seed"):
            value = getattr(self, key)
            if value is None and key == "iterations":
                continue
            if isinstance(value, bool) or int(value) != value or int(value) < (1 if key in ("batch_size", "log_every") else 0):
                raise InputError(f"{what} setting '{key}' must be a whole number >= {1 if key in ('batch_size', 'log_every') else 0}; got {value!r}")
            setattr(self, key, int(value))
        for key in ("lr", "validate_every"):
            if not float(getattr(self, key)) > 0:
                raise InputError(f"{what} setting '{key}' must be positive; got {getattr(self, key)!r}")
            setattr(self, key, float(getattr(self, key)))
        if self.time_limit is not None:
            if not float(self.time_limit) > 0:
                raise InputError(f"{what} setting 'time_limit' must be a positive number of seconds; got {self.time_limit!r}")
            self.time_limit = float(self.time_limit)
        for key in ("resume", "warm_start"):
            if not isinstance(getattr(self, key), bool):
                raise InputError(f"{what} setting '{key}' must be true or false; got {getattr(self, key)!r}")


class Trainer:
    """One network's training: subclasses set ``name``, ``method``, ``net`` and implement the methods below."""

    name: str
    method: str
    net: torch.nn.Module
    cfg: CommonConfig
    device: torch.device

    def modules(self) -> dict[str, torch.nn.Module]:
        """The networks the checkpoint holds (default: the shipped one)."""
        return {"net": self.net}

    def optimisers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def batch(self, n: int) -> Any:
        """The training data of iteration ``n`` (deterministic in the seed and ``n``)."""
        raise NotImplementedError

    def step(self, batch: Any, n: int) -> dict[str, float]:
        """One optimisation step on ``batch``; returns the loss and its terms."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Scores on the held-apart validation set; ``score`` (higher is better) decides which weights ship."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Provenance of the run: ``data``, ``validation_set``, architecture and the like."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Trainer state beyond networks and optimisers, kept in the checkpoint."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state` returned."""

    def shipped_state(self) -> dict[str, torch.Tensor]:
        """The state dict written as the weights file."""
        return {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}

    def generator(self, n: int, stream: int = 0) -> torch.Generator:
        """A generator on the trainer's device seeded by (seed, iteration ``n``, ``stream``)."""
        return torch.Generator(device=self.device).manual_seed(int(self.cfg.seed) * 1000003 + int(n) * 7 + int(stream))


def held_apart_generator(seed: int = 10**6) -> torch.Generator:
    """The generator a validation set is drawn with: on the CPU whatever the training device (`fast_layout` moves
    the set there), so a GPU run validates on the very pairs a CPU run does and their scores compare."""
    return torch.Generator().manual_seed(seed)


def command_line() -> str:
    """This process's command as a user would type it again (``python -m JointRegSegLib.training ...`` rather
    than the path of ``__main__.py``)."""
    program = Path(sys.argv[0])
    name = f"python -m {__package__}" if program.name == "__main__.py" else program.name
    return " ".join([name, *sys.argv[1:]])


def checkpoint_dir(output: str | None) -> Path:
    """Where checkpoints go: ``<output>/checkpoints`` for a run with its own output folder, else
    ``.training/checkpoints`` (`bank.training_dir`)."""
    return Path(output) / "checkpoints" if output else training_dir() / "checkpoints"


def log_dir(output: str | None) -> Path:
    """Where a run's curves go as it trains: ``<output>/logs`` for a run with its own output folder, else
    ``.training/logs`` (`bank.training_dir`)."""
    return Path(output) / "logs" if output else training_dir() / "logs"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Batches(torch.utils.data.IterableDataset):
    """Iteration ``start, start + 1, ...``'s batches, made in DataLoader worker processes (order kept)."""

    def __init__(self, trainer: Trainer, start: int) -> None:
        self.trainer, self.start = trainer, start

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        workers, index = (1, 0) if info is None else (info.num_workers, info.id)
        n = self.start + index
        while True:
            yield self.trainer.batch(n)
            n += workers


def _batches(trainer: Trainer, start: int) -> Iterator[Any]:
    """Batches from iteration ``start`` on: in this process, or in ``workers`` processes (CPU only)."""
    if trainer.cfg.workers > 0 and trainer.device.type == "cpu":
        loader = torch.utils.data.DataLoader(
            _Batches(trainer, start), batch_size=None, num_workers=trainer.cfg.workers,
            worker_init_fn=lambda _: torch.set_num_threads(1), prefetch_factor=2,
        )
        for batch in loader:
            yield fast_layout(batch, trainer.device)
        return
    n = start
    while True:
        yield fast_layout(trainer.batch(n), trainer.device)
        n += 1


def plot_curves(name: str, history: list[dict[str, Any]], validation: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss terms (left) and validation scores against iterations (right) as a PNG."""
    if not history and not validation:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    skip = {"iteration", "wall_s", "data_s", "step_s", "stage", "score"}
    for key in [k for k in (history[0] if history else {}) if k not in skip]:
        rows = [r for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if rows:
            plot_running_mean(axes[0], np.asarray([r["iteration"] for r in rows]), np.asarray([r[key] for r in rows]), key, window=10)
    axes[0].set_title(f"{name}: training loss terms\n(mean of each logged block; lower is better)")
    for key in [k for k in (validation[0] if validation else {}) if k not in ("iteration", "wall_s")]:
        rows = [r for r in validation if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if rows:
            style = "--" if key.startswith("identity") or key.startswith("affine") else "-"
            axes[1].plot([r["iteration"] for r in rows], [r[key] for r in rows], style, marker=".", label=key,
                         linewidth=2.5 if key == "score" else 1.2)
    axes[1].set_title(f"{name}: held-apart validation\n(higher is better; dashed: baselines)")
    for axis in axes:
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        if axis.get_lines():
            axis.legend(fontsize=7)
    return save_figure(figure, path)


def validation_scores(trainer: Trainer) -> dict[str, float]:
    """`Trainer.validate` with the trainer's modules in eval mode (left so) and no gradients."""
    for module in trainer.modules().values():
        module.eval()
    with torch.no_grad():
        return trainer.validate()


def rounded_scores(scores: dict[str, float] | None) -> dict[str, float] | None:
    """Validation scores as they are recorded (5 decimals); None stays None."""
    return None if scores is None else {k: round(float(v), 5) for k, v in scores.items()}


def validate_weights(trainer: Trainer, folder: Path) -> tuple[dict[str, float] | None, str | None, dict[str, torch.Tensor] | None]:
    """Validation scores, SHA-256 and state of the weights called the trainer's name in ``folder`` (None when there
    are none, or they do not fit the network); the trainer's network is left as it was."""
    if trainer.name not in read_manifest(folder):
        return None, None, None
    current = copy.deepcopy(trainer.net.state_dict())
    try:
        state, checksum = load_weights(trainer.name, folder)
        fit_state(trainer.net, state, trainer.name)
        return validation_scores(trainer), checksum, state
    except WeightsError:
        return None, None, None
    finally:  # also after a misfit: torch copies the tensors that fit before it raises
        trainer.net.load_state_dict(current)


def _warm_start(trainer: Trainer, folder: Path, state: dict[str, torch.Tensor]) -> tuple[int, float]:
    """Load the shipped weights' ``state`` into the trainer's network; returns the iteration and wall seconds their
    manifest entry records (the optimisers start afresh)."""
    provenance = read_manifest(folder)[trainer.name].get("provenance", {})
    if not isinstance(provenance.get("iterations"), int):
        raise InputError(
            f"the shipped {trainer.name} weights in {folder} record no iteration count to continue from: train without warm_start"
        )
    fit_state(trainer.net, state, trainer.name)
    return provenance["iterations"], float(provenance.get("wall_seconds", 0.0))


def fit(trainer: Trainer, progress: ProgressCallback | None = None, log: Any = sys.stderr) -> dict[str, Any]:
    """Train ``trainer`` within its settings' time and iteration limits (module docstring); returns a summary."""
    cfg = trainer.cfg
    folder = Path(cfg.output) if cfg.output else weights_dir()
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint_path = checkpoint_dir(cfg.output) / f"{trainer.name}.pt"
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    logs = log_dir(cfg.output)
    logs.mkdir(parents=True, exist_ok=True)
    curves = [f"{trainer.name}{suffix}" for suffix in ("_loss.csv", "_validation.csv", "_training.png")]
    loss_csv, validation_csv, plot_path = (logs / name for name in curves)
    modules, optimisers = trainer.modules(), trainer.optimisers()
    for module in modules.values():
        fast_layout(module, trainer.device)

    iteration, wall_before, best, replaced = 0, 0.0, -math.inf, None
    if cfg.resume and checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location=trainer.device, weights_only=True)
        for key, module in modules.items():
            module.load_state_dict(checkpoint["modules"][key])
        for key, optimiser in optimisers.items():
            optimiser.load_state_dict(checkpoint["optimisers"][key])
        iteration, wall_before = int(checkpoint["iteration"]), float(checkpoint["wall_seconds"])
        best, replaced = float(checkpoint["best"]), checkpoint.get("replaced")
        trainer.load_state(checkpoint["trainer"])
        # a run checkpointed before the logs folder existed kept its curves beside the weights
        history = [r for r in read_history(loss_csv) or read_history(folder / curves[0]) if r["iteration"] <= iteration]
        validation = [r for r in read_history(validation_csv) or read_history(folder / curves[1]) if r["iteration"] <= iteration]
    else:
        history, validation = [], []
        source = folder
        scores, checksum, shipped = validate_weights(trainer, source)
        if cfg.warm_start and shipped is None and folder.resolve() != weights_dir().resolve():
            source = weights_dir()  # an output folder of its own (a GPU run's): it continues the shipped weights
            scores, checksum, shipped = validate_weights(trainer, source)
        if scores is not None:
            best = float(scores["score"])
            replaced = {"sha256": checksum, "score": best}
        if cfg.warm_start:
            if shipped is None:
                raise InputError(
                    f"warm_start continues from the {trainer.name} weights in {folder} or, where they are not, the shipped "
                    f"ones in {weights_dir()}, but there are none that fit the network: train without warm_start"
                )
            iteration, wall_before = _warm_start(trainer, source, shipped)
            history = [r for r in read_history(source / curves[0]) if r["iteration"] <= iteration]
            validation = [r for r in read_history(source / curves[1]) if r["iteration"] <= iteration]

    run_start = time.perf_counter()
    deadline = None if cfg.time_limit is None else run_start + cfg.time_limit
    described = trainer.describe()

    def wall() -> float:
        return wall_before + time.perf_counter() - run_start

    def save_checkpoint() -> None:
        atomic_torch_save({
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "optimisers": {k: o.state_dict() for k, o in optimisers.items()},
            "iteration": iteration, "wall_seconds": wall(), "best": best, "replaced": replaced,
            "trainer": trainer.state(),
        }, checkpoint_path)

    def validate_and_save() -> dict[str, float]:
        nonlocal best
        scores = validation_scores(trainer)
        for module in modules.values():
            module.train()
        row = {"iteration": iteration, "wall_s": round(wall(), 1), **rounded_scores(scores)}
        validation.append(row)
        write_history(history, loss_csv)
        write_history(validation, validation_csv)
        plot_curves(trainer.name, history, validation, plot_path)
        if scores["score"] > best:
            best = float(scores["score"])
            weights = folder / f"{trainer.name}.pt"
            atomic_torch_save(trainer.shipped_state(), weights)
            record_weights(trainer.name, weights, {
                "method": trainer.method,
                "command": command_line(),
                **described,
                "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                "iterations": iteration,
                "seed": cfg.seed,
                "device": device_name(trainer.device),
                "torch": torch.__version__,
                "validation": row,
                "replaced_weights": replaced,
                "wall_seconds": round(wall(), 1),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
            for name in curves:
                if (logs / name).is_file():
                    atomic_write_bytes(folder / name, (logs / name).read_bytes())
            print(f"{trainer.name} iteration {iteration}: validation {best:.4f}, weights written", file=log, flush=True)
        else:
            print(f"{trainer.name} iteration {iteration}: validation {scores['score']:.4f} (best {best:.4f})", file=log, flush=True)
        save_checkpoint()
        return scores

    if not validation:
        validate_and_save()
    for module in modules.values():
        module.train()
    block: dict[str, list[float]] = {}
    next_validation = time.perf_counter() + cfg.validate_every
    start_iteration, data_total, step_total, stopped_by = iteration, 0.0, 0.0, "iterations"
    batches = _batches(trainer, iteration)
    while cfg.iterations is None or iteration < cfg.iterations:
        if deadline is not None and time.perf_counter() >= deadline:
            stopped_by = "time limit"
            break
        tick = time.perf_counter()
        batch = next(batches)
        _sync(trainer.device)
        tock = time.perf_counter()
        terms = trainer.step(batch, iteration)
        _sync(trainer.device)
        done = time.perf_counter()
        iteration += 1
        data_total, step_total = data_total + tock - tick, step_total + done - tock
        for key, value in {**terms, "data_s": tock - tick, "step_s": done - tock}.items():
            block.setdefault(key, []).append(float(value))
        if iteration % cfg.log_every == 0:
            history.append({"iteration": iteration, **{k: round(float(np.mean(v)), 6) for k, v in block.items()}})
            block = {}
        if progress is not None:
            fractions = []
            if cfg.iterations is not None:
                fractions.append((iteration - start_iteration) / max(cfg.iterations - start_iteration, 1))
            if deadline is not None:
                fractions.append(1.0 - (deadline - time.perf_counter()) / cfg.time_limit)
            progress(min(1.0, max(fractions)), f"{trainer.name} {iteration}")
        if time.perf_counter() >= next_validation:
            validate_and_save()
            next_validation = time.perf_counter() + cfg.validate_every
    final = validation[-1] if validation[-1]["iteration"] == iteration else validate_and_save()
    done_here = iteration - start_iteration
    return {
        "name": trainer.name,
        "iterations": iteration,
        "iterations_this_run": done_here,
        "stopped_by": stopped_by,
        "best_score": best,
        "last_validation": final,
        "seconds_per_iteration": round((data_total + step_total) / done_here, 4) if done_here else None,
        "step_share": round(step_total / (data_total + step_total), 3) if done_here else None,
        "wall_seconds": round(wall(), 1),
        "weights": str(folder / f"{trainer.name}.pt"),
        "curves": str(plot_path),
    }
