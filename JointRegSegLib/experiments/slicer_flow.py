"""What a user of the Slicer module waits for: from Apply to the results in the scene.

    python -m JointRegSegLib.experiments.slicer_flow --out slicer_flow \\
        [--methods "uresnet,hof,jers,segreg[variant=learned]"] [--repeats 2] [--threads 2] [--before DIR] [--pair shared|sample] [--think 5]

Each Apply runs in a process of its own, as a fresh Slicer session would: slicer-core's real MRML scene
(`mrml.core`) holding the pair's images and label maps, the module's `app.Controller` on it, whose
dependency check runs first; ``--think`` seconds later (the user choosing the inputs and the method)
Apply is pressed: the controller writes the input nodes to files, hands the job to a worker, and the
clock stops when the results (warped volume, transform, maps, segmentations, metrics table) are in the
scene. Recorded: Apply to results, the writing of the inputs (on Slicer's thread), the worker's start-up
and its job (provenance.json), and the rest (loading into the scene, the worker's exit, polling).

``--before DIR``: the same from another checkout (``PYTHONPATH=DIR``; its controller, export, worker and
loading), alternating with this checkout's run by run. This module runs as a script in the child, with
absolute imports, so the checkout on ``PYTHONPATH`` provides every part measured. Results:
``OUT/slicer_flow.json`` (every run) and ``OUT/slicer_flow.md`` (the table of medians). Needs slicer-core
(``trame-slicer[standalone]``) and, for ``--pair shared``, ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

COLUMNS = ("Apply to results", "writing the inputs", "worker start-up after Apply", "worker's job", "loading and the rest")


def child(method: str, options: dict[str, Any], files: dict[str, str], work: Path, think: float) -> dict[str, Any]:
    """One session: the scene, the controller, ``think`` seconds, Apply, the results loaded (module docstring)."""
    from JointRegSegLib import mrml
    from JointRegSegLib.app import Controller, RunRequest
    from JointRegSegLib.app.environment import library_root
    from JointRegSegLib.mrml.core import core_scene

    core = core_scene()
    nodes = {
        "fixed": mrml.read_volume(core.scene, Path(files["fixed"]), "fixed"),
        "moving": mrml.read_volume(core.scene, Path(files["moving"]), "moving"),
        "fixed_seg": mrml.read_volume(core.scene, Path(files["fixed_seg"]), "fixed labels", labels=True),
        "moving_seg": mrml.read_volume(core.scene, Path(files["moving_seg"]), "moving labels", labels=True),
    }
    requirements = library_root() / "JointRegSeg" / "Resources" / "requirements.txt"
    controller = Controller(core.scene, sys.executable, work, requirements, app_logic=core.app_logic)
    try:
        controller.refresh_dependencies()
        controller.wait(300)
        time.sleep(think)
        pressed = time.monotonic()
        request = RunRequest(nodes["fixed"], nodes["moving"], nodes["fixed_seg"], nodes["moving_seg"], options=options)
        run = controller.start(request, [method])
        handed = time.monotonic()
        worker_started = process_started(run.process.pid)
        controller.wait(1800)
        done = time.monotonic()
        if run.error:
            return {"error": run.error}
        timings = json.loads((run.output / "provenance.json").read_text())["timings_s"]
        ready = worker_started + timings["startup_s"]  # a worker started ahead may be ready before Apply
        return {
            "Apply to results": done - pressed,
            "writing the inputs": handed - pressed,
            "worker start-up after Apply": max(0.0, ready - max(pressed, worker_started)),
            "worker's job": timings["total_s"],
            "dice": run.metrics.get("dice_mean"),
        }
    finally:
        controller.shutdown()


def process_started(pid: int) -> float:
    """When the process ``pid`` started, on time.monotonic's clock, from /proc (Linux). `timing.process_age` reads
    the same of this process; the child cannot use it: it runs on another checkout's library, maybe without it."""
    with open(f"/proc/{pid}/stat") as stat, open("/proc/uptime") as uptime:
        started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        age = float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - age


def run_session(method: str, files: dict[str, str], folder: Path, threads: int, think: float, source: Path) -> dict[str, Any]:
    """One child session of ``method`` (``name[key=value;...]``, `bench.runner.method_spec`) from the checkout ``source``."""
    from JointRegSegLib.bench.processes import child_environment
    from JointRegSegLib.bench.runner import method_spec

    folder.mkdir(parents=True, exist_ok=True)
    env = {**child_environment(threads), "PYTHONPATH": str(source)}
    load = os.getloadavg()
    name, options = method_spec(method)
    args = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--options", json.dumps(options), "--files", json.dumps(files),
            "--work", str(folder / "work"), "--think", str(think)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout)[-2000:], "load_before": load}
    record = json.loads(lines[-1])
    if "error" not in record:
        record["loading and the rest"] = record["Apply to results"] - record["writing the inputs"] - record["worker's job"] - record["worker start-up after Apply"]
    record["load_before"] = load
    return record


def table(runs: list[dict[str, Any]]) -> str:
    """Medians per method and checkout."""
    import numpy as np

    lines = ["| method | checkout | " + " | ".join(f"{c} (s)" for c in COLUMNS) + " | runs |", "|---|---|" + "---:|" * (len(COLUMNS) + 1)]
    keys = sorted({(r["method"], r["checkout"]) for r in runs}, key=lambda k: (k[0], k[1] != "before"))
    for method, checkout in keys:
        done = [r for r in runs if (r["method"], r["checkout"]) == (method, checkout) and "error" not in r]
        if not done:
            lines.append(f"| {method} | {checkout} | failed |" + " |" * len(COLUMNS))
            continue
        medians = [float(np.median([r[c] for r in done])) for c in COLUMNS]
        each = ", ".join(f"{r['Apply to results']:.1f}" for r in done)
        lines.append(f"| {method} | {checkout} | " + " | ".join(f"{m:.2f}" for m in medians) + f" | {each} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--methods", default="uresnet,hof,jers")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", type=Path, help="another checkout to measure alternately (PYTHONPATH)")
    parser.add_argument("--pair", default="shared", choices=("shared", "sample"))
    parser.add_argument("--think", type=float, default=5.0, help="seconds between the dependency check and Apply")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.options), json.loads(args.files), args.work, args.think)), flush=True)
        return 0
    if args.out is None:
        parser.error("--out is required")

    from JointRegSegLib.bench.pairs import resolve_pairs
    from JointRegSegLib.bench.command import split_names
    from JointRegSegLib.bench.runner import folder_name
    from JointRegSegLib.errors import InputError

    try:
        pair = resolve_pairs(args.pair, args.out)[0]
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    files = {key: str(path) for key, path in pair.files().items() if key in ("fixed", "moving", "fixed_seg", "moving_seg")}
    this = Path(__file__).resolve().parents[2]
    checkouts = [("before", args.before.resolve()), ("after", this)] if args.before else [("this", this)]
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for method in split_names(args.methods):
            for name, source in checkouts:
                folder = args.out / f"{folder_name(method)}-{name}-{repeat}"
                record = run_session(method, files, folder, args.threads, args.think, source)
                record.update(method=method, checkout=name, repeat=repeat)
                runs.append(record)
                shown = record.get("error") or f"{record['Apply to results']:.1f} s"
                print(f"{method} ({name}, run {repeat + 1}): {shown}", flush=True)
    (args.out / "slicer_flow.json").write_text(json.dumps(runs, indent=2))
    text = table(runs)
    (args.out / "slicer_flow.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
