"""What the cohort runner costs: ``jointregseg batch`` against running the worker directly.

    python -m JointRegSegLib.experiments.batch_overhead --out batch_overhead [--count 20] [--spacing 3] \\
        [--method "tto[tto=false;spacing=4;affine_iterations=[15,6,3]]"]

1. ``count`` synthetic pairs are made from the shared data's brain (`bench.pairs.synthetic_pair_list`:
   the pair's fixed T1 under known random smooth deformations, resampled to ``spacing`` mm).
2. Direct: ``python -m JointRegSegLib.worker JOB.json`` for each pair, one after another, with all
   cores (the jobs the batch would run, `batch.runner.worker_job`).
3. ``jointregseg batch`` on the same pairs with 1 worker (all cores per registration), then with 2
   workers (the cores shared between them), each into a fresh folder; then a rerun of the last
   (every result kept).

Wall times are of whole commands (interpreter start, cluster start, planning, summary and figures
included). The overhead per task is what the batch with 1 worker spends outside the worker
processes it runs one at a time (its wall time minus the sum of their wall times, `process_s` in
summary.csv), divided by the number of pairs: the cost of Dask, planning and summarising, which
does not depend on how busy the machine is while the registrations run. The difference of the
whole wall times (batch with 1 worker - direct) / count is reported too, with the load averages
before each phase: on a shared machine it mostly measures the change in load. Results go to
``OUT/batch_overhead.json`` and ``OUT/batch_overhead.md``. Needs ../shared/data (or JRS_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..batch.cluster import cpu_count
from ..batch.runner import BatchSettings, worker_job
from ..bench.command import split_names
from ..bench.pairs import SyntheticOptions, synthetic_pair_list
from ..bench.processes import child_environment
from ..errors import InputError
from ..methods.options import parse_options


def _timed(command: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> float:
    start = time.perf_counter()
    with open(log or os.devnull, "w") as stream:
        done = subprocess.run(command, env=env, stdout=stream, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited with {done.returncode}" + (f"; see {log}" if log else ""))
    return wall


def _statuses(summary: Path) -> dict[str, int]:
    with summary.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


def _process_seconds(summary: Path) -> float:
    with summary.open(newline="") as stream:
        return sum(float(row["process_s"]) for row in csv.DictReader(stream) if row["process_s"])


def measure(out: Path, count: int, spacing: float | None, method: str, options: list[str]) -> dict[str, Any]:
    """Run the three configurations (see the module docstring) and return their numbers."""
    out = out.resolve()
    pairs = synthetic_pair_list(out / "pairs", SyntheticOptions(count=count, seed=0, spacing=spacing))
    pair_list = out / "pairs" / "pairs.csv"
    cores = cpu_count()
    settings = BatchSettings(methods=[method], options=parse_options(options), pictures=False, threads=cores)
    results: dict[str, Any] = {"count": count, "spacing_mm": spacing, "method": method, "options": options, "cores": cores}

    direct = out / "direct"
    direct.mkdir(parents=True, exist_ok=True)
    walls = []
    results["load_before_direct"] = os.getloadavg()
    for pair in pairs:
        job = {**worker_job(pair, method, settings), "output": str(direct / pair.name), "threads": cores}
        job_file = direct / f"{pair.name}.json"
        job_file.write_text(json.dumps(job, indent=2))
        walls.append(_timed([sys.executable, "-m", "JointRegSegLib.worker", str(job_file)], child_environment(cores)))
    results["direct_s"] = sum(walls)
    results["direct_per_pair_s"] = sum(walls) / len(walls)

    common = ["--methods", method, "--no-pictures", *[f"--option={item}" for item in options]]
    for workers in (1, 2):
        folder = out / f"batch_{workers}"
        results[f"load_before_batch_{workers}"] = os.getloadavg()
        command = [sys.executable, "-m", "JointRegSegLib.cli", "batch", str(pair_list), "--out", str(folder), "--workers", str(workers), *common]
        results[f"batch_{workers}_s"] = _timed(command, log=out / f"batch_{workers}.log")
        results[f"batch_{workers}_statuses"] = _statuses(folder / "summary.csv")
        results[f"batch_{workers}_process_s"] = _process_seconds(folder / "summary.csv")
        results[f"batch_{workers}_command"] = " ".join(command[2:])
    results["rerun_s"] = _timed(command, log=out / "rerun.log")
    results["rerun_statuses"] = _statuses(out / "batch_2" / "summary.csv")
    results["overhead_per_task_s"] = (results["batch_1_s"] - results["batch_1_process_s"]) / count
    results["wall_difference_per_task_s"] = (results["batch_1_s"] - results["direct_s"]) / count
    results["speed_up_2_workers"] = results["batch_1_s"] / results["batch_2_s"]
    (out / "batch_overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "batch_overhead.md").write_text(_markdown(results))
    return results


def _markdown(r: dict[str, Any]) -> str:
    load = {phase: f"{r[f'load_before_{phase}'][0]:.1f}" for phase in ("direct", "batch_1", "batch_2")}
    return "\n".join([
        f"{r['count']} synthetic pairs ({r['spacing_mm']} mm), {r['method']} {' '.join(r['options'])}, {r['cores']} cores, no pictures",
        "",
        "| run | load average before | wall time (s) | per pair (s) | worker processes (s) |",
        "|---|---:|---:|---:|---:|",
        f"| worker directly, one after another ({r['cores']} threads) | {load['direct']} | {r['direct_s']:.1f} | {r['direct_per_pair_s']:.1f} | {r['direct_s']:.1f} |",
        f"| batch, 1 worker ({r['cores']} threads) | {load['batch_1']} | {r['batch_1_s']:.1f} | {r['batch_1_s'] / r['count']:.1f} | {r['batch_1_process_s']:.1f} |",
        f"| batch, 2 workers ({max(1, r['cores'] // 2)} thread(s) each) | {load['batch_2']} | {r['batch_2_s']:.1f} | {r['batch_2_s'] / r['count']:.1f} | {r['batch_2_process_s']:.1f} |",
        f"| rerun, every result kept | | {r['rerun_s']:.1f} | {r['rerun_s'] / r['count']:.2f} | 0 |",
        "",
        f"Overhead per task (batch with 1 worker, outside its worker processes): {r['overhead_per_task_s']:.2f} s. "
        f"Whole wall times (batch with 1 worker - direct) / pairs: {r['wall_difference_per_task_s']:+.2f} s (mostly the change in load). "
        f"2 workers against 1: {r['speed_up_2_workers']:.2f} x faster.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("batch_overhead"))
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--method", default="tto[tto=false;spacing=4;affine_iterations=[15,6,3]]")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    [method] = split_names(args.method)
    try:
        measure(args.out, args.count, args.spacing, method, args.option)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((args.out / "batch_overhead.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
