"""worker.beside: work in a forked child, its answer or its failure back in the parent."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import pytest

from JointRegSegLib.worker.beside import Beside, ChildFailed, can_fork

pytestmark = pytest.mark.skipif(not can_fork(), reason="work is forked off on Linux only (elsewhere it runs in place)")


def test_the_work_runs_in_another_process_and_its_value_comes_back():
    parent = os.getpid()
    data = list(range(100_000))  # already in memory: the child reads it without it being sent
    work = Beside(lambda: (os.getpid(), sum(data), {"picture": "pictures/fixed.png"}))
    pid, total, files = work.result()
    assert pid != parent and total == sum(data) and files == {"picture": "pictures/fixed.png"}


def test_the_childs_exception_is_raised_in_the_parent_with_its_details():
    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "pictures/fixed.png")

    with pytest.raises(OSError) as caught:
        Beside(full_disk).result()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == "pictures/fixed.png"


def test_an_exception_that_does_not_pickle_comes_back_as_its_text():
    class Local(Exception):  # a local class cannot be pickled
        pass

    def fails():
        raise Local("the renderer failed")

    with pytest.raises(RuntimeError, match="Local: the renderer failed"):
        Beside(fails).result()


def test_a_child_killed_before_answering_is_reported():
    with pytest.raises(ChildFailed, match="killed by SIGKILL"):
        Beside(lambda: os.kill(os.getpid(), signal.SIGKILL)).result()


def test_close_stops_a_child_still_running():
    work = Beside(lambda: time.sleep(600))
    pid = work._pid
    work.close()
    with pytest.raises(ProcessLookupError):  # stopped and reaped: no such process any more
        os.kill(pid, 0)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signal masks of the main thread")
def test_sigterm_ends_the_child_although_the_worker_blocks_it():
    # the worker blocks SIGTERM in every thread but its cancel thread (__main__.install_cancel_handler)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        read, write = os.pipe()

        def wait_for_the_parent():
            os.close(write)
            os.read(read, 1)  # never answered: only a signal ends this
            return "finished"

        work = Beside(wait_for_the_parent)
        os.close(read)
        pid = work._pid
        os.kill(pid, signal.SIGTERM)
        # should SIGTERM stay blocked in the child, it waits for ever: a watchdog kills it, and the match fails
        watchdog = threading.Timer(60, lambda: os.kill(pid, signal.SIGKILL))
        watchdog.start()
        try:
            with pytest.raises(ChildFailed, match="killed by SIGTERM"):
                work.result()
        finally:
            watchdog.cancel()
            os.close(write)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
