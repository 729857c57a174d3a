"""The fan-out on aggregator Cloud Functions: FedDF's distillation and FedMD's transfer
learning, one POST per architecture's task, all in parallel.

Task inputs go to Cloud Storage (create-only, so a resumed round re-sends the same task) and
results come back from there, from the one object the task's aggregator writes; the grid
supplies the HTTP session, its retries, the round and the invocation log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from flwr_kd.fanout import FanOut
from flwr_kd.serverless import names, taskcodec
from flwr_kd.serverless.arraystore import AlreadyExists, GcsArrayStore
from flwr_kd.serverless.grid import CloudFunctionGrid


class CloudFanOut(FanOut):
    """The fan-out on aggregator functions: one POST per task, all in parallel."""

    def __init__(
        self,
        aggregators: dict[str, str],
        store: GcsArrayStore,
        run_id: str,
        grid: CloudFunctionGrid,
    ) -> None:
        self.aggregators, self.store, self.run_id, self.grid = aggregators, store, run_id, grid
        self.calls: list[dict] = []

    def map(self, fn, tasks: Sequence) -> list:
        with ThreadPoolExecutor(max_workers=max(1, len(tasks))) as pool:
            return list(pool.map(self._run, range(len(tasks)), tasks))

    def _run(self, index: int, task):
        arch = task.arch
        if arch not in self.aggregators:
            raise ValueError(f"no aggregator function for architecture '{arch}'")
        arrays, params = taskcodec.encode_task(task)
        server_round = self.grid.current_round
        name = names.aggregator_task_object(self.run_id, server_round, arch, params["kind"], index)
        try:
            self.store.put(name, arrays)
        except AlreadyExists:
            pass  # a resumed round re-sends the same task
        t0 = time.perf_counter()
        body = {"run": self.run_id, "round": server_round, "task": name, "params": params}
        call, log = names.aggregator_call(arch, name), self.grid.log
        if log is not None:
            log.started(server_round, call, name)
        error = None
        try:
            payload = self.grid.post(self.aggregators[arch], json.dumps(body).encode())
            state = self._result(payload, server_round, arch, params["kind"])
        except Exception as exc:
            error = f"aggregator {arch}: {type(exc).__name__}: {exc}"
            raise RuntimeError(error) from exc
        finally:
            if log is not None:
                records = names.aggregator_call_records(self.run_id, server_round, arch, name)
                log.finished(server_round, call, records, error)
        self.calls.append(
            {
                "arch": arch,
                "kind": params["kind"],
                "round": server_round,
                "seconds": time.perf_counter() - t0,
                "compute": payload["timing"]["compute"],
            }
        )
        return taskcodec.decode_outcome(params["kind"], state, payload["meta"])

    def _result(self, payload: dict, server_round: int, arch: str, kind: str) -> dict:
        """The task's result, read only from the object this task's aggregator writes."""
        expected = names.aggregator_result_object(self.run_id, server_round, arch, kind)
        if payload.get("result") not in (None, expected):
            raise ValueError(f"result {payload.get('result')!r} is not {expected}")
        return self.store.get(expected) if payload.get("result") else {}
