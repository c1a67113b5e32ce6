"""The weights manifest under concurrent training runs, and checksum verification on load."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from JointRegSegLib.errors import WeightsError
from JointRegSegLib.weights import load_weights, read_manifest, record_weights


def _save_and_record(folder: str, name: str, start: mp.synchronize.Barrier) -> None:
    path = Path(folder) / f"{name}.pt"
    torch.save({"w": torch.full((4,), float(len(name)))}, path)
    start.wait()
    for _ in range(5):
        record_weights(name, path, {"run": name})


def test_simultaneous_records_keep_every_entry(tmp_path):
    names = [f"net{i}" for i in range(6)]
    context = mp.get_context("spawn")
    start = context.Barrier(len(names))
    workers = [context.Process(target=_save_and_record, args=(str(tmp_path), name, start)) for name in names]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0] * len(names)
    assert sorted(read_manifest(tmp_path)) == names
    assert not list(tmp_path.glob(".manifest.json*"))  # no lock or staged file left behind
    for name in names:
        state, _ = load_weights(name, tmp_path)
        assert torch.equal(state["w"], torch.full((4,), float(len(name))))


def test_modified_weights_are_refused(tmp_path):
    path = tmp_path / "net.pt"
    torch.save({"w": torch.zeros(3)}, path)
    record_weights("net", path, {})
    torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(WeightsError, match="does not match its recorded checksum"):
        load_weights("net", tmp_path)
