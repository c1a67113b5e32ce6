"""`device.Beside`: work on a second CPU thread with one torch thread, beside a one-thread stage of the caller."""

from __future__ import annotations

import threading

import pytest
import torch

from JointRegSegLib.device import Beside, threads_for


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_work_runs_on_another_thread_with_one_torch_thread_and_the_callers_setting_stays(two_threads):
    seen = {}
    started, release = threading.Event(), threading.Event()

    def work() -> torch.Tensor:
        seen["thread"] = threading.current_thread()
        seen["torch threads"] = torch.get_num_threads()
        started.set()
        release.wait(10)  # the caller's one-thread stage runs meanwhile
        return torch.arange(6.0).reshape(2, 3) @ torch.ones(3)

    beside = Beside(work, torch.device("cpu"))
    assert started.wait(10)
    with threads_for(10, torch.device("cpu")):  # the caller's stage, on one thread
        assert torch.get_num_threads() == 1
        release.set()
    assert torch.get_num_threads() == 2
    assert torch.equal(beside.result(), torch.tensor([3.0, 12.0]))
    assert seen == {"thread": seen["thread"], "torch threads": 1} and seen["thread"] is not threading.current_thread()
    assert torch.get_num_threads() == 2


def test_threads_started_after_the_helper_take_the_callers_setting_not_its_one_thread(two_threads):
    assert Beside(torch.get_num_threads, torch.device("cpu")).result() == 1
    assert torch.get_num_threads() == 2
    later = {}
    thread = threading.Thread(target=lambda: later.setdefault("threads", torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later["threads"] == 2


def test_a_failure_of_the_work_is_raised_where_its_result_is_asked_for(two_threads):
    def work() -> None:
        raise ValueError("no such label")

    beside = Beside(work, torch.device("cpu"))
    with pytest.raises(ValueError, match="no such label"):
        beside.result()


def test_on_one_thread_the_work_runs_in_result_in_the_callers_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        beside = Beside(lambda: threading.current_thread(), torch.device("cpu"))
        assert beside.result() is threading.current_thread()
    finally:
        torch.set_num_threads(before)


def test_for_a_gpu_the_work_runs_in_result_in_the_callers_thread(two_threads):
    """A GPU's work is queued on its stream: no second CPU thread to fill (nothing here touches a GPU)."""
    ran = []
    beside = Beside(lambda: ran.append(threading.current_thread()) or "done", torch.device("cuda", 0))
    assert ran == []  # not started before its result is asked for
    assert beside.result() == "done" and ran == [threading.current_thread()]
