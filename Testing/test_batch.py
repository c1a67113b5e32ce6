"""``jointregseg batch``: a cohort on Dask, resumable, one summary.

Three tiny pairs made from the bundled sample pair (4 mm and 3 mm grids, one with the roles
swapped) and one broken pair (a truncated moving image) run through the real command line:

- on a two-worker `LocalCluster`: three results, one failure row with the worker's message, exit
  code 1; a rerun does no work (so it needs no cluster: it is pointed at an address where no
  scheduler listens) and keeps every file; a rerun after one input changed redoes that pair only;
- on a scheduler and two workers started separately (``dask scheduler`` + ``dask worker`` on
  127.0.0.1): the same summary; GPU tasks there are refused clearly, as no worker offers a GPU;
- Ctrl-C stops cleanly: exit code 130, no partial or hidden folder, no process left behind.

Registrations are short (tto without its test-time optimisation, a 4 mm network grid, a short
affine stage) and run on one thread each so that both clusters compute the same numbers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed", reason="jointregseg batch needs Dask (pip install -e '.[test]' on Python 3.10+)")
import psutil  # a dependency of Dask's distributed
from conftest import sigint_as_in_a_terminal

from JointRegSegLib.batch.pairlist import cohort_pairs
from JointRegSegLib.batch.resume import Checksums, foreign_files
from JointRegSegLib.batch.runner import BatchSettings, plan_task
from JointRegSegLib.bench.pairs import read_pair_list
from JointRegSegLib.bench.runner import folder_name
from JointRegSegLib.errors import InputError
from JointRegSegLib.imageio import Geometry, read_image, read_labels, resample, write_volume

METHOD = "tto[spacing=4;affine_iterations=[15,6,3];tto=false]"
FOLDER = folder_name(METHOD)
FAST = ["--methods", METHOD, "--threads", "1", "--no-pictures"]
TIME_COLUMNS = {"time_s", "process_s", "peak_rss_mb", "time_load_s", "time_register_s", "output", "log"}
BATCH_TIMEOUT_S = 900


def _grid(geometry: Geometry, spacing: float) -> Geometry:
    extent = (np.asarray(geometry.shape) - 1) * np.asarray(geometry.spacing)
    shape = tuple(int(n) for n in np.floor(extent / spacing) + 1)
    return Geometry(shape, (spacing,) * 3, geometry.origin, geometry.direction)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, sample_pair) -> Path:
    """pairs.csv (with an ``id`` column) naming pairs a, b (roles swapped), c (3 mm) and broken."""
    folder = tmp_path_factory.mktemp("cohort")
    images = {"fixed": read_image(sample_pair["fixed"]), "moving": read_image(sample_pair["moving"])}
    labels = {"fixed": read_labels(sample_pair["fixed_seg"]), "moving": read_labels(sample_pair["moving_seg"])}
    for name, (fixed, moving, spacing) in {"a": ("fixed", "moving", 4.0), "b": ("moving", "fixed", 4.0), "c": ("fixed", "moving", 3.0)}.items():
        for role, source in (("fixed", fixed), ("moving", moving)):
            grid = _grid(images[source].geometry, spacing)
            write_volume(resample(images[source], grid), folder / f"{name}_{role}.nii.gz")
            write_volume(resample(labels[source], grid, "nearest"), folder / f"{name}_{role}_seg.nii.gz")
    whole = (folder / "a_moving.nii.gz").read_bytes()
    (folder / "broken_moving.nii.gz").write_bytes(whole[: len(whole) // 2])
    rows = [f"{n},{n}_fixed.nii.gz,{n}_fixed_seg.nii.gz,{n}_moving.nii.gz,{n}_moving_seg.nii.gz" for n in "abc"]
    (folder / "pairs.csv").write_text("\n".join(["id,fixed,fixed_seg,moving,moving_seg", *rows, "broken,a_fixed.nii.gz,,broken_moving.nii.gz,"]) + "\n")
    return folder / "pairs.csv"


def batch(*args: str, timeout: float = BATCH_TIMEOUT_S) -> tuple[int, str]:
    """Run ``jointregseg batch ARGS``; returns the exit code and the output."""
    done = subprocess.run(
        [sys.executable, "-m", "JointRegSegLib.cli", "batch", *args], capture_output=True, text=True, timeout=timeout
    )
    return done.returncode, done.stdout + done.stderr


def summary(out: Path, name: str = "summary.csv") -> dict[str, dict[str, str]]:
    with (out / name).open(newline="") as stream:
        return {row["id"]: row for row in csv.DictReader(stream)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(out: Path, pairs: list[str]) -> dict[str, tuple[str, int]]:
    """Content and modification time of every file in the given pairs' folders."""
    return {
        str(path.relative_to(out)): (sha256(path), path.stat().st_mtime_ns)
        for pair in pairs for path in sorted((out / pair).rglob("*")) if path.is_file()
    }


def hidden(out: Path) -> list[str]:
    """Hidden files and folders a batch could leave (staging, run and old folders), lock and stop files aside."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p.name not in (".batch.lock", ".stop"))


@pytest.fixture(scope="module")
def local_run(cohort, tmp_path_factory) -> tuple[Path, int, str]:
    """The cohort on a two-worker LocalCluster."""
    out = tmp_path_factory.mktemp("local") / "batch"
    code, log = batch(str(cohort), "--out", str(out), "--workers", "2", *FAST)
    return out, code, log


def test_local_cluster_gives_three_results_and_one_clear_failure(local_run, cohort):
    out, code, log = local_run
    assert code == 1, log[-3000:]
    rows = summary(out)
    assert list(rows) == ["a", "b", "c", "broken"]
    for pair in "abc":
        row = rows[pair]
        assert row["status"] == "done" and row["attempts"] == "1" and row["error"] == "", row
        result = Path(row["output"])
        assert result == out / pair / FOLDER
        metrics = json.loads((result / "metrics.json").read_text())
        assert float(row["dice_mean"]) == pytest.approx(metrics["dice_mean"], rel=1e-5)
        assert metrics["dice_mean"] > metrics["dice_mean_initial"] + 0.05, "registration did not raise Dice"
        provenance = json.loads((result / "provenance.json").read_text())
        expected = {key: sha256(cohort.parent / f"{pair}_{key}.nii.gz") for key in ("fixed", "moving", "fixed_seg", "moving_seg")}
        assert provenance["inputs_sha256"] == expected
        assert set(json.loads((result / "result.json").read_text()).values()) <= {p.name for p in result.iterdir()}
    broken = rows["broken"]
    assert broken["status"] == "failed" and broken["output"] == "" and broken["dice_mean"] == ""
    assert "broken_moving.nii.gz" in broken["error"] and "corrupt" in broken["error"]
    assert broken["attempts"] == "1", "a problem with the inputs is not retried"
    assert Path(broken["log"]).is_file()
    assert list(summary(out, "failures.csv")) == ["broken"]
    assert not (out / "broken" / FOLDER).exists()
    assert (out / "figures" / f"{FOLDER}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert hidden(out) == []


def test_separately_started_scheduler_gives_the_same_summary(local_run, cohort, tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)], **quiet
    )
    workers = []
    try:
        deadline = time.monotonic() + 180
        while not scheduler_file.is_file() and time.monotonic() < deadline:
            assert scheduler.poll() is None, "dask scheduler exited"
            time.sleep(0.5)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        workers = [
            subprocess.Popen([sys.executable, "-m", "dask", "worker", address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"], **quiet)
            for _ in range(2)
        ]
        out = tmp_path / "batch"
        code, log = batch(str(cohort), "--out", str(out), "--scheduler", address, *FAST)
        gpu_code, gpu_log = batch(str(cohort), "--out", str(tmp_path / "gpu"), "--scheduler", address, "--device", "cuda", *FAST)
    finally:
        for process in (*workers, scheduler):
            process.terminate()
        for process in (*workers, scheduler):
            process.wait(60)
    assert code == 1, log[-3000:]
    assert f"scheduler {address}: 2 worker(s)" in log
    assert gpu_code == 2 and "--resources GPU=1" in gpu_log, "GPU tasks need workers that offer a GPU"
    remote, local = summary(out), summary(local_run[0])
    assert list(remote) == list(local)
    for pair, row in remote.items():
        assert set(row) == set(local[pair])
        for column, value in row.items():
            if column in TIME_COLUMNS:
                continue
            if value and column.startswith(("dice", "hd95", "ncc", "mi", "nmi", "pmm", "folding", "sdlogj", "jacobian")):
                assert float(value) == pytest.approx(float(local[pair][column]), rel=1e-4, abs=1e-6), (pair, column)
            else:
                assert value == local[pair][column], (pair, column)


def test_rerun_does_no_work_and_a_changed_input_redoes_only_its_pair(local_run, cohort):
    out, _, _ = local_run
    before = snapshot(out, ["a", "b", "c", "broken"])
    # Nothing to run, so no cluster is needed: no scheduler listens at this address.
    code, log = batch(str(cohort), "--out", str(out), "--scheduler", "tcp://127.0.0.1:9", *FAST)
    assert code == 1, log[-3000:]
    rows = summary(out)
    assert {pair: rows[pair]["status"] for pair in rows} == {"a": "kept", "b": "kept", "c": "kept", "broken": "failed earlier"}
    assert all(row["attempts"] == "0" for row in rows.values())
    assert "corrupt" in rows["broken"]["error"] and list(summary(out, "failures.csv")) == ["broken"]
    assert snapshot(out, ["a", "b", "c", "broken"]) == before, "a rerun changed files"

    moving = cohort.parent / "b_moving.nii.gz"
    original = moving.read_bytes()
    image = read_image(moving)
    try:
        write_volume(image.with_array(np.asarray(image.array) * 0.8), moving)
        code, log = batch(str(cohort), "--out", str(out), "--workers", "2", *FAST)
        assert code == 1, log[-3000:]
        rows = summary(out)
        assert {pair: rows[pair]["status"] for pair in rows} == {"a": "kept", "b": "done", "c": "kept", "broken": "failed earlier"}
        assert snapshot(out, ["a", "c", "broken"]) == {k: v for k, v in before.items() if not k.startswith("b/")}
        provenance = json.loads((out / "b" / FOLDER / "provenance.json").read_text())
        assert provenance["inputs_sha256"]["moving"] == sha256(moving) != hashlib.sha256(original).hexdigest()
        assert hidden(out) == []
    finally:
        moving.write_bytes(original)


def test_plan_refuses_foreign_files_and_missing_inputs_and_redoes_incomplete_results(local_run, cohort, tmp_path):
    out, _, _ = local_run
    settings = BatchSettings(methods=[METHOD], threads=1, pictures=False)
    pairs = {pair.name: pair for pair in read_pair_list(cohort)}
    copy = tmp_path / "copy"
    for pair in "ac":
        (copy / pair / FOLDER).mkdir(parents=True)
        for path in (out / pair / FOLDER).iterdir():
            (copy / pair / FOLDER / path.name).write_bytes(path.read_bytes())
    checksums = Checksums()
    assert plan_task(pairs["a"], METHOD, settings, copy, checksums).status == "kept"
    (copy / "a" / FOLDER / "notes.txt").write_text("my notes")
    assert foreign_files(copy / "a" / FOLDER) == ["notes.txt"]
    assert plan_task(pairs["a"], METHOD, settings, copy, checksums).status == "kept", "a kept result may hold the user's files"
    (copy / "c" / FOLDER / "warped.nii.gz").unlink()
    assert plan_task(pairs["c"], METHOD, settings, copy, checksums).status == "run"
    (copy / "c" / FOLDER / "notes.txt").write_text("my notes")
    refused = plan_task(pairs["c"], METHOD, settings, copy, checksums)
    assert refused.status == "failed" and "notes.txt" in refused.error, "a result to be replaced holds the user's file"
    assert plan_task(pairs["c"], METHOD, BatchSettings(methods=[METHOD], threads=1, pictures=False, seed=1), out, checksums).status == "run"
    (cohort.parent / "missing.csv").write_text("id,fixed,moving\nm,a_fixed.nii.gz,nowhere.nii.gz\n")
    missing = cohort_pairs(cohort.parent / "missing.csv")[0]
    planned = plan_task(missing, METHOD, settings, copy, checksums)
    assert planned.status == "failed" and "nowhere.nii.gz" in planned.error and "does not exist" in planned.error


def test_folder_form_pairs_every_image_with_its_label_map(tmp_path, sample_pair):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, key in (("sub-01", "moving"), ("sub-01_seg", "moving_seg"), ("sub 02", "fixed")):
        (folder / f"{name}.nii.gz").write_bytes(sample_pair[key].read_bytes())
    (folder / "notes.txt").write_text("not an image")
    pairs = {pair.name: pair for pair in cohort_pairs(folder)}
    assert set(pairs) == {"sub-01", "sub-02"}
    assert pairs["sub-01"].moving_seg == folder / "sub-01_seg.nii.gz" and pairs["sub-02"].moving_seg is None
    assert pairs["sub-01"].fixed.parent.name == "Atlas" and pairs["sub-01"].fixed_seg is not None
    own = cohort_pairs(folder, fixed=folder / "sub 02.nii.gz")
    assert [pair.name for pair in own] == ["sub-01"] and own[0].fixed == (folder / "sub 02.nii.gz").resolve()


def test_ctrl_c_stops_cleanly(cohort, tmp_path):
    out = tmp_path / "batch"
    long_tto = ["--methods", "tto[spacing=4;affine_iterations=[15,6,3]]", "--iterations", "100000", "--time-budget", "600"]
    process = subprocess.Popen(
        [sys.executable, "-m", "JointRegSegLib.cli", "batch", str(cohort), "--out", str(out), "--workers", "2", "--threads", "1", "--no-pictures", *long_tto],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*/.*.partial-*")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[0][-3000:]
            time.sleep(0.5)
        assert list(out.glob("*/.*.partial-*")), "no registration started"
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        log, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, log[-3000:]
    rows = summary(out)
    assert {row["status"] for row in rows.values()} == {"cancelled"}
    assert not [p for p in out.glob(f"*/{folder_name(long_tto[1])}")], "a cancelled pair left a result folder"
    deadline = time.monotonic() + 30  # the worker's janitor processes linger for up to 5 s
    while time.monotonic() < deadline and _processes_mentioning(out):
        time.sleep(0.5)
    assert _processes_mentioning(out) == []
    assert hidden(out) == []


def _processes_mentioning(folder: Path) -> list[str]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if str(folder) in command:
            found.append(command)
    return found


def test_batch_command_line_rejects_bad_settings(tmp_path):
    for methods, message in ((["flirt"], "unknown method"), (["tto", "tto"], "names a method twice"), ([], "no method")):
        with pytest.raises(InputError, match=message):
            BatchSettings(methods=methods).check()
    with pytest.raises(InputError, match=r"^--seed must be a whole number from 0 to 4294967295; got -1\.$"):
        BatchSettings(seed=-1).check()
    with pytest.raises(InputError, match=r"^tto option 'mi_bins' must be a whole number from 2 to 256; got 1\.$"):
        BatchSettings(methods=["tto", "segreg[variant=learned]"], options={"mi_bins": 1}).check()
    with pytest.raises(InputError, match=r"^segreg option 'variant' must be one of 'iterative', 'learned'; got 'fast'\.$"):
        BatchSettings(methods=["segreg[variant=fast]"]).check()
    code, log = batch(str(tmp_path / "none.csv"), "--out", str(tmp_path / "o"))
    assert code == 2 and "none.csv" in log and "Traceback" not in log


def test_a_child_whose_starter_died_is_stopped(tmp_path):
    """A Dask worker process that dies must not leave its registration running unattended."""
    starter_code = (
        "import os, sys\nfrom pathlib import Path\nfrom JointRegSegLib.bench.processes import spawn\n"
        f"spawn([sys.executable, '-c', 'import time; time.sleep(600)'], dict(os.environ), Path({str(tmp_path / 'child.log')!r}))\n"
    )
    starter = subprocess.Popen([sys.executable, "-c", starter_code])
    try:
        deadline = time.monotonic() + 120
        children = []
        while not children and time.monotonic() < deadline:
            children = [p for p in psutil.Process(starter.pid).children(recursive=True) if "time.sleep(600)" in " ".join(p.cmdline())]
            time.sleep(0.2)
        assert children, "the child did not start"
    finally:
        starter.kill()
        starter.wait(30)
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, "the child outlived the process that started it"


def test_gpu_workers_see_their_gpu_and_run_one_task_per_gpu_at_a_time():
    """The local GPU cluster's placement, checked without a GPU: each worker's CUDA_VISIBLE_DEVICES
    and its GPU=1 resource, which keeps a second task waiting although the worker has two threads."""
    from distributed import Client

    from JointRegSegLib.batch.cluster import GPU, gpu_cluster

    def interval() -> tuple[float, float]:
        start = time.time()
        time.sleep(1.0)
        return start, time.time()

    cluster = gpu_cluster(["3"], threads_per_worker=2)
    try:
        with Client(cluster) as client:
            assert list(client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES")).values()) == ["3"]
            on_gpu = sorted(client.gather([client.submit(interval, pure=False, resources={GPU: 1}) for _ in range(2)]))
            free = sorted(client.gather([client.submit(interval, pure=False) for _ in range(2)]))
    finally:
        cluster.close()
    assert on_gpu[1][0] >= on_gpu[0][1], "two tasks ran on one GPU at once"
    assert free[1][0] < free[0][1], "without the resource the two threads run both tasks at once"
