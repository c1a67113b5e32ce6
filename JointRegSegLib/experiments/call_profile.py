"""Where each method's whole call goes: ``jointregseg register`` as a user runs it, step by step.

    python -m JointRegSegLib.experiments.call_profile --out call_profile \\
        [--methods "uresnet,hof,jers,segreg[variant=learned]"] [--peer demons] [--threads 2] [--repeats 2] \\
        [--before DIR] [--pair shared|sample] [--no-pictures | --as-module]

1. The benchmark pair (``--pair shared``: ../shared/data/pair, or ``$JRS_SHARED_DATA/pair``; ``sample``:
   the bundled 2 mm pair) is registered by each method in its own whole process,
   ``python -m JointRegSegLib.cli register ... --threads T`` (the thread variables of `bench.processes`
   set to T too), pictures included unless ``--no-pictures``. Each run's wall time and peak resident
   memory come from the process (`bench.processes.spawn`); its steps from the run's provenance.json
   (``timings_s.steps``: start-up, reading, the method's own steps, the evaluation's and the writing's,
   `timing`).
2. ``--before DIR``: the same calls from another checkout of the project (e.g. one at main), with
   ``PYTHONPATH=DIR``, alternating with this one's run by run, so both meet the same machine load;
   an older checkout records only start-up/reading/registration/evaluation/writing.
3. ``--peer demons`` (or another `bench.peers` name): the peer's whole process on the same pair in
   the same run (reading, registration, writing its field; `bench.runner`'s peer child), as the
   yardstick the benchmark's ratios use.
4. ``--as-module``: the job as the Slicer module's worker runs it: the inputs as uncompressed ``.nii``
   (the module writes its nodes so; copies of the pair's files under ``OUT/pairs/nii``), no pictures,
   its files uncompressed (``--no-compress``).

The table's "job after start-up" is the job's own time (provenance's ``timings_s.total_s``: from the job's
start to its last file), what the Slicer module waits for once its worker is started ahead of Apply.

Each configuration runs ``--repeats`` times; the tables give the median wall time and the largest
peak memory, and the steps of the run with the median wall time. The load average is recorded
before every run (the machine may be shared). Results: ``OUT/call_profile.json`` (every run) and
``OUT/call_profile.md`` (the tables). Needs ../shared/data for ``--pair shared``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..bench.command import split_names
from ..bench.pairs import PairSpec, resolve_pairs
from ..bench.processes import child_environment, spawn
from ..bench.runner import method_spec, peer_command
from ..errors import InputError

GROUPS = (
    ("start-up", ("start-up",)),
    ("reading", ("reading",)),
    ("to the network grid", ("registration: network grid", "registration: weights", "registration: regions")),
    ("affine stage", ("registration: affine stage",)),
    ("network", ("registration: network",)),
    ("optimisation", ("registration: test-time optimisation", "registration: refinement", "registration: optimisation")),
    ("field to fixed grid", ("registration: field to fixed grid",)),
    ("1 mm warping", ("registration: warping",)),
    ("own segmentation", ("registration: segmentation", "registration: segmentation scores", "registration: brain mask")),
    ("Jacobian", ("evaluation: Jacobian",)),
    ("PMM", ("evaluation: PMM",)),
    ("pictures' slices", ("evaluation: pictures' slices",)),
    ("metrics", ("evaluation: waiting for the fixed image's side", "evaluation: similarity",
                 "evaluation: waiting for the numbers before registration", "evaluation: Dice and HD95",
                 "evaluation: own segmentations")),
    ("pictures (waited for)", ("writing: pictures", "writing: overview")),
    ("writing NIfTI (waited for)", ("writing: waiting for the files", "writing: metrics")),
)
"""The columns of the step table: each a group of named steps (`timing`), in the order they run. The pictures'
slices are cut in the run's process; the pictures are drawn from them beside the metrics by a child process on Linux
(`worker.beside`): their column is what the run waited for after."""
BACKGROUND = ("writing: images", "writing: displacement field", "writing: maps")
"""Steps run on the worker's background thread, overlapping the evaluation and the pictures."""
BESIDE = {"fixed side and before registration (beside)": ("evaluation: foreground", "evaluation: before registration")}
"""Steps on the evaluation's thread (`evaluation`): the fixed image's side and the numbers before registration, beside
the registration; what the run then waits for counts in the metrics column."""


def command(method: str, pair: PairSpec, out: Path, threads: int, pictures: bool, compress: bool = True) -> list[str]:
    """The ``jointregseg register`` command line of one run (``compress``: ``.nii.gz`` files, else ``.nii``)."""
    name, own = method_spec(method)
    inputs = [f"--{key.replace('_', '-')}={path}" for key, path in pair.files().items() if key in ("fixed", "moving", "fixed_seg", "moving_seg")]
    options = [f"--option={key}={json.dumps(value)}" for key, value in own.items()]
    return [sys.executable, "-m", "JointRegSegLib.cli", "register", *inputs, "--method", name, *options,
            "--threads", str(threads), "--out", str(out), *([] if pictures else ["--no-pictures"]),
            *([] if compress else ["--no-compress"])]


def uncompressed_pair(pair: PairSpec, folder: Path) -> PairSpec:
    """``pair`` with every ``.nii.gz`` file decompressed into ``folder`` as ``.nii`` (the same bytes as ``gunzip``)."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = {}
    for key, path in pair.files().items():
        if path.name.endswith(".nii.gz"):
            copy = folder / f"{key}.nii"
            with gzip.open(path, "rb") as source, copy.open("wb") as target:
                shutil.copyfileobj(source, target)
            copies[key] = copy
    return dataclasses.replace(pair, **copies)


def run_method(
    method: str, pair: PairSpec, folder: Path, threads: int, pictures: bool, source: Path, compress: bool = True
) -> dict[str, Any]:
    """One whole ``jointregseg register`` process of ``method`` from the checkout ``source``, started in ``folder``
    (not in a checkout: ``python -m`` would put that checkout first on ``sys.path``, ahead of ``PYTHONPATH``)."""
    out = folder / "result"
    shutil.rmtree(out, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**child_environment(threads), "PYTHONPATH": str(source)}
    load = os.getloadavg()
    done = spawn(command(method, pair, out, threads, pictures, compress), env, folder / "run.log")
    run: dict[str, Any] = {"wall_s": done.wall_s, "peak_rss_mb": done.peak_rss_mb, "load_before": load, "exit": done.returncode}
    if done.returncode != 0:
        run["error"] = (folder / "run.log").read_text(errors="replace")[-2000:]
        return run
    timings = json.loads((out / "provenance.json").read_text())["timings_s"]
    metrics = json.loads((out / "metrics.json").read_text())
    run.update({"timings": timings, "dice": metrics.get("dice_mean"), "seg_dice_moving": metrics.get("seg_dice_moving")})
    shutil.rmtree(out, ignore_errors=True)
    return run


def run_peer(peer: str, pair: PairSpec, folder: Path, threads: int) -> dict[str, Any]:
    """The peer's whole child process (as the benchmark runs it) on the pair."""
    folder.mkdir(parents=True, exist_ok=True)
    job = {"peer": peer, "fixed": str(pair.fixed), "moving": str(pair.moving), "out": str(folder / "result"),
           "preset": "default", "threads": threads, "seed": 0, "own_warped": False}
    (folder / "job.json").write_text(json.dumps(job, indent=2))
    load = os.getloadavg()
    done = spawn(peer_command(sys.executable, folder / "job.json"), child_environment(threads), folder / "peer.log")
    shutil.rmtree(folder / "result", ignore_errors=True)
    return {"wall_s": done.wall_s, "peak_rss_mb": done.peak_rss_mb, "load_before": load, "exit": done.returncode}


COARSE = ("start-up and exit", "reading", "registration", "evaluation", "writing")


def coarse_steps(run: dict[str, Any]) -> dict[str, float]:
    """The run's five parts (what every checkout records): start-up and exit (the process's wall time
    outside the job), reading, registration, evaluation, writing."""
    timings = run["timings"]
    job = {"reading": timings["load_s"], "registration": timings["register_s"], "evaluation": timings["evaluate_s"],
           "writing": timings["write_s"]}
    return {"start-up and exit": run["wall_s"] - sum(job.values()), **job}


def steps_of(run: dict[str, Any]) -> dict[str, float]:
    """The run's seconds per `GROUPS` column, ``registration, other``, ``other`` (the rest of its wall
    time: the interpreter's exit, the job's own bookkeeping), ``background writing`` and the `BESIDE` columns
    (overlapping)."""
    steps = run["timings"]["steps"]
    grouped = {title: sum(steps.get(name, 0.0) for name in names) for title, names in GROUPS}
    registration = [name for _, names in GROUPS for name in names if name.startswith("registration:")]
    grouped["registration, other"] = sum(v for k, v in steps.items() if k.startswith("registration:") and k not in registration)
    grouped["other"] = run["wall_s"] - sum(grouped.values())
    grouped["background writing"] = sum(steps.get(name, 0.0) for name in BACKGROUND)
    grouped.update({title: sum(steps.get(name, 0.0) for name in names) for title, names in BESIDE.items()})
    return grouped


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration ``repeats`` times, interleaved (see the module docstring)."""
    out = args.out.resolve()
    [pair] = resolve_pairs(args.pair, out / "pairs")
    pictures = not (args.no_pictures or args.as_module)
    if args.as_module:
        pair = uncompressed_pair(pair, out / "pairs" / "nii")
    sources = {"after": Path(__file__).resolve().parents[2]}
    if args.before is not None:
        sources = {"before": args.before.resolve(), **sources}
    methods = split_names(args.methods)
    runs: dict[str, Any] = {"settings": {"methods": methods, "peer": args.peer, "threads": args.threads, "repeats": args.repeats,
                                         "pictures": pictures, "as_module": bool(args.as_module), "pair": args.pair,
                                         "cpu_count": os.cpu_count(),
                                         "sources": {k: str(v) for k, v in sources.items()}},
                            "runs": []}
    for repeat in range(args.repeats):
        if args.peer:
            run = run_peer(args.peer, pair, out / "runs" / args.peer, args.threads)
            runs["runs"].append({"tool": args.peer, "source": "peer", "repeat": repeat, **run})
            print(f"{args.peer}: {run['wall_s']:.1f} s", file=sys.stderr)
        for method in methods:
            for label, source in sources.items():
                run = run_method(method, pair, out / "runs" / f"{label}_{method}", args.threads, pictures, source, not args.as_module)
                runs["runs"].append({"tool": method, "source": label, "repeat": repeat, **run})
                print(f"{method} ({label}): {run['wall_s']:.1f} s, {run['peak_rss_mb']:.0f} MB"
                      + (f", failed: {run.get('error', '')[-300:]}" if run["exit"] else ""), file=sys.stderr)
    (out / "call_profile.json").write_text(json.dumps(runs, indent=2) + "\n")
    (out / "call_profile.md").write_text(markdown(runs))
    return runs


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda run: run["wall_s"])
    return ordered[(len(ordered) - 1) // 2]


def markdown(results: dict[str, Any]) -> str:
    """The whole calls (before and after, against the peer) with their five parts, then the steps of each."""
    settings, runs = results["settings"], [run for run in results["runs"] if run["exit"] == 0]
    peer = [run for run in runs if run["source"] == "peer"]
    peer_wall = float(np.median([run["wall_s"] for run in peer])) if peer else float("nan")
    loads = [run["load_before"][0] for run in results["runs"]]
    as_module = settings.get("as_module", False)
    lines = [
        f"Whole `jointregseg register` processes on the `{settings['pair']}` pair, {settings['threads']} threads, "
        + ("as the Slicer module's job (.nii in and out, pictures off), " if as_module else
           f"pictures {'on' if settings['pictures'] else 'off'}, ")
        + f"{settings['repeats']} run(s) each, interleaved; "
        f"{settings['cpu_count']} CPUs, load average (1 min) before the runs {min(loads):.1f}-{max(loads):.1f}. "
        "Shares: of the run with the median wall time.",
        "",
        "| method | checkout | wall time (s) | job after start-up (s) | peak memory (MB) | Dice | wall / "
        + (settings["peer"] or "peer") + " | " + " | ".join(COARSE) + " |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(COARSE),
    ]
    chosen_runs = {}
    for method in settings["methods"]:
        for source in settings["sources"]:
            chosen = [run for run in runs if run["tool"] == method and run["source"] == source]
            if not chosen:
                continue
            median = chosen_runs[method, source] = _median_run(chosen)
            wall = float(np.median([run["wall_s"] for run in chosen]))
            parts = coarse_steps(median)
            dice = median.get("dice")
            jobs = [run["timings"]["total_s"] for run in chosen if "total_s" in run["timings"]]
            job = f"{np.median(jobs):.2f} ({min(jobs):.2f}-{max(jobs):.2f})" if jobs else "–"
            lines.append(
                f"| {method} | {source} | {wall:.1f} | {job} | {max(run['peak_rss_mb'] for run in chosen):.0f} | "
                f"{'–' if dice is None else f'{dice:.3f}'} | {f'{wall / peer_wall:.2f}' if peer else '–'} | "
                + " | ".join(f"{100 * parts[name] / median['wall_s']:.0f} %" for name in COARSE) + " |"
            )
    if peer:
        lines.append(f"| {settings['peer']} (peer) | – | {peer_wall:.1f} | – | {max(run['peak_rss_mb'] for run in peer):.0f} | – | 1.00 |"
                     + " |" * len(COARSE))
    titles = [title for title, _ in GROUPS] + ["registration, other", "other"]
    lines += ["", "Steps of this checkout's runs, in seconds (share of the wall time); the background writing "
              f"(NIfTI files, {'uncompressed' if as_module else 'compressed'}) overlaps the evaluation and the pictures, "
              "the evaluation's thread the registration:", "",
              "| method | wall (s) | " + " | ".join([*titles, "background writing", *BESIDE]) + " |",
              "|---|---:|" + "---:|" * (len(titles) + 1 + len(BESIDE))]
    for (method, source), median in chosen_runs.items():
        if source != "after":
            continue
        steps = steps_of(median)
        cells = [f"{steps[title]:.2f} ({100 * steps[title] / median['wall_s']:.0f} %)" for title in titles]
        lines.append(f"| {method} | {median['wall_s']:.1f} | " + " | ".join(cells)
                     + "".join(f" | {steps[title]:.2f}" for title in ("background writing", *BESIDE)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("call_profile"))
    parser.add_argument("--methods", default="uresnet,hof,jers,segreg[variant=learned]")
    parser.add_argument("--peer", default="demons", help="a bench peer run beside the methods ('' for none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--before", type=Path, help="another checkout of the project, run alternately with this one")
    parser.add_argument("--pair", default="shared", help="shared or sample")
    parser.add_argument("--no-pictures", action="store_true")
    parser.add_argument("--as-module", action="store_true", help="the Slicer module's job: .nii in and out, no pictures")
    args = parser.parse_args(argv)
    try:
        measure(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((args.out / "call_profile.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
