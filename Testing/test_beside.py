"""worker.beside: a child forked ahead of its work, warmed up, then the work sent to it; its answer or its failure
back in the parent."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from JointRegSegLib.worker import beside
from JointRegSegLib.worker.beside import ForkedChild, ChildFailed, can_fork

pytestmark = pytest.mark.skipif(not can_fork(), reason="work is forked off on Linux only (elsewhere it runs in place)")

_WARMED: list[str] = []


def _warm() -> None:
    _WARMED.append("warmed")


def _who_and_sum(data: bytes) -> tuple[int, int, list[str]]:
    return os.getpid(), sum(data), list(_WARMED)


def _full_disk() -> None:
    raise OSError(errno.ENOSPC, "No space left on device", "pictures/fixed.png")


def _fails_with_a_local_class() -> None:
    class Local(Exception):  # a local class cannot be pickled
        pass

    raise Local("the renderer failed")


def _killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _waits_for(read: int) -> str:
    os.read(read, 1)  # never answered: only a signal ends this
    return "finished"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_work_runs_in_the_warmed_up_child_and_its_value_comes_back():
    data = bytes(range(256)) * 4096  # 1 MB: more than a pipe holds, sent while the child reads
    work = ForkedChild(_warm)
    work.submit(_who_and_sum, data)
    pid, total, warmed = work.result()
    assert pid != os.getpid() and total == sum(data) and warmed == ["warmed"] and _WARMED == []


def test_submit_does_not_wait_for_a_child_still_warming_up(tmp_path: Path):
    """The warm-up holds the child until the test opens the gate; a submit that waited for the child to read its
    8 MB would never return (a watchdog opens the gate after 60 s, and the order shows it)."""
    gate_read, gate_write = os.pipe()
    events: list[str] = []
    work = ForkedChild(lambda: os.read(gate_read, 1))
    os.close(gate_read)
    watchdog = threading.Timer(60, lambda: (events.append("watchdog"), os.write(gate_write, b"x")))
    watchdog.start()
    try:
        work.submit(_who_and_sum, bytes(8 << 20))
        events.append("submitted")
        os.write(gate_write, b"x")
        assert work.result()[1] == 0
    finally:
        watchdog.cancel()
        os.close(gate_write)
    assert events == ["submitted"]


def test_a_child_forked_later_does_not_hold_up_the_work_of_one_forked_before():
    """The second child inherits the first one's request pipe, open: the first must still see where its work
    ends (a watchdog kills it after 60 s, and the answer is then missing)."""
    first = ForkedChild()
    second = ForkedChild()
    watchdog = threading.Timer(60, lambda: os.kill(first._pid, signal.SIGKILL))
    watchdog.start()
    try:
        first.submit(_who_and_sum, b"\x05")
        assert first.result()[1] == 5
    finally:
        watchdog.cancel()
        second.close()


def test_the_childs_exception_is_raised_in_the_parent_with_its_details():
    work = ForkedChild()
    work.submit(_full_disk)
    with pytest.raises(OSError) as caught:
        work.result()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == "pictures/fixed.png"


def test_an_exception_that_does_not_pickle_comes_back_as_its_text():
    work = ForkedChild()
    work.submit(_fails_with_a_local_class)
    with pytest.raises(RuntimeError, match="Local: the renderer failed"):
        work.result()


def test_a_child_killed_before_answering_is_reported():
    work = ForkedChild()
    work.submit(_killed)
    with pytest.raises(ChildFailed, match="killed by SIGKILL"):
        work.result()


def test_close_stops_a_child_still_working_or_still_waiting():
    read, write = os.pipe()
    working = ForkedChild()
    working.submit(_waits_for, read)
    waiting = ForkedChild()
    pids = [working._pid, waiting._pid]
    working.close()
    waiting.close()
    os.close(read)
    os.close(write)
    assert all(_gone(pid) for pid in pids)  # stopped and reaped: no such process any more


def test_a_child_whose_parent_sends_nothing_leaves_by_itself():
    """When the run ends without sending work (it failed, or died), the pipe closes and the child exits."""
    waiting = ForkedChild(_warm)
    os.close(waiting._requests)
    waiting._requests = None
    _, status = os.waitpid(waiting._pid, 0)
    waiting._pid = None
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_without_fork_the_work_runs_here_when_its_result_is_asked_for(monkeypatch):
    monkeypatch.setattr(beside, "can_fork", lambda: False)
    work = ForkedChild(_warm)
    work.submit(_who_and_sum, b"\x01\x02")
    assert work.result() == (os.getpid(), 3, [])


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signal masks of the main thread")
def test_sigterm_ends_the_child_although_the_worker_blocks_it():
    # the worker blocks SIGTERM in every thread but its cancel thread (__main__.install_cancel_handler)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        read, write = os.pipe()
        work = ForkedChild()
        work.submit(_waits_for, read)
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


def test_the_child_ends_with_the_process_that_forked_it(tmp_path: Path):
    """A run that ends without closing its child (a cancel leaves with os._exit) takes the child with it: the
    child, still drawing (here: sleeping ten minutes), must not go on writing into a removed folder."""
    import subprocess
    import sys

    code = (
        "import os, sys, time\n"
        "from JointRegSegLib.worker.beside import ForkedChild\n"
        "work = ForkedChild()\n"
        "work.submit(time.sleep, 600)\n"
        "print(work._pid, flush=True)\n"
        "time.sleep(0.5)\n"
        "os._exit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    child = int(done.stdout.split()[0])
    for _ in range(600):  # reaped by init once killed; ten minutes of sleep otherwise
        if _gone(child) or _zombie(child):
            break
        time.sleep(0.1)
    assert _gone(child) or _zombie(child)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")
    except OSError:
        return True
