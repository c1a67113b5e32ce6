"""The background worker end to end: event stream, outputs, SimpleITK agreement, cancel, bad inputs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_worker

from JointRegSegLib.imageio import read_image, read_labels
from JointRegSegLib.metrics import mean_dice
from JointRegSegLib.worker.events import EventWriter

FAST = {"iterations": 4}  # no time budget: on a busy machine a budget would cut the run short and change its work


def _job(pair: dict[str, Path], out: Path, **extra) -> dict:
    job = {"method": "tto", "output": str(out), **{k: str(v) for k, v in pair.items()}, **FAST, "pictures": False}
    job.update(extra)
    return job


def _digest(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, sample_pair):
    tmp = tmp_path_factory.mktemp("worker")
    before = _digest(sample_pair.values())
    code, events, stderr = run_worker(_job(sample_pair, tmp / "out", pictures=True), tmp)
    assert code == 0, (events, stderr[-3000:])
    assert _digest(sample_pair.values()) == before, "the worker modified its inputs"
    return tmp / "out", events


def test_event_stream_and_result_files(finished_run):
    out, events = finished_run
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "result" and "error" not in kinds
    result = events[-1]
    assert Path(result["output"]) == out.resolve()
    for kind in ("warped", "displacement", "jacobian", "pmm", "metrics", "provenance", "warped_seg", "picture_checkerboard"):
        assert Path(result["files"][kind]).is_file(), kind
    manifest = json.loads((out / "result.json").read_text())
    assert set(manifest) == set(result["files"])
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["method"] == "tto" and provenance["seed"] == 0
    assert all(len(sha) == 64 for sha in provenance["weights_sha256"].values()) and provenance["weights_sha256"]
    assert {"torch", "SimpleITK", "monai"} <= set(provenance["versions"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.partial")]


def test_provenance_times_every_step_within_the_run(finished_run):
    """Named steps (`JointRegSegLib.timing`): the method's own add up to its registration time, the
    ones on the run's own thread fit in its total, the background writing and the numbers before registration
    (beside the maps) are there too."""
    out, _ = finished_run
    timings = json.loads((out / "provenance.json").read_text())["timings_s"]
    steps = timings["steps"]
    for name in ("start-up", "reading", "registration: network grid", "registration: warping", "evaluation: Jacobian",
                 "evaluation: PMM", "evaluation: Dice and HD95", "evaluation: pictures' slices", "writing: pictures", "writing: images",
                 "writing: displacement field", "writing: maps", "writing: waiting for the files"):
        assert steps[name] >= 0.0, name
    registration = sum(v for k, v in steps.items() if k.startswith("registration:"))
    assert registration == pytest.approx(timings["register_s"], rel=1e-6)
    background = ("writing: images", "writing: displacement field", "writing: maps", "evaluation: before registration")
    own_thread = sum(v for k, v in steps.items() if k not in background and k != "start-up")
    assert own_thread <= timings["total_s"] + 0.05
    assert set(timings["cpu_steps"]) <= set(steps)


def test_uncompressed_outputs_on_request(tmp_path, sample_pair, finished_run):
    """``compress: false`` writes .nii files (the same kinds), which SimpleITK reads; the warped image and label map
    are larger than their .nii.gz (float fields and maps may hardly compress: those .nii.gz are stored, as large)."""
    import SimpleITK as sitk

    out = tmp_path / "plain"
    code, events, stderr = run_worker(_job(sample_pair, out, compress=False), tmp_path)
    assert code == 0, stderr[-3000:]
    files = events[-1]["files"]
    compressed, _ = finished_run
    for kind in ("warped", "displacement", "jacobian", "pmm", "warped_seg"):
        path = Path(files[kind])
        assert path.name.endswith(".nii") and path.is_file(), kind
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == sitk.ReadImage(str(compressed / f"{path.name}.gz")).GetSize()
        if kind in ("warped", "warped_seg"):
            assert path.stat().st_size > (compressed / f"{path.name}.gz").stat().st_size, kind
    assert not list(out.glob("*.nii.gz"))


def test_pictures_drawn_by_the_child_equal_those_drawn_in_the_run(tmp_path, sample_pair, monkeypatch):
    """The pictures' slices pickled to the child that draws them (`worker.beside`, forked before the run) give the
    same pixels as drawing them in the run's own process (where fork is missing)."""
    from PIL import Image

    from JointRegSegLib.worker import beside
    from JointRegSegLib.worker.job import job_from_dict
    from JointRegSegLib.worker.pictures import warm_up
    from JointRegSegLib.worker.run import run_job

    pictures = {}
    for where in ("child", "here"):
        if where == "here":
            monkeypatch.setattr(beside, "can_fork", lambda: False)
        painter = beside.ForkedChild(warm_up)
        assert (painter._pid is not None) == (where == "child")
        try:
            job = job_from_dict(_job(sample_pair, tmp_path / where, pictures=True, threads=1), source="test")
            files = run_job(job, EventWriter(io.StringIO()), painter=painter)["files"]
        finally:
            painter.close()
        pictures[where] = {k: np.asarray(Image.open(v)) for k, v in files.items() if k.startswith("picture_")}
    assert set(pictures["child"]) == set(pictures["here"]) >= {"picture_fixed", "picture_jacobian", "picture_warped_seg"}
    for name, pixels in pictures["child"].items():
        np.testing.assert_array_equal(pixels, pictures["here"][name], err_msg=name)


def test_progress_is_monotonic_and_time_left_is_shown(finished_run):
    """The real run's stream: fractions from 0 to 1 never going back, an estimate during the run, 0 at the end, and in
    the second half never above the time already spent (true of ``t (1 - f) / f`` on any machine). How close the
    estimate comes to the time that really remained depends on how the machine's load changes during the run, so
    it is tested on a simulated clock below, not here."""
    _, events = finished_run
    progress = [e for e in events if e["event"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert len(progress) >= FAST["iterations"]
    assert progress[-1]["seconds_left"] == 0.0
    assert any(e["seconds_left"] is not None for e in progress if 0.0 < e["fraction"] < 1.0)
    assert all(e["seconds_left"] <= e["elapsed"] + 0.1 for e in progress if e["fraction"] >= 0.5 and e["seconds_left"] is not None)


class _Clock:
    """Simulated time, so the estimate is tested on its behaviour, not on this machine's speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _estimates(steps: list[tuple[float, float]]) -> list[tuple[float, float, float | None]]:
    """(elapsed, fraction, seconds left) after each (seconds taken, fraction reached) step."""
    clock = _Clock()
    writer = EventWriter(io.StringIO(), clock=clock)
    out = []
    for seconds, fraction in steps:
        clock.now += seconds
        writer.progress(fraction, "work")
        out.append((clock.now, fraction, json.loads(writer.stream.getvalue().splitlines()[-1])["seconds_left"]))
    return out


def test_time_left_leaves_out_the_start_up_before_the_first_event():
    """The worker's imports (before its first event, at fraction 0) are no part of the work: 10 s of them,
    then a steady 1 % a second, and the estimate is exact."""
    clock = _Clock()
    writer = EventWriter(io.StringIO(), clock=clock)
    clock.now = 10.0
    writer.progress(0.0, "reading inputs")
    for k in range(1, 100):
        clock.now += 1.0
        writer.progress(k / 100, "work")
        event = json.loads(writer.stream.getvalue().splitlines()[-1])
        if k >= 2:
            assert event["seconds_left"] == pytest.approx(100 - k, abs=0.06) and event["elapsed"] == pytest.approx(10 + k)


def test_time_left_is_exact_for_a_steady_rate_and_bounded_after_a_stall():
    steady = _estimates([(1.0, k / 100) for k in range(1, 101)])  # 100 s, 1 % per second
    assert all(left == pytest.approx(100.0 - t, abs=0.06) for t, f, left in steady if t >= 1.0 and f < 1.0)
    assert steady[-1][2] == 0.0

    # A stage that takes 10 times longer than its share of the bar promised (a busy machine) after a fast start:
    # the estimate grows with the evidence but never jumps, and in the second half never exceeds the time spent.
    uneven = _estimates([(0.2, k / 100) for k in range(1, 41)] + [(2.0, k / 100) for k in range(41, 101)])
    lefts = [(t, f, left) for t, f, left in uneven if left is not None]
    assert all(left <= t + 1e-6 for t, f, left in lefts if f >= 0.5)
    true_left = {f: uneven[-1][0] - t for t, f, _ in uneven}
    errors = [abs(left - true_left[f]) for t, f, left in lefts]
    assert errors[-1] == 0.0 and max(errors[-10:]) < max(errors[len(errors) // 2 : len(errors) // 2 + 10])

    # Nothing to go on yet: no estimate before 1 % and a second; fractions never go backwards.
    early = _estimates([(0.5, 0.005), (0.2, 0.3), (1.0, 0.2)])
    assert [left for _, _, left in early[:2]] == [None, None] and early[2][2] == pytest.approx(1.7 * 0.7 / 0.3, abs=0.06)


def test_simpleitk_reproduces_warped_image_and_dice_improves(finished_run, sample_pair):
    out, events = finished_run
    moving = sitk.ReadImage(str(sample_pair["moving"]), sitk.sitkFloat32)
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    fixed_ref = sitk.ReadImage(str(sample_pair["fixed"]))
    resampled = sitk.Resample(moving, fixed_ref, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0)
    ours = sitk.ReadImage(str(out / "warped.nii.gz"), sitk.sitkFloat32)
    difference = np.abs(sitk.GetArrayFromImage(resampled) - sitk.GetArrayFromImage(ours))
    assert np.percentile(difference, 99.9) < 0.5 and difference.mean() < 0.05  # 8-bit intensities, 0-255

    metrics = events[-1]["metrics"]
    fixed_seg = read_labels(sample_pair["fixed_seg"]).array
    warped_seg = read_labels(out / "warped_seg.nii.gz").array
    labels = [int(k) for k in metrics["labels"]]
    assert metrics["dice_mean"] > metrics["dice_mean_initial"]
    assert mean_dice(fixed_seg, warped_seg, labels=labels) > metrics["dice_mean_initial"]
    assert read_image(out / "jacobian.nii.gz").geometry.same_as(read_image(sample_pair["fixed"]).geometry)


def test_jacobian_map_is_of_the_deformable_part_unless_the_whole_mapping_is_asked(tmp_path, sample_pair):
    """The same run twice (same seed, no time budget): by default jacobian.nii.gz is the deformable part's det J,
    with ``jacobian: whole`` the whole mapping's; their ratio is the written affine's determinant (read by
    SimpleITK from affine.tfm) wherever the map is defined, and provenance.json says which map was written."""
    cheap = {"iterations": 1, "time_budget": None, "options": {"spacing": 4, "affine_iterations": [15, 6, 3], "refine": False}}
    maps, parts = {}, {}
    for part in ("deformable", "whole"):
        out = tmp_path / part
        code, events, stderr = run_worker(_job(sample_pair, out, jacobian=part, **cheap), tmp_path)
        assert code == 0, (events, stderr[-3000:])
        maps[part] = read_image(out / "jacobian.nii.gz").array
        parts[part] = json.loads((out / "provenance.json").read_text())["jacobian_part"]
    assert parts == {"deformable": "deformable part", "whole": "whole mapping"}
    affine = sitk.AffineTransform(sitk.ReadTransform(str(tmp_path / "whole" / "affine.tfm")))
    scaling = np.linalg.det(np.asarray(affine.GetMatrix()).reshape(3, 3))
    assert abs(scaling - 1.0) > 1e-3, "the sample pair's affine should scale (else the two maps cannot differ)"
    defined = np.isfinite(maps["whole"]) & np.isfinite(maps["deformable"])
    assert defined.mean() > 0.1
    np.testing.assert_allclose(maps["whole"][defined], maps["deformable"][defined] * scaling, rtol=1e-4, atol=1e-5)


def test_a_time_budget_that_cuts_the_optimisation_is_reported(tmp_path, sample_pair):
    """tto with a budget of 1 ms, spent before the first optimisation step (the affine stage and the network run
    first): the log and metrics.json say the budget cut it short."""
    job = _job(
        sample_pair, tmp_path / "out", time_budget=0.001, options={"spacing": 4, "affine_iterations": [15, 6, 3]}
    )
    code, events, stderr = run_worker(job, tmp_path)
    assert code == 0, (events, stderr[-3000:])
    warnings = [e["message"] for e in events if e["event"] == "log" and e.get("level") == "warning"]
    assert any("time budget of 0.001 s cut the optimisation short" in w for w in warnings), warnings
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(metrics["messages"]) == 1 and "run without a time budget" in metrics["messages"][0]


def _start(job: dict, tmp: Path) -> subprocess.Popen:
    job_file = tmp / "job.json"
    job_file.write_text(json.dumps(job))
    return subprocess.Popen([sys.executable, "-m", "JointRegSegLib.worker", str(job_file)], stdout=subprocess.PIPE, text=True)


def _wait_for_stage(proc: subprocess.Popen, fraction: float) -> None:
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["fraction"] >= fraction:
            return
    raise AssertionError("the worker ended before the expected progress")


def _waiting_worker(cwd: Path) -> tuple[subprocess.Popen, dict]:
    """``python -m JointRegSegLib.worker --wait`` and its ``ready`` event."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "JointRegSegLib.worker", "--wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd
    )
    ready = json.loads(proc.stdout.readline())
    assert ready["event"] == "ready", ready
    return proc, ready


def test_a_worker_started_ahead_runs_the_job_it_is_given_later(tmp_path, sample_pair, finished_run):
    """``--wait``: ready after its imports, idle until a job's path comes on stdin, then the run a worker started
    with the job makes (the same warped image); its start-up is the imports' time and its clock starts with the job."""
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(_job(sample_pair, tmp_path / "out")))
    proc, ready = _waiting_worker(tmp_path)
    time.sleep(2.0)  # the user chooses the inputs
    sent = time.monotonic()
    proc.stdin.write(f"{job_file}\n")
    proc.stdin.close()
    events = [json.loads(line) for line in proc.stdout]
    assert proc.wait(timeout=300) == 0 and events[-1]["event"] == "result", events[-3:]
    took = time.monotonic() - sent
    assert all(e["elapsed"] <= took for e in events if e["event"] == "progress"), "elapsed must count from the job"
    timings = json.loads((tmp_path / "out" / "provenance.json").read_text())["timings_s"]
    assert timings["startup_s"] == pytest.approx(ready["startup_s"])
    reference, _ = finished_run
    warped, expected = (sitk.GetArrayFromImage(sitk.ReadImage(str(f / "warped.nii.gz"))) for f in (tmp_path / "out", reference))
    np.testing.assert_allclose(warped, expected, atol=1e-4 * float(np.abs(expected).max()))


@pytest.mark.parametrize("ending", ["stdin closed", "SIGTERM"])
def test_a_worker_started_ahead_without_a_job_ends_and_writes_nothing(tmp_path, ending):
    proc, _ = _waiting_worker(tmp_path)
    if ending == "stdin closed":
        proc.stdin.close()
    else:
        proc.send_signal(signal.SIGTERM)
    rest = [json.loads(line) for line in proc.stdout]
    assert proc.wait(timeout=60) == (0 if ending == "stdin closed" else 143)
    assert [e["event"] for e in rest] == ([] if ending == "stdin closed" else ["error"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_kill_leaves_no_partial_output_and_inputs_intact(tmp_path, sample_pair, sig):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pair = {k: Path(shutil.copy(v, inputs)) for k, v in sample_pair.items()}
    before = _digest(pair.values())
    results = tmp_path / "results"
    results.mkdir()
    proc = _start(_job(pair, results / "run", iterations=500, time_budget=120), tmp_path)
    _wait_for_stage(proc, 0.1)
    assert any(results.iterdir()), "the worker should be writing into a staging folder by now"
    sent = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=10)
    if sig == signal.SIGTERM:
        assert time.monotonic() - sent < 2.0
        assert proc.returncode != 0
    deadline = time.monotonic() + 15  # the janitor process cleans up after a SIGKILL; a busy machine may delay it
    while any(results.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(results.iterdir()) == [], "a partial output folder remained"
    assert _digest(pair.values()) == before


def _error_of(tmp_path: Path, job: dict, env: dict | None = None) -> str:
    code, events, stderr = run_worker(job, tmp_path, env=env, timeout=120)
    assert code != 0, events
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and "\n" not in errors[0]["message"], (events, stderr[-2000:])
    assert events[-1]["event"] == "error"
    return errors[0]["message"]


def _weights_copy(tmp_path: Path) -> Path:
    from JointRegSegLib.weights import weights_dir

    folder = tmp_path / "weights"
    shutil.copytree(weights_dir(), folder, ignore=shutil.ignore_patterns("*.png", "*.csv"))
    return folder


def test_bad_inputs_give_one_line_errors(tmp_path, sample_pair):
    out = str(tmp_path / "out")
    job = _job(sample_pair, tmp_path / "out")
    assert "is missing" in _error_of(tmp_path, {**job, "moving": str(tmp_path / "nope.nii.gz")})
    four_d = tmp_path / "4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(sample_pair["fixed"]))] * 2), str(four_d))
    assert "4 dimensions" in _error_of(tmp_path, {**job, "fixed": str(four_d)})
    assert "unknown method" in _error_of(tmp_path, {**job, "method": "magic"})
    assert "unknown device" in _error_of(tmp_path, {**job, "device": "tpu"})
    if not __import__("torch").cuda.is_available():
        assert "sees no CUDA GPU" in _error_of(tmp_path, {**job, "device": "cuda"})
    assert "cannot write results" in _error_of(tmp_path, {**job, "output": "/proc/jointregseg-out"})
    assert "wrong type" in _error_of(tmp_path, {**job, "iterations": "many"})
    job_file = tmp_path / "broken.json"
    job_file.write_text('{"method": "tto", "output": ')
    proc = subprocess.run([sys.executable, "-m", "JointRegSegLib.worker", str(job_file)], capture_output=True, text=True)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode != 0 and events[-1]["event"] == "error" and "not valid JSON" in events[-1]["message"]
    assert not os.path.exists(out)


def test_corrupted_or_mismatched_weights_are_refused(tmp_path, sample_pair):
    job = _job(sample_pair, tmp_path / "out")
    folder = _weights_copy(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    student = folder / manifest["tto_student"]["file"]
    student.write_bytes(student.read_bytes()[: student.stat().st_size // 2])
    assert "checksum" in _error_of(tmp_path, job, env={"JRS_WEIGHTS_DIR": str(folder)})
    manifest["tto_student"]["sha256"] = hashlib.sha256(student.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "cannot be read" in _error_of(tmp_path, job, env={"JRS_WEIGHTS_DIR": str(folder)})
    assert not (tmp_path / "out").exists()
