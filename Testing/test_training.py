"""The training loop's contract (resume, best weights only, provenance, curves), `train all`, and the import direction.

The loop is exercised with tto's teacher on smooth-noise pairs (SynthMorph's label-free source: no
shared data needed) and with a one-parameter trainer whose validation scores are scripted, so the
"weights only when validation improves" rule is checked against known scores.
"""

from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from JointRegSegLib.errors import InputError
from JointRegSegLib.methods.tto import build_network
from JointRegSegLib.training import make_trainer
from JointRegSegLib.training.all import adopt, failures, train_all
from JointRegSegLib.training.common import with_real_pair
from JointRegSegLib.training.loop import CommonConfig, Trainer, fit
from JointRegSegLib.weights import load_into, load_weights, read_manifest, record_weights

REPO = Path(__file__).resolve().parents[1]
NOISE = {"sources": {"noise": 1.0}, "shape": [32, 32, 32], "threads": 1}

pytestmark = pytest.mark.usefixtures("one_thread")


class Scripted(Trainer):
    """A one-weight network whose validation scores follow ``scores`` (one per validation)."""

    name, method = "scripted", "test"

    def __init__(self, cfg: CommonConfig, scores: list[float]) -> None:
        self.cfg, self.device, self.scores = cfg, torch.device("cpu"), list(scores)
        self.net = torch.nn.Linear(1, 1)
        self.optimiser = torch.optim.SGD(self.net.parameters(), lr=0.1)
        self.validations = 0

    def optimisers(self) -> dict[str, torch.optim.Optimizer]:
        return {"sgd": self.optimiser}

    def batch(self, n: int) -> torch.Tensor:
        return torch.full((2, 1), float(n))

    def step(self, batch: torch.Tensor, n: int) -> dict[str, float]:
        loss = (self.net(batch) - 1.0).square().mean()
        self.optimiser.zero_grad()
        loss.backward()
        self.optimiser.step()
        return {"loss": loss.item()}

    def validate(self) -> dict[str, float]:
        self.validations += 1
        return {"score": self.scores.pop(0)}

    def describe(self) -> dict[str, Any]:
        return {"data": "scripted", "validation_set": "scripted"}


def test_weights_are_written_only_when_validation_improves(tmp_path):
    cfg = CommonConfig(iterations=4, output=str(tmp_path), validate_every=1e-9, log_every=1)
    trainer = Scripted(cfg, [0.5, 0.4, 0.7, 0.6, 0.65])  # iteration 0, then after each of 4 iterations
    summary = fit(trainer, log=open("/dev/null", "w"))
    assert summary["best_score"] == 0.7 and trainer.validations == 5
    provenance = read_manifest(tmp_path)["scripted"]["provenance"]
    assert provenance["validation"]["score"] == 0.7 and provenance["iterations"] == 2
    assert provenance["seed"] == 0 and provenance["data"] == "scripted" and "cpu" in provenance["device"]
    with open(tmp_path / "logs" / "scripted_validation.csv") as handle:  # the run's curves: every validation
        assert [float(r["score"]) for r in csv.DictReader(handle)] == [0.5, 0.4, 0.7, 0.6, 0.65]
    with open(tmp_path / "scripted_validation.csv") as handle:  # beside the weights: up to the weights' validation
        assert [float(r["score"]) for r in csv.DictReader(handle)] == [0.5, 0.4, 0.7]
    with open(tmp_path / "scripted_loss.csv") as handle:
        assert [int(r["iteration"]) for r in csv.DictReader(handle)] == [1, 2]
    assert (tmp_path / "scripted_training.png").stat().st_size > 0
    assert (tmp_path / "logs" / "scripted_training.png").read_bytes() != (tmp_path / "scripted_training.png").read_bytes()
    saved = torch.load(tmp_path / "scripted.pt", weights_only=True)
    assert set(saved) == {"weight", "bias"}

    resumed = Scripted(CommonConfig(iterations=5, output=str(tmp_path), validate_every=1e9), [0.69])
    assert fit(resumed, log=open("/dev/null", "w"))["iterations"] == 5
    assert read_manifest(tmp_path)["scripted"]["provenance"]["iterations"] == 2  # 0.69 < 0.7: weights kept


def test_validation_weighs_the_real_pair_beside_the_synthetic_volumes():
    """hof's and uresnet's validation score: the synthetic score plus the real OASIS pair's NCC gain from registration.
    The numbers of 2026-11-29: hof's iteration 5065 (synthetic 0.645, NCC 0.882) does not beat the shipped 4274 (0.633,
    NCC 0.916), uresnet's 5723 (0.785, NCC 0.951) beats the shipped 4272 (0.771, NCC 0.950); unregistered NCC 0.877 / 0.894."""
    assert with_real_pair(0.645, ncc_after=0.882, ncc_before=0.877) < with_real_pair(0.633, ncc_after=0.916, ncc_before=0.877)
    assert with_real_pair(0.785, ncc_after=0.951, ncc_before=0.894) > with_real_pair(0.771, ncc_after=0.950, ncc_before=0.894)
    assert with_real_pair(0.6, ncc_after=0.85, ncc_before=0.88) == pytest.approx(0.57)  # aligning the real pair worse costs


def test_a_fresh_run_keeps_better_shipped_weights(tmp_path):
    first = Scripted(CommonConfig(iterations=1, output=str(tmp_path), validate_every=1e9, log_every=1), [0.3, 0.8])
    fit(first, log=open("/dev/null", "w"))
    (tmp_path / "checkpoints" / "scripted.pt").unlink()  # a fresh run, the weights above still shipped
    second = Scripted(CommonConfig(iterations=1, output=str(tmp_path), validate_every=1e9), [0.8, 0.5, 0.6])
    shipped_curves = {name: (tmp_path / name).read_bytes() for name in ("scripted_loss.csv", "scripted_validation.csv", "scripted_training.png")}
    summary = fit(second, log=open("/dev/null", "w"))
    assert summary["best_score"] == 0.8  # the shipped weights scored 0.8; 0.5 and 0.6 wrote nothing
    assert {name: (tmp_path / name).read_bytes() for name in shipped_curves} == shipped_curves  # nor their curves
    with open(tmp_path / "logs" / "scripted_validation.csv") as handle:  # the second run's own curves
        assert [float(r["score"]) for r in csv.DictReader(handle)] == [0.5, 0.6]
    provenance = read_manifest(tmp_path)["scripted"]["provenance"]
    assert provenance["iterations"] == 1 and provenance["validation"]["score"] == 0.8


def test_warm_start_continues_the_shipped_weights_where_the_checkpoint_is_gone(tmp_path):
    """The shipped network, iteration count and curves carry on; the steps after them equal plain SGD from the
    shipped weights on the batches of those iterations (the optimiser starts afresh)."""
    first = Scripted(CommonConfig(iterations=3, output=str(tmp_path), validate_every=1e9, log_every=1), [0.3, 0.5])
    fit(first, log=open("/dev/null", "w"))
    (tmp_path / "checkpoints" / "scripted.pt").unlink()
    shipped = torch.load(tmp_path / "scripted.pt", weights_only=True)
    replay = torch.nn.Linear(1, 1)
    replay.load_state_dict(shipped)
    sgd = torch.optim.SGD(replay.parameters(), lr=0.1)
    for n in (3, 4):
        sgd.zero_grad()
        (replay(torch.full((2, 1), float(n))) - 1.0).square().mean().backward()
        sgd.step()

    second = Scripted(CommonConfig(iterations=5, output=str(tmp_path), validate_every=1e9, log_every=1, warm_start=True), [0.5, 0.7])
    summary = fit(second, log=open("/dev/null", "w"))
    assert summary["iterations"] == 5 and summary["iterations_this_run"] == 2 and summary["best_score"] == 0.7
    assert all(torch.allclose(second.net.state_dict()[k], replay.state_dict()[k]) for k in shipped)
    provenance = read_manifest(tmp_path)["scripted"]["provenance"]
    assert provenance["iterations"] == 5 and provenance["config"]["warm_start"] is True
    with open(tmp_path / "scripted_validation.csv") as handle:
        assert [int(r["iteration"]) for r in csv.DictReader(handle)] == [0, 3, 5]
    with open(tmp_path / "scripted_loss.csv") as handle:
        assert [int(r["iteration"]) for r in csv.DictReader(handle)] == [1, 2, 3, 4, 5]

    empty = tmp_path / "empty"
    with pytest.raises(InputError, match="train without warm_start"):
        fit(Scripted(CommonConfig(iterations=1, output=str(empty), warm_start=True), [0.1]), log=open("/dev/null", "w"))


def test_shipped_weights_that_do_not_fit_leave_a_fresh_network_fresh(tmp_path):
    """Weights of another architecture (one extra tensor) do not count as shipped, and the tensors that would fit are
    not loaded into the fresh network either (torch copies them before it raises)."""
    torch.save({"weight": torch.full((1, 1), 5.0), "bias": torch.zeros(1), "extra": torch.zeros(2)}, tmp_path / "scripted.pt")
    record_weights("scripted", tmp_path / "scripted.pt", {"note": "another architecture"})
    trainer = Scripted(CommonConfig(iterations=0, output=str(tmp_path), validate_every=1e9), [0.2])
    fresh = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    assert fit(trainer, log=open("/dev/null", "w"))["best_score"] == 0.2
    saved = torch.load(tmp_path / "scripted.pt", weights_only=True)
    assert set(saved) == {"weight", "bias"} and all(torch.equal(saved[k], fresh[k]) for k in fresh)


def test_tto_teacher_resumes_and_records_provenance(tmp_path):
    config = {**NOISE, "stage": "teacher", "output": str(tmp_path), "seed": 5, "validate_every": 1e9}
    first = fit(make_trainer("tto", {**config, "iterations": 2}), log=open("/dev/null", "w"))
    assert first["iterations"] == 2 and first["step_share"] is not None
    resumed = fit(make_trainer("tto", {**config, "iterations": 3}), log=open("/dev/null", "w"))
    assert resumed["iterations"] == 3 and resumed["iterations_this_run"] == 1
    state, _ = load_weights("tto_teacher", folder=tmp_path)
    build_network("teacher").load_state_dict(state)
    provenance = read_manifest(tmp_path)["tto_teacher"]["provenance"]
    assert provenance["seed"] == 5 and provenance["stage"] == "teacher"
    assert provenance["validation"]["score"] == pytest.approx(resumed["best_score"], abs=1e-4)
    with open(tmp_path / "logs" / "tto_teacher_validation.csv") as handle:
        assert [int(r["iteration"]) for r in csv.DictReader(handle)] == [0, 2, 3]


def test_train_all_runs_the_schedule_and_adopt_takes_better_weights(tmp_path):
    """uresnet, scheduled first, fails (it takes no ``sources`` setting): the log says why, the tto teacher trains
    after it all the same, and uresnet is not tried again."""
    out, shipped, log = tmp_path / "run", tmp_path / "shipped", tmp_path / "train_all.log"
    with open(log, "w") as handle:
        summaries = train_all(0.75, only=["uresnet", "tto teacher"], output=str(out), options={**NOISE, "log_every": 1}, log=handle)
    assert [s["name"] for s in summaries] == ["uresnet", "tto_teacher"] and summaries[1]["iterations"] >= 1
    assert "sources" in summaries[0]["error"] and "iterations" not in summaries[0]
    assert failures(summaries) == [f"uresnet: {summaries[0]['error']}"]
    assert "Traceback" in log.read_text() and not (out / "uresnet.pt").exists()
    assert (out / "tto_teacher.pt").is_file() and (out / "tto_teacher_training.png").is_file()
    shipped.mkdir()
    assert adopt(out, shipped, log=open("/dev/null", "w")) == ["tto_teacher"]
    assert load_weights("tto_teacher", folder=shipped)[1] == read_manifest(out)["tto_teacher"]["sha256"]
    assert adopt(out, shipped, log=open("/dev/null", "w")) == []  # the weights there already
    with pytest.raises(InputError, match="no network matches"):
        train_all(0.4, only=["nothing"], output=str(out), log=open("/dev/null", "w"))


def test_warm_start_into_a_folder_of_its_own_continues_the_shipped_weights(tmp_path):
    """A GPU run's own output folder holds no weights: warm_start takes the shipped ones (their iteration count)."""
    shipped = read_manifest()["tto_teacher"]["provenance"]["iterations"]
    config = {**NOISE, "stage": "teacher", "iterations": shipped + 1, "output": str(tmp_path), "warm_start": True}
    summary = fit(make_trainer("tto", config), log=open("/dev/null", "w"))
    assert summary["iterations"] == shipped + 1 and summary["iterations_this_run"] == 1


def _recorded(folder: Path, state: dict[str, torch.Tensor], score: float) -> None:
    """tto teacher weights ``state`` written into ``folder`` with a validation score of ``score`` on record."""
    torch.save(state, folder / "tto_teacher.pt")
    record_weights("tto_teacher", folder / "tto_teacher.pt", {"method": "tto", "config": {**NOISE, "stage": "teacher"},
                                                              "validation": {"score": score}})


def test_adopt_scores_both_weights_on_one_set_not_by_their_records(tmp_path):
    """Scores recorded on other validation sets (another device's draw, an older validation) decide nothing: weights
    that shift every point by 4 voxels lose to the identity network here whatever either manifest says."""
    net = build_network("teacher")
    identity = {k: v.clone() for k, v in net.state_dict().items()}  # its last layer starts at zero: no displacement
    shifted = {**identity, "head.bias": identity["head.bias"] + 4.0}
    run, target = tmp_path / "run", tmp_path / "target"
    run.mkdir(), target.mkdir()
    _recorded(run, identity, 0.0)
    _recorded(target, shifted, 1.0)
    assert adopt(run, target, log=open("/dev/null", "w")) == ["tto_teacher"]
    provenance = read_manifest(target)["tto_teacher"]["provenance"]
    assert provenance["validation_in_run"] == {"score": 0.0}
    assert provenance["validation"]["score"] > provenance["replaced_weights"]["score"]
    assert provenance["validation"]["score"] == pytest.approx(provenance["validation"]["identity_dice"], abs=1e-4)
    _recorded(run, shifted, 1.0)
    assert adopt(run, target, log=open("/dev/null", "w")) == []
    assert load_weights("tto_teacher", folder=target)[1] == read_manifest(target)["tto_teacher"]["sha256"]
    _recorded(target, {"head.bias": torch.zeros(5)}, 1.0)  # weights of another architecture: replaced
    assert adopt(run, target, log=open("/dev/null", "w")) == ["tto_teacher"]
    assert read_manifest(target)["tto_teacher"]["provenance"]["replaced_weights"]["score"] is None


def test_cli_train_needs_a_budget_and_names_the_networks(tmp_path):
    from JointRegSegLib.cli import main

    assert main(["train", "uresnet", "--output", str(tmp_path)]) == 2
    assert main(["train", "nonsense", "--iterations", "1", "--output", str(tmp_path)]) == 2


def test_methods_never_import_training():
    """Training builds on the methods; a method module imports nothing from `JointRegSegLib.training`."""
    for path in sorted((REPO / "JointRegSegLib" / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                assert "training" not in module.split("."), f"{path.name} imports {module}"


def test_the_training_path_runs_without_simpleitk_or_nibabel(tmp_path):
    """A GPU machine may have torch and numpy only: every trainer imports, and a tto teacher trains, without them."""
    code = (
        "import sys; sys.modules['SimpleITK'] = None; sys.modules['nibabel'] = None\n"
        "import JointRegSegLib.training.tto, JointRegSegLib.training.uresnet, JointRegSegLib.training.jers\n"
        "import JointRegSegLib.training.hof, JointRegSegLib.training.segreg, JointRegSegLib.training.all\n"
        "from JointRegSegLib.training import train\n"
        f"s = train('tto', {{'stage': 'teacher', 'iterations': 1, 'sources': {{'noise': 1.0}}, 'shape': [32, 32, 32], "
        f"'threads': 1, 'output': {str(tmp_path)!r}}})\n"
        "print(s['iterations'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "1"


def test_bank_says_where_training_data_come_from(tmp_path, monkeypatch):
    from JointRegSegLib.training import bank

    monkeypatch.setenv("JRS_TRAINING_DIR", str(tmp_path / "training"))
    monkeypatch.setenv("JRS_SHARED_DATA", str(tmp_path / "absent"))
    with pytest.raises(InputError, match="shared data folder ../shared/data"):
        bank.synthseg_maps("brain", 4.0, (44, 52, 60))
    written = bank.entry("example", lambda: {"maps": torch.arange(6).reshape(2, 3).numpy()})
    again = bank.entry("example", lambda: pytest.fail("a stored entry is read, not rebuilt"))
    assert json.dumps(again["maps"].tolist()) == json.dumps(written["maps"].tolist())


def test_uresnet_validation_is_the_same_whatever_the_run_settings(shared_data_dir):
    """A run's own deformation settings do not change uresnet's validation pairs, so the shipped weights score what
    their provenance records (the pairs of the runs behind them) under any settings. Needs ../shared/data."""
    shipped = read_manifest()["uresnet"]["provenance"]["validation"]
    for settings in ({}, {"affine_ranges": [6, 0.06, 0.02, 2], "max_std": 2.5}):
        trainer = make_trainer("uresnet", {"iterations": 1, **settings})
        load_into(trainer.net, "uresnet")
        with torch.no_grad():
            scores = trainer.validate()
        for key in ("reg_dice", "identity_dice", "seg_dice"):
            assert scores[key] == pytest.approx(shipped[key], abs=1e-4), (settings, key)


def test_tto_logs_its_gradient_norm_and_clips_it_where_asked(tmp_path):
    """``grad_norm`` is the gradient's norm before any clipping (a blow-up shows in it first); ``clip_norm`` scales the
    gradient down to that norm before Adam's step (the tto teacher's field blew up without: gpu_training.md)."""
    config = {**NOISE, "stage": "teacher", "iterations": 1, "output": str(tmp_path)}

    def gradient_norm(trainer: Any) -> float:
        return float(torch.stack([p.grad.norm() for p in trainer.net.parameters() if p.grad is not None]).norm())

    free = make_trainer("tto", config)
    terms = free.step(free.batch(0), 0)
    assert terms["grad_norm"] > 1e-3 and gradient_norm(free) == pytest.approx(terms["grad_norm"], rel=1e-4)
    clipped = make_trainer("tto", {**config, "clip_norm": 1e-3})
    terms = clipped.step(clipped.batch(0), 0)
    assert terms["grad_norm"] > 1e-3 and gradient_norm(clipped) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(InputError, match="clip_norm"):
        make_trainer("tto", {**config, "clip_norm": 0})
