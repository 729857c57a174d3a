"""Fan-out executors: run one server-side task per architecture, in parallel.

FedDF distils k architecture models per round and FedMD pretrains k architectures once; these
tasks are independent. An executor maps a module-level function over picklable tasks. Locally
that is a pool of processes (one torch thread each, so k tasks share the cores without
oversubscription); the serverless runtime invokes aggregator functions behind the same
interface.

GPUs: a task carries the run's device ("auto" by default) and resolves it in the worker that
runs it. On a machine with CUDA, the pool hands its workers the visible GPUs round-robin:
worker i makes "auto" and "cuda" mean `cuda:<i mod n>` (`flwr_kd.devices.prefer_cuda_index`),
so k parallel tasks spread over n GPUs, several to a GPU when k > n. We chose this over one
process per GPU: flwr-kd's per-architecture models are small, a few processes keep one GPU
busier than one process can, and the k tasks of a round still run at once. A run that names
`cuda:N` puts every task on that GPU. Workers touch CUDA only when a task uses it.

`map_with_progress` draws a bar of finished tasks on an interactive terminal
(`flwr_kd.progress`).
"""

from __future__ import annotations

import multiprocessing
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from flwr_kd.progress import progress_bar

if TYPE_CHECKING:  # Self is in typing only from Python 3.11
    from typing_extensions import Self


class FanOut(ABC):
    """Runs `fn(task)` for every task and returns the results in task order."""

    _label = ""  # names the progress bar of the map in progress (map_with_progress)

    @abstractmethod
    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]: ...

    def map_with_progress(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], label: str
    ) -> list[Any]:
        """`map`, with a bar named `label` counting finished tasks on an interactive terminal
        (executors that learn of results all at once draw none)."""
        self._label = label
        try:
            return self.map(fn, tasks)
        finally:
            self._label = ""

    def close(self) -> None:
        """Release workers (no-op by default)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialFanOut(FanOut):
    """One task after another in this process: the baseline the parallel executors beat."""

    def map(self, fn, tasks):
        return [fn(task) for task in progress_bar(tasks, self._label)]


def _init_worker(threads: int, gpus: int, started) -> None:
    """A new worker's share of the machine: `threads` torch threads and, with `gpus` CUDA
    devices, the next of them round-robin (`started` counts the workers started so far)."""
    import torch

    torch.set_num_threads(threads)
    if gpus:
        from flwr_kd.devices import prefer_cuda_index

        with started.get_lock():
            index, started.value = started.value, started.value + 1
        prefer_cuda_index(index % gpus)


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class ProcessFanOut(FanOut):
    """A lazily started pool of `max_workers` spawned processes (default: one per core), each
    with an equal share of the cores' torch threads, reused across rounds."""

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn, tasks):
        if len(tasks) <= 1 and self._pool is None:  # not worth starting workers for
            return [fn(task) for task in progress_bar(tasks, self._label)]
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            threads = max(1, (os.cpu_count() or 1) // self.max_workers)
            self._pool = ProcessPoolExecutor(
                max_workers=self.max_workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(threads, _cuda_device_count(), context.Value("i", 0)),
            )
        results = self._pool.map(fn, tasks)
        return list(progress_bar(results, self._label, total=len(tasks)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def make_fanout(kind: str) -> FanOut:
    """`process` (parallel, the default) or `serial`."""
    if kind == "process":
        return ProcessFanOut()
    if kind == "serial":
        return SerialFanOut()
    raise ValueError(f"unknown fan-out '{kind}': choose process or serial")
