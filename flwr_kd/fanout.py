"""Fan-out executors: run one server-side task per architecture, in parallel.

FedDF distils k architecture models per round and FedMD pretrains k architectures once; these
tasks are independent. An executor maps a module-level function over picklable tasks. Locally
that is a pool of processes (one torch thread each, so k tasks share the cores without
oversubscription); the serverless runtime invokes aggregator functions behind the same
interface.
"""

from __future__ import annotations

import multiprocessing
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Self is in typing only from Python 3.11
    from typing_extensions import Self


class FanOut(ABC):
    """Runs `fn(task)` for every task and returns the results in task order."""

    @abstractmethod
    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]: ...

    def close(self) -> None:
        """Release workers (no-op by default)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialFanOut(FanOut):
    """One task after another in this process: the baseline the parallel executors beat."""

    def map(self, fn, tasks):
        return [fn(task) for task in tasks]


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class ProcessFanOut(FanOut):
    """A lazily started pool of `max_workers` spawned processes (default: one per core), each
    with an equal share of the cores' torch threads, reused across rounds."""

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn, tasks):
        if len(tasks) <= 1 and self._pool is None:
            return [fn(task) for task in tasks]  # not worth starting workers for
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.max_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(max(1, (os.cpu_count() or 1) // self.max_workers),),
            )
        return list(self._pool.map(fn, tasks))

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
