"""The cohort runner: plan every pair and method, run what needs running on Dask, write one summary.

1. Plan (`plan_tasks`): each pair and method is kept (a complete result made from the same
   inputs and options), reported as failed earlier (a recorded failure of the same inputs and
   options), refused (a missing input, or an output folder holding files the worker did not
   write), or run.
2. Run (`execute`): one Dask task per pair and method (`task.run_task`), each running the
   registration worker in its own process; progress on the terminal (tasks done, failed, left
   and time left) and the Dask dashboard's address. Only when something needs running is a
   cluster started or a scheduler contacted.
3. Summarise: ``summary.csv``, ``failures.csv`` and ``figures/<method>.png`` in the batch folder;
   a failure is recorded beside its logs so that a rerun does not repeat it; a success removes
   the record.

Ctrl-C: the batch creates its stop file (``DIR/.stop``); every running task stops its worker
(SIGTERM: the worker removes its unfinished output), tasks not yet started end at once, and the
summary is written with those pairs marked cancelled. A second Ctrl-C leaves without waiting.
One batch at a time writes into a folder (a lock file, ``DIR/.batch.lock``).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from ..bench.pairs import PairSpec
from ..bench.runner import folder_name, method_spec
from ..errors import InputError
from ..methods import method_names
from ..methods.options import SETTINGS, validate_options, validate_setting
from ..worker.job import INPUT_KEYS
from ..worker.outputs import versions, write_json
from .cluster import ClusterOptions, Placement, dask_client, has_dashboard
from .resume import Checksums, Recipe, definition_of, finished_result, foreign_files, record_failure, recorded_failure
from .summary import FAILED, Row, result_numbers, write_summary
from .task import TaskOutcome, TaskPaths, TaskSpec, run_task

STOP_FILE = ".stop"
LOCK_FILE = ".batch.lock"
STOP_GRACE_S = 120.0


@dataclass
class BatchSettings:
    """What every task runs: the methods (each with its own options, ``segreg[variant=learned]``) and the job settings."""

    methods: list[str] = field(default_factory=lambda: ["tto"])
    device: str = "cpu"
    seed: int = 0
    iterations: int | None = None
    time_budget: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    pictures: bool = True
    threads: int | None = None
    timeout_s: float | None = None
    retry_failed: bool = False

    def check(self) -> None:
        """Raise `InputError` for an unknown method, a repeated method, a bad setting or option (`methods.options`)."""
        if not self.methods:
            raise InputError("no method given: use --methods, e.g. --methods tto,segreg.")
        unknown = [m for m in self.methods if method_spec(m)[0] not in method_names()]
        if unknown:
            raise InputError(f"unknown method(s) {unknown}; choose from: {', '.join(method_names())}.")
        folders = [folder_name(m) for m in self.methods]
        if len(set(folders)) < len(folders):
            raise InputError(f"--methods names a method twice: {', '.join(self.methods)}.")
        for name in SETTINGS:  # checked here once, as every task's worker would check them
            validate_setting(name, getattr(self, name), f"--{name.replace('_', '-')}")
        for method in self.methods:
            name, own_options = method_spec(method)
            validate_options(name, {**self.options, **own_options})
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise InputError(f"--timeout must be a positive number of seconds; got {self.timeout_s:g}.")


@dataclass
class Planned:
    """One pair and method as planned: ``run``, ``kept``, ``failed earlier`` or ``failed`` (refused), and why."""

    pair: PairSpec
    method: str
    paths: TaskPaths
    job: dict[str, Any]
    status: str
    recipe: Recipe | None = None
    error: str = ""


@dataclass
class BatchReport:
    """The rows of the summary, and whether Ctrl-C stopped the batch."""

    rows: list[Row]
    cancelled: bool = False

    @property
    def failed(self) -> int:
        return sum(row.status in FAILED for row in self.rows)


def worker_job(pair: PairSpec, method: str, settings: BatchSettings) -> dict[str, Any]:
    """The worker job of one pair and method (its output folder is set by the task)."""
    name, own_options = method_spec(method)
    inputs = {key: str(getattr(pair, key)) for key in INPUT_KEYS if getattr(pair, key) is not None}
    return {
        "method": name,
        **inputs,
        "device": settings.device,
        "seed": settings.seed,
        "iterations": settings.iterations,
        "time_budget": settings.time_budget,
        "options": {**settings.options, **own_options},
        "pictures": settings.pictures,
    }


def plan_task(pair: PairSpec, method: str, settings: BatchSettings, out: Path, checksums: Checksums) -> Planned:
    """Decide what to do with one pair and method (see the module docstring)."""
    paths = TaskPaths(out / pair.name / folder_name(method))
    paths.restore_interrupted_swap()
    job = worker_job(pair, method, settings)
    missing = [f"the {key} file '{job[key]}' does not exist" for key in INPUT_KEYS if key in job and not Path(job[key]).is_file()]
    if missing:
        return Planned(pair, method, paths, job, "failed", error="; ".join(missing) + ": fix the pair list.")
    recipe = Recipe({key: checksums(Path(job[key])) for key in INPUT_KEYS if key in job}, definition_of(job))
    if finished_result(paths.folder, recipe):
        return Planned(pair, method, paths, job, "kept", recipe)
    foreign = foreign_files(paths.folder)
    if foreign:
        return Planned(
            pair, method, paths, job, "failed", recipe,
            f"{paths.folder} holds files JointRegSeg did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): "
            "move them out, or choose another --out.",
        )
    record = None if settings.retry_failed else recorded_failure(paths.failure_record, recipe)
    if record is not None:
        return Planned(pair, method, paths, job, "failed earlier", recipe, str(record.get("error", "")))
    return Planned(pair, method, paths, job, "run", recipe)


def plan_tasks(pairs: list[PairSpec], settings: BatchSettings, out: Path) -> list[Planned]:
    """Plan every pair and method, pair by pair (in the pair list's order)."""
    checksums = Checksums()
    planned = []
    for pair in tqdm(pairs, desc="checking earlier results", unit="pair", leave=False, file=sys.stderr):
        planned.extend(plan_task(pair, method, settings, out, checksums) for method in settings.methods)
    return planned


@contextmanager
def batch_lock(out: Path) -> Iterator[None]:
    """Hold ``DIR/.batch.lock`` for the batch: a second batch into the same folder stops with a message."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one batch per folder is up to the user
        yield
        return
    with (out / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            raise InputError(f"another batch is writing into {out}; wait for it to finish or choose another --out.") from error
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _task_spec(planned: Planned, settings: BatchSettings, placement: Placement, stop_file: Path) -> TaskSpec:
    return TaskSpec(
        pair=planned.pair.name,
        method=planned.method,
        folder=str(planned.paths.folder),
        job=planned.job,
        threads=settings.threads or placement.threads_per_job,
        timeout_s=settings.timeout_s,
        stop_file=str(stop_file),
    )


def _outcome(future: Any, planned: Planned) -> TaskOutcome:
    """The task's outcome; a task that Dask could not run at all (its worker died, ...) becomes a failure."""
    if future.status == "finished":
        return future.result()
    if future.status == "error":
        error = future.exception()
        return TaskOutcome(planned.pair.name, planned.method, "failed", error=f"the Dask task failed ({type(error).__name__}: {error}).")
    return TaskOutcome(planned.pair.name, planned.method, "cancelled")


def execute(
    to_run: list[Planned], settings: BatchSettings, cluster: ClusterOptions, stop_file: Path, log: Callable[[str], None]
) -> tuple[dict[int, TaskOutcome], bool]:
    """Run the planned tasks on Dask; returns each task's outcome (by index in ``to_run``) and whether Ctrl-C stopped them."""
    from distributed import as_completed, wait

    outcomes: dict[int, TaskOutcome] = {}
    cancelled = False
    started = time.monotonic()
    with dask_client(cluster) as (client, placement):
        log(f"{placement.description}; {placement.slots} task(s) at once" + (f", {_threads(settings, placement)} thread(s) each" if _threads(settings, placement) else ""))
        if cluster.scheduler is None and not has_dashboard():
            log("(the Dask dashboard needs bokeh: pip install -e '.[batch]')")
        else:
            log(f"Dask dashboard: {client.dashboard_link}")
        token = f"{os.getpid()}-{int(time.time())}"
        futures = {
            client.submit(
                run_task, _task_spec(planned, settings, placement, stop_file), key=f"jointregseg-{planned.pair.name}-{planned.paths.folder.name}-{token}",
                pure=False, resources=placement.resources, retries=1,
            ): index
            for index, planned in enumerate(to_run)
        }
        counts: Counter[str] = Counter()
        bar = tqdm(total=len(futures), desc="registering", unit="task", file=sys.stderr, dynamic_ncols=True)
        try:
            for future in as_completed(futures):
                index = futures[future]
                outcomes[index] = _outcome(future, to_run[index])
                counts[outcomes[index].status] += 1
                bar.set_postfix_str(f"done {counts['done']} failed {counts['failed']} left {len(futures) - len(outcomes)}", refresh=False)
                bar.update(1)
                if outcomes[index].status == "failed":
                    bar.write(f"failed: {to_run[index].pair.name} {to_run[index].method}: {outcomes[index].error}")
        except KeyboardInterrupt:
            cancelled = True
            stop_file.touch()
            bar.write("stopping: the running registrations are being stopped and nothing partial is kept (Ctrl-C again to leave at once)")
            try:
                wait(list(futures), timeout=STOP_GRACE_S)
            except (KeyboardInterrupt, TimeoutError):
                pass
            for future, index in futures.items():
                outcomes.setdefault(index, _outcome(future, to_run[index]))
        finally:
            bar.close()
    log(f"{len(outcomes)} task(s) ended after {time.monotonic() - started:.1f} s")
    return outcomes, cancelled


def _threads(settings: BatchSettings, placement: Placement) -> int | None:
    return settings.threads or placement.threads_per_job


def summary_row(planned: Planned, outcome: TaskOutcome | None) -> Row:
    """The summary row of a pair and method: from the plan, and from its task's outcome when it ran."""
    status = outcome.status if outcome is not None else planned.status
    row = Row(planned.pair.name, planned.method, status, error=planned.error)
    if outcome is not None:
        row.attempts, row.process_s, row.peak_rss_mb, row.host, row.error, row.log = (
            outcome.attempts, outcome.process_s, outcome.peak_rss_mb, outcome.host, outcome.error, outcome.log,
        )
    elif status == "failed earlier":
        row.log = str(planned.paths.log())
    if status in ("done", "kept"):
        row.metrics, row.time_s = result_numbers(planned.paths.folder)
        row.output = str(planned.paths.folder)
    elif status in FAILED and planned.paths.folder.is_dir():
        row.error += f" (an earlier result, of other inputs or options, is still in {planned.paths.folder})"
    return row


def _update_failure_record(planned: Planned, outcome: TaskOutcome) -> None:
    if outcome.status == "done":
        planned.paths.failure_record.unlink(missing_ok=True)
    elif outcome.status == "failed" and planned.recipe is not None:
        record_failure(planned.paths.failure_record, planned.recipe, outcome.error, outcome.attempts, outcome.log)


def run_batch(
    pairs: list[PairSpec], settings: BatchSettings, out: Path, cluster: ClusterOptions = ClusterOptions(),
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
) -> BatchReport:
    """Plan, run and summarise a cohort in ``out`` (see the module docstring)."""
    from .figures import make_figures

    settings.check()
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    with batch_lock(out):
        stop_file = out / STOP_FILE
        stop_file.unlink(missing_ok=True)
        planned = plan_tasks(pairs, settings, out)
        write_json(out / "batch.json", _description(pairs, settings, cluster))
        states = Counter(p.status for p in planned)
        to_run = [p for p in planned if p.status == "run"]
        log(
            f"{len(planned)} task(s) ({len(pairs)} pair(s) x {len(settings.methods)} method(s)): {states['kept']} kept, "
            f"{states['failed earlier']} failed earlier (not repeated; --retry-failed), {states['failed']} refused, {len(to_run)} to run"
        )
        outcomes, cancelled = execute(to_run, settings, cluster, stop_file, log) if to_run else ({}, False)
        for index, outcome in outcomes.items():
            _update_failure_record(to_run[index], outcome)
        outcome_of = {(to_run[index].pair.name, to_run[index].method): outcome for index, outcome in outcomes.items()}
        rows = [summary_row(plan, outcome_of.get((plan.pair.name, plan.method))) for plan in planned]
        summary, failures = write_summary(rows, out)
        figures = make_figures(rows, out / "figures")
        stop_file.unlink(missing_ok=True)
    report = BatchReport(rows, cancelled)
    statuses = Counter(row.status for row in rows)
    log(", ".join(f"{count} {status}" for status, count in statuses.items()) + f"; summary: {summary}; failures: {failures}; figures: {', '.join(str(f) for f in figures)}")
    return report


def _description(pairs: list[PairSpec], settings: BatchSettings, cluster: ClusterOptions) -> dict[str, Any]:
    return {
        "settings": asdict(settings),
        "cluster": asdict(cluster),
        "versions": versions(),
        "pairs": [{"id": pair.name, **{k: str(v) for k, v in pair.files().items()}} for pair in pairs],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
