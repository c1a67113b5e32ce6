"""A network's held-apart validation set is drawn on the CPU whatever the device it trains on
(`training.loop.held_apart_generator`), so a GPU run's validation scores compare with a CPU run's and with the
scores the shipped weights record. Needs a CUDA GPU and ../shared/data (or its bank in .training)."""

from __future__ import annotations

import pytest
import torch

from JointRegSegLib.training import make_trainer
from JointRegSegLib.training.loop import validation_scores
from JointRegSegLib.weights import load_into

NETWORKS = [
    ("uresnet", {}, "uresnet"),
    ("hof", {}, "hof"),
    ("jers", {}, "jers"),
    ("segreg", {}, "segreg-dice"),
    ("tto", {"stage": "teacher"}, "tto_teacher"),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("network", "settings", "weights"), NETWORKS, ids=[n[2] for n in NETWORKS])
def test_shipped_weights_validate_alike_on_cpu_and_gpu(shared_data_dir, network, settings, weights):
    """The same weights on both devices: the scores of the unregistered pairs (``identity_*``, a function of the
    set alone) are equal, the network's within a Dice hundredth (the two devices' floating point)."""
    scores = {}
    for device in ("cpu", "cuda"):
        trainer = make_trainer(network, {**settings, "iterations": 1, "device": device})
        load_into(trainer.net, weights)
        scores[device] = validation_scores(trainer)
    print(weights, {k: (round(scores["cpu"][k], 4), round(scores["cuda"][k], 4)) for k in scores["cpu"]})
    for key, value in scores["cpu"].items():
        if key.startswith("identity_"):
            assert scores["cuda"][key] == pytest.approx(value, abs=1e-6), key
        else:
            assert scores["cuda"][key] == pytest.approx(value, abs=0.01), key
