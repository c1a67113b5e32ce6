"""Choosing the torch device a run uses, with messages a user can act on."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

import torch

from .errors import InputError

T = TypeVar("T")

CUDA_HELP = (
    "To use a GPU, install a CUDA build of torch (see README.md, 'GPU'); otherwise choose the CPU "
    "(--device cpu, or 'CPU' in the Slicer module)."
)


def available_devices() -> list[str]:
    """The devices torch can use here, CPU first (what the Slicer module offers)."""
    return ["cpu"] + [f"cuda:{i}" if torch.cuda.device_count() > 1 else "cuda" for i in range(torch.cuda.device_count())]


def resolve_device(name: str) -> torch.device:
    """Turn 'cpu', 'cuda', 'cuda:N' or 'auto' into a usable torch device, or raise InputError."""
    name = (name or "cpu").strip().lower()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if ":" in name and not name.split(":", 1)[1].isdigit():
            raise InputError(f"unknown device '{name}': write cuda:N with N the GPU's number (cuda:0, cuda:1, ...).")
        if not torch.cuda.is_available():
            raise InputError(f"device '{name}' was requested but torch {torch.__version__} sees no CUDA GPU. {CUDA_HELP}")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"device '{name}' does not exist: torch sees {torch.cuda.device_count()} GPU(s).")
        return torch.device("cuda", index)  # with its index: tensors report one, and a bare "cuda" would differ from it
    raise InputError(f"unknown device '{name}': choose one of cpu, cuda, cuda:N or auto.")


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: a device without an index (``cuda``, as ``torch.Generator(device="cuda")``
    reports itself) stands for the current one of its type, so ``cuda`` and ``cuda:0`` are taken as the same
    (torch checks only the type where a generator meets a tensor)."""
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


SMALL_WORK = 1_000_000
"""Voxels (or samples) below which a CPU stage runs on one thread (see `threads_for`)."""


@contextmanager
def threads_for(work: int, device: torch.device) -> Iterator[None]:
    """Run the block on one CPU thread when ``work`` (voxels or samples per operation) is below `SMALL_WORK`.

    Each operation on such tensors takes a millisecond or two; with two or more threads every one
    ends at a barrier, and on a busy machine the threads are scheduled in turn, so each barrier can
    wait a whole time slice. Measured on the 2-core development machine at load 4: the tto affine
    stage took 6.8 s on one thread and 14 s on two; 40 refinement steps at 4 mm 2.4 s against 7 s;
    10 steps at 2 mm (0.77 M voxels) 5.8 s against 10-13 s. Larger work, and GPUs, keep torch's
    setting. Deterministic: the choice depends on sizes only, never on the machine's load.
    """
    threads = torch.get_num_threads()
    single = device.type == "cpu" and work < SMALL_WORK and threads > 1
    if single:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if single:
            torch.set_num_threads(threads)


class Beside(Generic[T]):
    """``work`` run on a Python thread whose torch operations use one CPU thread, beside a stage of the caller that
    runs on one thread itself (`threads_for`), so that a second core works too; `result` waits for it.

    torch keeps its number of threads per OS thread (OpenMP's setting, which a thread takes from the last
    ``torch.set_num_threads`` of any thread when it first runs an operation): the helper sets its own to one and
    the caller's setting back when it ends, so the caller's threads keep theirs. Where there is no second CPU
    thread to use (a GPU, or torch on one thread) ``work`` runs in `result`, as the caller would have run it."""

    def __init__(self, work: Callable[[], T], device: torch.device) -> None:
        self._work: Callable[[], T] = work
        self._outcome: tuple[bool, object] | None = None
        self._threads = torch.get_num_threads()
        self._thread: threading.Thread | None = None
        if device.type == "cpu" and self._threads > 1:
            self._thread = threading.Thread(target=self._run, name="beside a one-thread stage", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        torch.set_num_threads(1)
        try:
            self._outcome = (True, self._work())
        except BaseException as error:  # raised again by `result`, in the caller's thread
            self._outcome = (False, error)
        finally:
            torch.set_num_threads(self._threads)

    def result(self) -> T:
        """What ``work`` returned (or raise what it raised)."""
        if self._thread is None:
            return self._work()
        self._thread.join()
        assert self._outcome is not None
        done, value = self._outcome
        if not done:
            raise value  # type: ignore[misc]
        return value  # type: ignore[return-value]
