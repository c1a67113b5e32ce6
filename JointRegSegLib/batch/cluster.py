"""Where the tasks run: a Dask `LocalCluster` sized to this machine, or a running Dask scheduler.

- CPU, local: ``workers`` Dask worker processes (default: half the cores, at most one per 4 GB of
  memory) with ``threads_per_worker`` task threads each (default 1); each registration gets the
  cores divided by the tasks that run at once as its thread count.
- GPU, local: one worker per visible GPU, each with ``CUDA_VISIBLE_DEVICES`` set to its GPU and
  the resource ``GPU=1``; every task asks for ``GPU=1``, so one task runs per GPU at a time.
- A scheduler address: connect to it (``dask scheduler`` with ``dask worker`` processes, or a
  dask-jobqueue or Kubernetes cluster). The workers need this package installed and must see the
  input and output paths; GPU workers must be started with ``--resources GPU=1``, one per GPU.

The local worker processes are started with SIGINT ignored, so a Ctrl-C in the terminal reaches
only the batch, which stops the running registrations itself (`runner`).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

GPU = "GPU"
MEMORY_PER_WORKER_GB = 4.0
CONNECT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ClusterOptions:
    """How to get workers: ``scheduler`` (an address) or a local cluster of ``workers`` x ``threads_per_worker``."""

    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class Placement:
    """What the cluster offers the tasks: how many run at once, threads per registration, Dask resources per task."""

    slots: int
    threads_per_job: int | None
    resources: dict[str, float] | None
    description: str


def cpu_count() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_cpu_workers() -> int:
    """Half the cores, at most one worker per `MEMORY_PER_WORKER_GB` of memory, at least one."""
    import psutil

    by_memory = int(psutil.virtual_memory().total / 2**30 // MEMORY_PER_WORKER_GB)
    return max(1, min(cpu_count() // 2, by_memory))


def visible_gpus() -> list[str]:
    """The GPU ids a local GPU cluster uses (those in CUDA_VISIBLE_DEVICES when it is set)."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        from ..device import CUDA_HELP

        raise InputError(f"--device cuda: no GPU is visible to torch here. {CUDA_HELP}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[:count] if visible else [str(index) for index in range(count)]


@contextmanager
def _sigint_ignored_by_children() -> Iterator[None]:
    """Ignore SIGINT while worker processes start: they inherit it; this process's handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def has_dashboard() -> bool:
    """Whether the Dask dashboard can be served here (it needs bokeh: the ``[batch]`` extra)."""
    return importlib.util.find_spec("bokeh") is not None


def _scheduler_options() -> dict[str, Any]:
    """The local scheduler: on 127.0.0.1, its dashboard (where bokeh is installed) on a free port."""
    return {"host": "127.0.0.1", "dashboard": has_dashboard(), "dashboard_address": ":0"}


def gpu_cluster(gpus: list[str], threads_per_worker: int = 1) -> Any:
    """A local cluster with one worker per GPU id: ``CUDA_VISIBLE_DEVICES`` set to it, resource ``GPU=1``."""
    from distributed import Nanny, Scheduler, SpecCluster

    scheduler = {"cls": Scheduler, "options": _scheduler_options()}
    workers = {
        f"gpu{gpu}": {
            "cls": Nanny,
            "options": {"host": "127.0.0.1", "nthreads": threads_per_worker, "resources": {GPU: 1}, "env": {"CUDA_VISIBLE_DEVICES": gpu}},
        }
        for gpu in gpus
    }
    with _sigint_ignored_by_children():
        return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)


def _local_cluster(options: ClusterOptions) -> tuple[Any, Placement]:
    from distributed import LocalCluster

    threads_per_worker = options.threads_per_worker or 1
    if options.device == "cuda":
        gpus = visible_gpus()[: options.workers or None]
        cluster = gpu_cluster(gpus, threads_per_worker)
        slots = len(gpus)
        description = f"local cluster: {len(gpus)} GPU worker(s) (GPUs {', '.join(gpus)})"
    else:
        workers = options.workers or default_cpu_workers()
        with _sigint_ignored_by_children():
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=threads_per_worker, processes=True, silence_logs=40,
                **{key: value for key, value in _scheduler_options().items() if key != "dashboard"},
                scheduler_kwargs={"dashboard": has_dashboard()},
            )
        slots = workers * threads_per_worker
        description = f"local cluster: {workers} worker(s) x {threads_per_worker} thread(s)"
    return cluster, Placement(slots, max(1, cpu_count() // slots), {GPU: 1} if options.device == "cuda" else None, description)


def _remote_placement(client: Any, address: str, options: ClusterOptions) -> Placement:
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
    except Exception as error:
        raise InputError(
            f"no Dask worker is connected to the scheduler {address} after {CONNECT_TIMEOUT_S:g} s; start workers with "
            f"`dask worker {address}` in an environment where JointRegSeg is installed."
        ) from error
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if options.device == "cuda":
        gpus = int(sum(worker.get("resources", {}).get(GPU, 0) for worker in workers))
        if gpus == 0:
            raise InputError(
                f"--device cuda: no worker of {address} offers a GPU; start one worker per GPU with "
                f"`CUDA_VISIBLE_DEVICES=N dask worker {address} --nthreads 1 --resources GPU=1`."
            )
        return Placement(gpus, None, {GPU: 1}, f"scheduler {address}: {len(workers)} worker(s), {gpus} GPU(s)")
    slots = sum(int(worker.get("nthreads", 1)) for worker in workers)
    return Placement(slots, None, None, f"scheduler {address}: {len(workers)} worker(s), {slots} task thread(s)")


@contextmanager
def dask_client(options: ClusterOptions) -> Iterator[tuple[Any, Placement]]:
    """A Dask client and what its cluster offers (see the module docstring); closed on exit."""
    try:
        from distributed import Client
    except ImportError as error:
        raise InputError("jointregseg batch needs Dask (Python 3.10 or newer): pip install -e '.[batch]'.") from error

    if options.device not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda (each GPU worker uses its own GPU); got '{options.device}'.")
    cluster = None
    if options.scheduler:
        try:
            client = Client(options.scheduler, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as error:
            raise InputError(
                f"cannot reach the Dask scheduler at {options.scheduler}: {error}. Start one with `dask scheduler` "
                "and give the address it prints (tcp://HOST:PORT)."
            ) from error
    else:
        cluster, placement = _local_cluster(options)
        client = Client(cluster)
    try:
        if cluster is None:
            placement = _remote_placement(client, options.scheduler, options)
        yield client, placement
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
