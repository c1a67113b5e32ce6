"""SegReg (seed 001): sliding regions, region planning, bad segmentations, the learned variant, the worker."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from JointRegSegLib.errors import InputError
from JointRegSegLib.imageio import write_volume
from JointRegSegLib.imageio.geometry import Geometry, Volume
from JointRegSegLib.losses import gradient_l2
from JointRegSegLib.methods import get_method
from JointRegSegLib.methods.base import Inputs, Options
from JointRegSegLib.methods.regions import coarse_class, codes_from_names, plan_regions
from JointRegSegLib.imageio.network_grid import network_geometry
from JointRegSegLib.methods.segreg import (
    Box,
    Settings,
    extend_field,
    field_at,
    field_on_fixed_grid,
    label_affine,
    masked_gradient_l2,
    prepare,
    unlabelled_to_nearest,
)
from JointRegSegLib.spatial import affine_to_displacement, warp
from JointRegSegLib.metrics import dice_per_label
from JointRegSegLib.weights import record_weights
from JointRegSegLib.worker.events import EventWriter
from JointRegSegLib.worker.job import parse_job
from JointRegSegLib.worker.run import run_job

SHIFT = 3  # voxels (1 mm), opposite along j for the two regions
FAST = {"affine": "none", "level_iterations": [30, 20], "fine_iterations": 20}
BORDER = 16  # region A is i < 16, region B is i >= 16


def _sliding_pair(shape=(32, 32, 32)) -> tuple[Inputs, np.ndarray]:
    """Two textured boxes sharing the plane i = 16; in the moving image A moved +SHIFT and B -SHIFT along j."""
    geometry = Geometry(shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    labels = np.zeros(shape, np.int16)
    labels[4:BORDER, 6:26, 6:26] = 1
    labels[BORDER:28, 6:26, 6:26] = 2
    texture = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(shape), 1.5)
    texture /= np.abs(texture).max()
    image = np.where(labels == 1, 0.5 + 0.3 * texture, np.where(labels == 2, 0.8 + 0.2 * texture, 0.0)).astype(np.float32)
    moving_labels, moving_image = np.zeros_like(labels), np.zeros_like(image)
    for label, shift in ((1, SHIFT), (2, -SHIFT)):
        inside = labels == label
        moving_labels[np.roll(inside, shift, axis=1)] = label
        moving_image += np.roll(np.where(inside, image, 0.0), shift, axis=1)
    truth = np.where(labels == 1, SHIFT, np.where(labels == 2, -SHIFT, np.nan))  # pull: fixed j maps to j + u
    inputs = Inputs(Volume(image, geometry), Volume(moving_image, geometry), Volume(labels, geometry), Volume(moving_labels, geometry))
    return inputs, truth


def _register(inputs: Inputs, **extra):
    return get_method("segreg").register(inputs, Options(seed=0, extra={**FAST, **extra}), lambda f, s: None)


@pytest.fixture(scope="module")
def sliding():
    inputs, truth = _sliding_pair()
    return inputs, truth, _register(inputs), _register(inputs, regions=1)


def test_sliding_regions_are_both_aligned_with_a_discontinuity(sliding):
    inputs, truth, result, _ = sliding
    labels = inputs.fixed_seg.array
    dice = dice_per_label(labels, result.warped_seg.array, labels=[1, 2])
    assert min(dice.values()) > 0.95, dice
    u_j = result.displacement.array[..., 1]  # identity direction: LPS y is index j, mm = voxels
    assert abs(np.median(u_j[labels == 1]) - SHIFT) < 0.5
    assert abs(np.median(u_j[labels == 2]) + SHIFT) < 0.5
    plane = labels[BORDER - 1] == 1  # the j, k extent of the shared border
    jump = u_j[BORDER - 1][plane] - u_j[BORDER][plane]  # neighbouring voxels, one in A, one in B
    assert np.median(jump) > 0.8 * 2 * SHIFT, f"no discontinuity at the border: median jump {np.median(jump):.2f}"


def test_a_globally_smooth_field_cannot_align_both_regions(sliding):
    inputs, truth, result, smooth = sliding
    labels = inputs.fixed_seg.array
    plane = labels[BORDER - 1] == 1
    jump = smooth.displacement.array[BORDER - 1, ..., 1][plane] - smooth.displacement.array[BORDER, ..., 1][plane]
    assert np.median(jump) < 2.0, "one region over the whole image should give a smooth field"
    near = np.zeros(labels.shape, bool)
    near[BORDER - 2 : BORDER + 2] = labels[BORDER - 2 : BORDER + 2] > 0  # two voxel layers each side
    error_smooth = np.abs(smooth.displacement.array[..., 1] - truth)[near].mean()
    error_segreg = np.abs(result.displacement.array[..., 1] - truth)[near].mean()
    assert error_smooth > 1.5 and error_segreg < 0.75, (error_smooth, error_segreg)


def test_border_voxels_take_their_own_regions_field_when_the_grids_do_not_coincide():
    """An odd number of voxels along the sliding axis puts the fine grid half a voxel off the fixed grid.

    Each fixed voxel must still take its own region's displacement: the warped image beside the
    border equals the piecewise-translated reference (no voxel sent between the two targets).
    """
    inputs, truth = _sliding_pair((33, 32, 32))
    offset = network_geometry(inputs.fixed.geometry, 1.0, multiple=16)
    assert not inputs.fixed.geometry.same_as(offset), "the test needs a fine grid off the fixed grid"
    result = _register(inputs)
    labels = inputs.fixed_seg.array
    beside = np.zeros(labels.shape, bool)
    beside[BORDER - 1 : BORDER + 1] = labels[BORDER - 1 : BORDER + 1] > 0  # one voxel layer each side of the border
    error = np.abs(result.displacement.array[..., 1] - truth)[beside]
    assert np.mean(error < 1.0) > 0.95, f"border voxels off their region's translation: median error {np.median(error):.2f}"
    shift = np.stack([np.zeros(labels.shape), np.nan_to_num(truth), np.zeros(labels.shape)])
    reference = ndimage.map_coordinates(inputs.moving.array, np.indices(labels.shape) + shift, order=1)
    bad = np.abs(result.warped.array - reference)[beside] > 0.1
    assert bad.mean() < 0.05, f"{100 * bad.mean():.1f}% of the border voxels differ from the piecewise-warped reference"


def test_composition_on_the_fixed_grid_is_exact_for_piecewise_translations():
    """Constant fields per region, fine grid half a voxel off the fixed grid: every fixed voxel gets its region's vector."""
    inputs, truth = _sliding_pair((33, 31, 32))
    settings = replace(Settings.from_options(Options(extra={"affine": "none"})), spacing=1.0)
    prepared = prepare(inputs, settings, Options(), 16, lambda f, s: None)
    grid = prepared.pair.grid
    to_steps = np.linalg.inv(grid.direction @ np.diag(grid.spacing))  # LPS mm -> fine-grid voxels
    shape = tuple(prepared.fixed_regions.shape[2:])
    fields = {}
    for region, code in enumerate(prepared.plan.codes):
        shift_mm = np.array([0.0, {(1,): SHIFT, (2,): -SHIFT}.get(code, 0.0), 0.0])
        steps = torch.tensor(to_steps @ shift_mm, dtype=torch.float32).view(1, 3, 1, 1, 1)
        fields[region] = (Box((0, 0, 0), shape), steps.expand((1, 3) + shape).clone(), 1)
    mapping = field_on_fixed_grid(inputs, prepared, fields, 0.0)
    expected = np.nan_to_num(truth)
    assert np.abs(mapping.array[..., 1] - expected).max() < 1e-4
    assert np.abs(mapping.array[..., [0, 2]]).max() < 1e-4


def test_unlabelled_voxels_near_labels_take_the_nearest_region():
    """A background gap between two regions (a sulcus) joins the nearer region; far background stays background."""
    regions = np.zeros((12, 5, 5), np.int64)
    regions[1:4] = 1
    regions[7:10] = 2  # background gap at i = 4, 5, 6; far background at i = 0, 10, 11 only 1-2 voxels away
    out = unlabelled_to_nearest(regions, (2.0, 1.0, 1.0), reach_mm=2.0)
    assert (out[4] == 1).all() and (out[6] == 2).all() and (out[10] == 2).all() and (out[0] == 1).all()
    assert (out[5] == regions[5]).all() and (out[11] == 0).all(), "voxels farther than the reach stay background"
    assert np.array_equal(unlabelled_to_nearest(regions, (2.0, 1.0, 1.0), reach_mm=0.0), regions)


def test_same_seed_same_field():
    inputs, _ = _sliding_pair((32, 32, 32))
    fast = {"level_iterations": [5, 5], "fine_iterations": 5}
    a = _register(inputs, **fast)
    b = _register(inputs, **fast)
    assert np.array_equal(a.displacement.array, b.displacement.array)


# ----------------------------------------------------------------------------- regions


def test_modes_group_freesurfer_codes():
    fixed = np.zeros((8, 8, 8), np.int16)
    fixed[1:3, 1:7, 1:7] = 17  # Left-Hippocampus
    fixed[3:4, 1:7, 1:7] = 53  # Right-Hippocampus
    fixed[4:6, 1:7, 1:7] = 2  # Left-Cerebral-White-Matter
    fixed[6:7, 1:7, 1:7] = 1001  # an aparc cortical parcel (outside our table)
    moving = fixed.copy()
    everything = plan_regions(fixed, moving, "all")
    assert everything.count == 5 and everything.codes[0] == (0,)
    coarse = plan_regions(fixed, moving, "coarse")
    assert sorted(coarse.names) == sorted(["background", "hippocampus and amygdala", "cerebral white matter", "cerebral cortex"])
    hippocampus = coarse.names.index("hippocampus and amygdala")
    assert set(coarse.codes[hippocampus]) == {17, 53}
    assert np.array_equal(coarse.fixed == hippocampus, np.isin(fixed, (17, 53)))
    assert coarse_class(42) == "cerebral cortex" and coarse_class(80) == "deep grey matter" and coarse_class(77) == "cerebral white matter"


def test_region_count_merges_smallest_into_most_touching_neighbour():
    fixed = np.zeros((10, 10, 10), np.int16)
    fixed[1:9, 1:9, 1:5] = 1  # large
    fixed[1:9, 1:9, 5:8] = 2  # medium, touches 1 on a whole face
    fixed[1:3, 1:3, 8:9] = 3  # small, touches 2 only
    plan = plan_regions(fixed, fixed.copy(), 3)
    assert plan.count == 3
    assert np.array_equal(plan.fixed == plan.fixed[2, 2, 8], np.isin(fixed, (2, 3)))  # 3 went into 2
    two = plan_regions(fixed, fixed.copy(), 2)
    assert np.array_equal(two.fixed > 0, fixed > 0)  # background + foreground (the paper's mode0)
    one = plan_regions(fixed, fixed.copy(), 1)
    assert one.count == 1 and not one.fixed.any()


def test_label_in_one_map_only_joins_the_nearest_region():
    fixed = np.zeros((12, 12, 12), np.int16)
    fixed[2:10, 2:10, 2:6] = 4
    fixed[2:10, 2:10, 6:10] = 43
    fixed[5:7, 5:7, 8:10] = 72  # only in the fixed map, inside 43
    moving = np.where(fixed == 72, 43, fixed)
    plan = plan_regions(fixed, moving, "all")
    assert plan.count == 3 and len(plan.reassigned) == 1 and "5th-Ventricle" in plan.reassigned[0]
    region_43 = plan.names.index("Right-Lateral-Ventricle")
    assert (plan.fixed[fixed == 72] == region_43).all()


def test_named_segments_map_onto_lut_codes():
    labels = np.array([[[0, 1, 2]]], np.int16)
    out = codes_from_names(labels, {1: "left hippocampus", 2: "Right-Amygdala"})
    assert out.tolist() == [[[0, 17, 54]]]
    with pytest.raises(InputError, match="no FreeSurfer lookup-table name"):
        codes_from_names(labels, {1: "tumour", 2: "Right-Amygdala"})


# ----------------------------------------------------------------------------- bad segmentations and options


def test_bad_segmentations_and_options_are_refused():
    inputs, _ = _sliding_pair()
    method = get_method("segreg")
    run = lambda i, **extra: method.register(i, Options(extra={**FAST, **extra}), lambda f, s: None)  # noqa: E731
    with pytest.raises(InputError, match="moving label map is missing"):
        run(Inputs(inputs.fixed, inputs.moving, inputs.fixed_seg, None))
    other_codes = Volume(inputs.moving_seg.array * 10, inputs.moving_seg.geometry)
    with pytest.raises(InputError, match="share no label"):
        run(Inputs(inputs.fixed, inputs.moving, inputs.fixed_seg, other_codes))
    empty = Volume(np.zeros_like(inputs.fixed_seg.array), inputs.fixed_seg.geometry)
    with pytest.raises(InputError, match="fixed label map is empty"):
        run(Inputs(inputs.fixed, inputs.moving, empty, inputs.moving_seg))
    far = Geometry((32, 32, 32), (1.0, 1.0, 1.0), (100.0, 0.0, 0.0))
    with pytest.raises(InputError, match="covers only 0% of the fixed image"):
        run(Inputs(inputs.fixed, inputs.moving, Volume(inputs.fixed_seg.array, far), inputs.moving_seg))
    with pytest.raises(InputError, match="unknown segreg option"):
        run(inputs, mask_los="edt")
    with pytest.raises(InputError, match="'variant' must be one of"):
        run(inputs, variant="deep")
    with pytest.raises(InputError, match="'regions' must be"):
        run(inputs, regions="fine")


def test_label_map_on_its_own_grid_is_resampled():
    """A fixed label map at 2 mm (covering the same extent) is accepted and used through physical space."""
    inputs, _ = _sliding_pair()
    coarse = Geometry((16, 16, 16), (2.0, 2.0, 2.0), (0.5, 0.5, 0.5))
    labels_2mm = inputs.fixed_seg.array[::2, ::2, ::2]
    result = _register(
        Inputs(inputs.fixed, inputs.moving, Volume(labels_2mm, coarse), inputs.moving_seg),
        level_iterations=[20, 10], fine_iterations=10,
    )
    dice = dice_per_label(inputs.fixed_seg.array, result.warped_seg.array, labels=[1, 2])
    assert min(dice.values()) > 0.85, dice


# ----------------------------------------------------------------------------- building blocks


def test_masked_gradient_l2_matches_gradient_l2_and_ignores_outside():
    torch.manual_seed(0)
    disp = torch.randn(1, 3, 6, 7, 8)
    assert torch.allclose(masked_gradient_l2(disp, torch.ones(1, 1, 6, 7, 8)), gradient_l2(disp), rtol=1e-5)
    weight = torch.zeros(1, 1, 6, 7, 8)
    weight[:, :, :3] = 1.0
    rough_outside = disp.clone()
    rough_outside[:, :, :3] = 2.0  # constant where the weight is 1
    assert float(masked_gradient_l2(rough_outside, weight)) == pytest.approx(0.0, abs=1e-7)


def test_label_affine_recovers_a_known_affine():
    rng = np.random.default_rng(0)
    fixed = np.zeros((40, 40, 40), np.int16)
    for code in range(1, 9):
        x, y, z = rng.integers(5, 29, 3)
        fixed[x : x + 6, y : y + 5, z : z + 7] = code
    truth = np.eye(4)
    truth[:3] = [[1.05, 0.02, 0.0, 1.5], [0.0, 0.97, 0.03, -2.0], [0.01, 0.0, 1.0, 0.7]]
    # moving = fixed o truth^-1, so fixed index p corresponds to moving index truth @ p
    disp = affine_to_displacement(torch.tensor(np.linalg.inv(truth), dtype=torch.float32), fixed.shape)
    moving = warp(torch.from_numpy(fixed.astype(np.float32))[None, None], disp, mode="nearest")[0, 0].round().numpy()
    fitted = label_affine(fixed, moving.astype(np.int16))
    assert np.abs(fitted[:3, :3] - truth[:3, :3]).max() < 0.03
    assert np.abs(fitted[:3, 3] - truth[:3, 3]).max() < 0.5


def test_extension_of_a_constant_field_is_that_constant():
    total = torch.zeros(1, 3, 32, 32, 32)
    known = torch.zeros(1, 1, 32, 32, 32)
    known[:, :, 10:20, 10:20, 10:20] = 1.0
    total[:, :, 10:20, 10:20, 10:20] = torch.tensor([1.5, -2.0, 0.25]).view(1, 3, 1, 1, 1)
    out = extend_field(total, known)
    assert torch.allclose(out, torch.tensor([1.5, -2.0, 0.25]).view(1, 3, 1, 1, 1).expand_as(out), atol=1e-5)


@pytest.mark.parametrize("factor", [2, 4])
def test_a_pooled_field_read_at_fine_points(factor):
    """`field_at` at whole fine voxels equals torch's cell-centred trilinear upsampling (`upsample_field`) there,
    edge values beyond; between them it is scipy's linear interpolation of the pooled field itself."""
    torch.manual_seed(factor)
    disp = torch.randn(1, 3, 5, 6, 7)
    fine = torch.nn.functional.interpolate(disp * factor, scale_factor=factor, mode="trilinear", align_corners=False)
    grid = torch.stack(torch.meshgrid(*[torch.arange(-2, n + 2) for n in fine.shape[2:]], indexing="ij"), dim=-1)
    whole = grid.reshape(1, -1, 1, 1, 3).float()
    clamped = [grid[..., axis].clamp(0, fine.shape[2 + axis] - 1).reshape(-1) for axis in range(3)]
    assert torch.allclose(field_at(disp, factor, whole).reshape(3, -1), fine[0][:, clamped[0], clamped[1], clamped[2]], atol=1e-5)

    points = torch.rand(1, 300, 1, 1, 3) * (torch.tensor([5.0, 6.0, 7.0]) * factor + 6) - 3
    pooled = ((points[0, :, 0, 0] + 0.5) / factor - 0.5).numpy().T
    expected = [ndimage.map_coordinates(disp[0, c].numpy() * factor, pooled, order=1, mode="nearest") for c in range(3)]
    assert np.allclose(field_at(disp, factor, points).reshape(3, -1).numpy(), np.stack(expected), atol=1e-5)


# ----------------------------------------------------------------------------- learned variant and training


def _tiny_weights(folder: Path) -> None:
    from JointRegSegLib.methods.segreg import build_network

    architecture = {"encoder": [4, 4, 4, 4], "decoder": [4, 4, 4, 4], "final": [4]}
    torch.manual_seed(1)
    net = build_network(architecture)
    path = folder / "segreg-dice.pt"
    torch.save(net.state_dict(), path)
    record_weights("segreg-dice", path, {"architecture": architecture, "factor": 2, "integration_steps": 4, "note": "random, for tests"})


def test_learned_variant_runs_end_to_end_with_random_weights(tmp_path, monkeypatch):
    _tiny_weights(tmp_path)
    monkeypatch.setenv("JRS_WEIGHTS_DIR", str(tmp_path))
    inputs, _ = _sliding_pair()
    stages = []
    result = get_method("segreg").register(
        inputs, Options(seed=0, extra={"variant": "learned", "affine": "none"}), lambda f, s: stages.append((f, s))
    )
    assert result.displacement.array.shape == (32, 32, 32, 3) and np.isfinite(result.displacement.array).all()
    assert result.warped.array.shape == (32, 32, 32) and result.warped_seg is not None
    assert len(result.weights["segreg-dice"]) == 64 and result.details["network_calls"] >= 1
    fractions = [f for f, _ in stages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    with pytest.raises(Exception, match="no weights named 'segreg-edt'"):
        get_method("segreg").register(inputs, Options(extra={"variant": "learned", "mask_loss": "edt"}), lambda f, s: None)


def test_training_writes_loadable_weights_with_provenance(tmp_path, monkeypatch):
    """The trainer on a bank of 20 tiny two-hemisphere maps: weights the learned variant loads, with its provenance."""
    from JointRegSegLib.methods.segreg import load_network
    from JointRegSegLib.training import bank, train

    monkeypatch.setenv("JRS_TRAINING_DIR", str(tmp_path / "training"))
    labels = np.zeros((32, 32, 32), np.int16)
    labels[4:16, 6:26, 6:26], labels[16:28, 6:26, 6:26], labels[12:20, 12:20, 12:20] = 2, 41, 17
    bank.entry(bank.synthseg_key("brain", 2.0, (32, 32, 32)), lambda: {"maps": np.stack([labels] * 20)})
    out = tmp_path / "weights"
    summary = train("segreg", {
        "shape": [32, 32, 32], "iterations": 3, "output": str(out), "threads": 1, "validate_every": 1e9,
        "architecture": {"encoder": [4, 4, 4, 4], "decoder": [4, 4, 4, 4], "final": [4]},
    })
    assert summary["iterations"] == 3 and Path(summary["weights"]).is_file()
    provenance = json.loads((out / "manifest.json").read_text())["segreg-dice"]["provenance"]
    assert provenance["architecture"]["encoder"] == [4, 4, 4, 4] and provenance["factor"] == 2
    assert provenance["validation"]["score"] == pytest.approx(summary["best_score"], abs=1e-4)
    monkeypatch.setenv("JRS_WEIGHTS_DIR", str(out))
    net, provenance, checksum = load_network("segreg-dice", torch.device("cpu"))
    assert checksum == json.loads((out / "manifest.json").read_text())["segreg-dice"]["sha256"]
    assert provenance["integration_steps"] == 7


# ----------------------------------------------------------------------------- worker: options, progress, cancel


@pytest.fixture(scope="module")
def sliding_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sliding")
    inputs, _ = _sliding_pair()
    files = {}
    for key in ("fixed", "moving", "fixed_seg", "moving_seg"):
        files[key] = folder / f"{key}.nii.gz"
        write_volume(getattr(inputs, key), files[key])
    return files


def test_worker_job_passes_segreg_options_and_reports_progress(sliding_files, tmp_path):
    """The worker's job runner (in process: the subprocess path is the cancel test's) with segreg options."""
    job = parse_job(json.dumps({
        "method": "segreg", "output": str(tmp_path / "out"), **{k: str(v) for k, v in sliding_files.items()},
        "options": {**FAST, "mask_loss": "edt-dice", "regions": "all"}, "pictures": False,
    }))
    stream = io.StringIO()
    summary = run_job(job, EventWriter(stream))
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    metrics = summary["metrics"]
    assert metrics["dice_mean"] > 0.95 and metrics["dice_mean_initial"] < 0.9
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["method_details"]["mask_loss"] == "edt-dice"
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert sum("fine samples" in e.get("stage", "") for e in events if e["event"] == "progress") == FAST["fine_iterations"]


def test_worker_cancel_leaves_no_output(sliding_files, tmp_path):
    job = {"method": "segreg", "output": str(tmp_path / "out"), **{k: str(v) for k, v in sliding_files.items()},
           "options": {"affine": "none", "level_iterations": [2000, 10]}, "pictures": False}
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.Popen([sys.executable, "-m", "JointRegSegLib.worker", str(job_file)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if "regions at" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=30) == 143
    assert '"cancelled"' in rest
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_learned_spacing_must_divide_the_network_spacing():
    from JointRegSegLib.methods.segreg import learned_factor

    assert [learned_factor(2.0, s) for s in (2.0, 1.0, 0.5)] == [1, 2, 4]
    with pytest.raises(InputError, match="option spacing must be"):
        learned_factor(2.0, 3.0)
