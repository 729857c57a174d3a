"""The fan-out on aggregator Cloud Functions: FedDF's distillation and FedMD's transfer
learning, one POST per architecture's task, all in parallel.

Task inputs go to Cloud Storage (create-only, so a resumed round re-sends the same task) and
results come back from there; the grid supplies the HTTP session, its retries and the round.
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
        headers = {
            "Content-Type": "application/json",
            **(self.grid.options.auth(self.aggregators[arch]) if self.grid.options.auth else {}),
        }
        resp = self.grid.session.post(
            self.aggregators[arch],
            data=json.dumps(body),
            headers=headers,
            timeout=(10, self.grid.options.call_timeout),
        )
        if resp.status_code != 200:
            raise RuntimeError(
                f"aggregator {arch} answered HTTP {resp.status_code}: {resp.text[:300]}"
            )
        payload = resp.json()
        state = self.store.get(payload["result"]) if payload.get("result") else {}
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
