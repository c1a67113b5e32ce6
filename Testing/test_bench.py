"""The benchmark: pair lists, the synthetic set, peer field conventions, the table, skipped peers.

One benchmark run on a tiny pair (the bundled sample pair resampled to about 4 mm, the fixed
image on an RAS-oriented grid and the moving image on another grid) with the cheapest settings
is shared by most tests. Peers run in $JRS_PEER_PYTHON when set (antspyx needs numpy < 2.4, so
it may live in its own environment), else in this Python; a peer that is not installed there is
reported as skipped, and its convention test is skipped too.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from JointRegSegLib.bench.pairs import (
    PairSpec,
    SyntheticOptions,
    make_synthetic_set,
    read_pair_list,
    shared_pair_list,
    write_pair_list,
)
from JointRegSegLib.bench.peers import OWN_WARPED_FILE, PEERS
from JointRegSegLib.bench.runner import (
    BEFORE,
    BenchSettings,
    end_point_error,
    folder_name,
    method_spec,
    peer_module_available,
    run_benchmark,
    run_peer,
    stage_pair,
)
from JointRegSegLib.bench.command import split_names
from JointRegSegLib.bench.table import RESULT_COLUMNS, markdown, time_ratios
from JointRegSegLib.errors import InputError
from JointRegSegLib.imageio import Geometry, Volume, read_image, read_labels, resample, to_sitk, write_volume
from JointRegSegLib.metrics import jacobian_determinant
from JointRegSegLib.spatial import read_displacement_field, warp_volume

PEER_PYTHON = os.environ.get("JRS_PEER_PYTHON", sys.executable)
THREADS = 2


def _grid(geometry: Geometry, spacing: float, direction: np.ndarray) -> Geometry:
    """A grid with ``spacing`` and ``direction`` about the same physical centre, covering the same box."""
    corners = geometry.index_to_physical(np.array(np.meshgrid(*[(0, n - 1) for n in geometry.shape])).reshape(3, -1).T)
    along = corners @ direction  # each corner's coordinates along the new grid's axes
    extent = along.max(axis=0) - along.min(axis=0)
    shape = tuple(int(n) for n in np.floor(extent / spacing) + 1)
    centre = geometry.index_to_physical((np.asarray(geometry.shape) - 1) / 2.0)
    origin = centre - direction @ (spacing * (np.asarray(shape) - 1) / 2.0)
    return Geometry(shape, (spacing,) * 3, origin, direction)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, sample_pair) -> PairSpec:
    """The sample pair at 4 mm (fixed, RAS-oriented grid) and 3.5 mm (moving, LPS-oriented grid)."""
    folder = tmp_path_factory.mktemp("tiny_pair")
    fixed, moving = read_image(sample_pair["fixed"]), read_image(sample_pair["moving"])
    fixed_grid = _grid(fixed.geometry, 4.0, np.diag([-1.0, -1.0, 1.0]))
    moving_grid = _grid(moving.geometry, 3.5, np.eye(3))
    volumes = {
        "fixed": resample(fixed, fixed_grid),
        "fixed_seg": resample(read_labels(sample_pair["fixed_seg"]), fixed_grid, "nearest"),
        "moving": resample(moving, moving_grid),
        "moving_seg": resample(read_labels(sample_pair["moving_seg"]), moving_grid, "nearest"),
    }
    for key, volume in volumes.items():
        write_volume(volume, folder / f"{key}.nii.gz")
    return PairSpec("tiny", **{key: folder / f"{key}.nii.gz" for key in volumes})


TTO = "tto[spacing=4;affine_iterations=[15,6,3];iterations=1;refine_iterations=[4,2]]"
SEGREG = "segreg[variant=learned;spacing=2]"


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_pair):
    """One benchmark run: tto (4 mm grid, short affine stage, one TTO step, few refinement steps), segreg's learned variant
    (2 mm) and every peer, fast settings; each method with its own options."""
    out = tmp_path_factory.mktemp("bench")
    settings = BenchSettings(
        methods=[TTO, SEGREG],
        peers=list(PEERS),
        threads=THREADS,
        preset="fast",
        peer_python=PEER_PYTHON,
        own_warped=True,
    )
    runs = run_benchmark([tiny_pair], settings, out, log=lambda text: None)
    return out, settings, runs


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


# ---------------------------------------------------------------- pair lists


def test_pair_list_round_trip_relative_paths_and_errors(tmp_path, tiny_pair):
    path = write_pair_list([tiny_pair], tmp_path / "lists" / "pairs.csv")
    assert read_pair_list(path) == [tiny_pair]
    (tmp_path / "lists" / "fixed.nii.gz").write_bytes(tiny_pair.fixed.read_bytes())
    (tmp_path / "lists" / "rel.csv").write_text(f"fixed,moving\nfixed.nii.gz,{tiny_pair.moving}\n")
    relative = read_pair_list(tmp_path / "lists" / "rel.csv")
    assert relative[0].fixed == (tmp_path / "lists" / "fixed.nii.gz").resolve() and relative[0].name == "pair1"
    (tmp_path / "bad.csv").write_text(f"fixed,moving,atlas\n{tiny_pair.fixed},{tiny_pair.moving},x\n")
    with pytest.raises(InputError, match="unknown column"):
        read_pair_list(tmp_path / "bad.csv")
    (tmp_path / "missing.csv").write_text(f"fixed,moving\n{tiny_pair.fixed},{tmp_path / 'nowhere.nii.gz'}\n")
    with pytest.raises(InputError, match="does not exist"):
        read_pair_list(tmp_path / "missing.csv")


def test_shared_pair_list(shared_data_dir):
    (pair,) = shared_pair_list(shared_data_dir)
    assert pair.fixed_seg.is_file() and pair.moving_seg.is_file()
    assert read_image(pair.fixed).geometry.shape == read_labels(pair.fixed_seg).geometry.shape


# ---------------------------------------------------------------- synthetic set and end-point error


def test_synthetic_pairs_match_simpleitk_and_are_diffeomorphic(tmp_path, tiny_pair):
    pairs = make_synthetic_set(tiny_pair.moving, tiny_pair.moving_seg, tmp_path, SyntheticOptions(count=2, seed=3))
    assert [p.name for p in read_pair_list(tmp_path / "pairs.csv")] == [p.name for p in pairs]
    moving = sitk.ReadImage(str(tiny_pair.moving), sitk.sitkFloat32)
    for pair in pairs:
        truth = read_displacement_field(pair.true_field)
        # SimpleITK's own displacement-field transform reproduces the fixed image from the moving one.
        transform = sitk.DisplacementFieldTransform(to_sitk(truth.with_array(truth.array.astype(np.float64))))
        expected = sitk.GetArrayFromImage(sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
        fixed = read_image(pair.fixed).array
        assert np.abs(fixed - expected).max() < 1e-3 * np.abs(expected).max()
        assert jacobian_determinant(truth).array.min() > 0.0
        magnitude = np.linalg.norm(truth.array, axis=-1)
        assert 0.5 < magnitude.mean() < 15.0
    first, second = (read_displacement_field(p.true_field).array for p in pairs)
    assert not np.allclose(first, second)


def test_end_point_error_of_constant_fields():
    grid = Geometry((6, 5, 4), (2.0, 1.0, 1.5), (3.0, -2.0, 1.0), np.diag([-1.0, -1.0, 1.0]))
    a = Volume(np.broadcast_to(np.float32([1.0, 2.0, 2.0]), (*grid.shape, 3)).copy(), grid)
    b = Volume(np.broadcast_to(np.float32([1.0, -1.0, -2.0]), (*grid.shape, 3)).copy(), grid)
    region = np.zeros(grid.shape, bool)
    region[1:3] = True
    assert end_point_error(a, b, region) == pytest.approx(5.0)
    assert end_point_error(a, a, region) == 0.0


# ---------------------------------------------------------------- the benchmark run


def test_tables_have_every_column_tool_and_file(bench):
    out, settings, runs = bench
    rows = _csv(out / "results.csv")
    assert list(rows[0]) == list(RESULT_COLUMNS)
    assert [row["tool"] for row in rows] == [BEFORE, TTO, SEGREG, *PEERS]
    for row in rows:
        assert row["status"] in {"ok", "skipped", "failed"}
        if row["status"] == "ok":
            assert 0.0 <= float(row["dice_mean"]) <= 1.0 and float(row["dice_label_count"]) == 30
        if row["status"] == "ok" and row["tool"] != BEFORE:
            assert float(row["time_s"]) > 0 and float(row["peak_rss_mb"]) > 50 and row["threads"] == str(THREADS)
            assert float(row["dice_mean_initial"]) == pytest.approx(float(rows[0]["dice_mean"]))
    assert float(rows[0]["folding_percent"]) == 0.0 and float(rows[0]["sdlogj"]) == pytest.approx(0.0, abs=1e-6)
    labels = _csv(out / "labels.csv")
    assert {row["tool"] for row in labels} == {run.tool for run in runs if run.status == "ok"}
    text = (out / "results.md").read_text()
    assert "| tool | Dice | HD95 (mm) |" in text and f"Threads: {THREADS}" in text
    for name in ("slices_tiny", "dice_per_label", "dice_vs_time"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 10_000


def test_registration_raises_dice_for_at_least_one_tool(bench):
    _, _, runs = bench
    done = [run for run in runs if run.status == "ok" and run.kind != "before"]
    assert done, [(run.tool, run.note) for run in runs]
    assert any(run.metrics["dice_mean"] > run.metrics["dice_mean_initial"] + 0.05 for run in done)


@pytest.mark.parametrize("peer", list(PEERS))
def test_peer_field_reproduces_the_tool_own_warped_image(bench, peer):
    """Our reading of each peer's field (warp_volume) gives the image the tool itself warped."""
    out, _, runs = bench
    (run,) = [run for run in runs if run.tool == peer]
    if run.status == "skipped":
        pytest.skip(run.note)
    assert run.status == "ok", run.note
    own = read_image(run.folder / OWN_WARPED_FILE)
    field = read_displacement_field(run.folder / "displacement.nii.gz")
    assert own.geometry.same_as(field.geometry)
    ours = warp_volume(read_image(out / "runs" / "tiny" / "inputs" / "moving.nii.gz"), field).array
    scale = float(np.abs(own.array).max())
    assert np.abs(ours - own.array).max() < 1e-3 * scale
    assert np.corrcoef(ours.ravel(), own.array.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("tool", [TTO, SEGREG])
def test_our_method_runs_through_the_worker_with_its_own_options(bench, tool):
    out, _, runs = bench
    (run,) = [run for run in runs if run.tool == tool]
    if run.status == "failed":
        assert "weights" in run.note, run.note
        return
    assert run.status == "ok"
    assert run.folder == out / "runs" / "tiny" / folder_name(tool) / "result"
    assert (run.folder / "provenance.json").is_file() and (run.folder / "warped.nii.gz").is_file()
    job = json.loads((run.folder.parent / "job0.json").read_text())
    method, options = method_spec(tool)
    assert (job["method"], job["iterations"]) == (method, options.pop("iterations", None))
    assert job["options"] == options
    ratios = [row for row in time_ratios(runs) if row["pair"] == "tiny" and row["method"] == tool]
    peers_done = [r for r in runs if r.kind == "peer" and r.status == "ok"]
    assert {row["peer"] for row in ratios} == {r.tool for r in peers_done}
    for row in ratios:
        peer = next(r for r in peers_done if r.tool == row["peer"])
        assert row["ratio"] == pytest.approx(run.time_s / peer.time_s)
        assert row["process_ratio"] == pytest.approx(run.process_s[0] / peer.process_s[0])


def test_peers_use_the_thread_count_given(bench):
    _, _, runs = bench
    for run in runs:
        if run.kind == "peer" and run.status == "ok":
            report = json.loads((run.folder / "peer.json").read_text())
            assert report["threads"] == THREADS and report["itk_threads"] == THREADS


def test_method_specs_split_on_top_level_commas_and_carry_their_options():
    names = split_names("tto, segreg[variant=learned;levels=[4,2]],segreg")
    assert names == ["tto", "segreg[variant=learned;levels=[4,2]]", "segreg"]
    assert method_spec(names[1]) == ("segreg", {"variant": "learned", "levels": [4, 2]})
    assert method_spec("tto") == ("tto", {})
    assert len({folder_name(name) for name in names}) == 3
    with pytest.raises(InputError, match="unclosed"):
        method_spec("segreg[variant=learned")
    with pytest.raises(InputError, match="unknown method"):
        BenchSettings(methods=["nosuch[variant=learned]"], peers=[]).check()


def test_missing_peer_is_skipped_with_the_install_command(tmp_path, tiny_pair, bench):
    """A Python without the peer packages: every peer but SimpleITK's is skipped, and the table says how to install it."""
    venv.create(tmp_path / "bare", with_pip=False)
    bare = str(tmp_path / "bare" / "bin" / "python")
    assert not peer_module_available(bare, "ants")
    inputs, staged = stage_pair(tiny_pair, tmp_path / "inputs")
    settings = BenchSettings(methods=[], peers=["ants-syn", "elastix"], peer_python=bare, preset="fast")
    runs = [
        run_peer(peer, tiny_pair, inputs, staged, None, np.ones(inputs.fixed.geometry.shape, bool), settings, tmp_path / peer)
        for peer in settings.peers
    ]
    assert [run.status for run in runs] == ["skipped", "skipped"]
    assert "pip install antspyx" in runs[0].note and "pip install itk-elastix" in runs[1].note
    _, _, done = bench
    text = markdown(done[:1] + runs, settings)
    assert "Not run:" in text and "pip install antspyx" in text


@pytest.mark.parametrize("count", [4, 11, 20])
def test_every_tool_of_a_run_gets_its_own_colour_and_before_registration_grey(count):
    # a run of every method and peer has 11 tools: tab10 gave two of them (tto and demons) the same blue
    from JointRegSegLib.bench.figures import tool_colours

    tools = [BEFORE, *(f"tool{i}" for i in range(count))]
    colours = tool_colours(tools)
    assert len({colours[tool] for tool in tools}) == count + 1
    assert colours[BEFORE][0] == colours[BEFORE][1] == colours[BEFORE][2]


def test_bench_command_line_rejects_unknown_tools(tmp_path):
    from JointRegSegLib.cli import main

    assert main(["bench", "--pairs", "sample", "--peers", "flirt", "--methods", "", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
