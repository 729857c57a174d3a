"""The serverless driver: one experiment against client and aggregator Cloud Functions.

It is `run_experiment` (the same strategies, report and result.json as simulation) on a
`CloudFunctionGrid`, with the aggregator functions as fan-out, client state on Cloud Storage,
and each round recorded in Firestore: `running` when its first message goes out, `done` with
the global arrays' object name once aggregated. A killed driver resumes at the first
unfinished round from that record (`--resume RUN`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from flwr_kd.data import FederatedData, load_federated
from flwr_kd.experiment import ExperimentConfig
from flwr_kd.fanout import FanOut
from flwr_kd.records import record_to_state, state_to_record
from flwr_kd.report import write_result
from flwr_kd.server_app import RuntimeHooks, run_experiment
from flwr_kd.serverless import taskcodec
from flwr_kd.serverless.arraystore import AlreadyExists, GcsArrayStore
from flwr_kd.serverless.functions import data_fingerprint, private_object, public_objects
from flwr_kd.serverless.grid import ClientEndpoint, CloudFunctionGrid, GridOptions, round_of
from flwr_kd.serverless.roundstore import FAILED, RoundStore
from flwr_kd.strategy import TooFewReplies


@dataclass
class Deployment:
    """Where the functions and buckets of one deployment are."""

    bucket: str
    clients: list[ClientEndpoint]
    aggregators: dict[str, str]  # architecture -> URL
    firestore_database: str = "(default)"

    @classmethod
    def from_terraform_outputs(cls, outputs: dict) -> Deployment:
        """From `terraform output -json` (values under "value", as Terraform writes them)."""

        def value(name):
            if name not in outputs:
                raise ValueError(
                    f"terraform outputs lack '{name}'; run terraform apply in terraform/ first"
                )
            entry = outputs[name]
            return entry["value"] if isinstance(entry, dict) and "value" in entry else entry

        urls, archs = value("client_function_urls"), value("client_architectures")
        return cls(
            bucket=value("arrays_bucket"),
            clients=[ClientEndpoint(cid, urls[cid], archs[cid]) for cid in sorted(urls)],
            aggregators=dict(value("aggregator_function_urls")),
            firestore_database=outputs.get("firestore_database", {}).get("value", "(default)")
            if isinstance(outputs.get("firestore_database"), dict)
            else "(default)",
        )


def upload_client_data(
    store: GcsArrayStore, data: FederatedData, deployment: Deployment, fingerprint: str
) -> None:
    """Public data for everybody, and each client's private partition under its own prefix
    (client i gets partition i), all named by the split's fingerprint. Create-only: an
    existing object already holds this split."""

    def put(name, arrays):
        try:
            store.put(name, arrays)
        except AlreadyExists:
            pass

    public_name, test_name = public_objects(fingerprint)
    put(public_name, {"x": data.public_x, "y": data.public_y})
    put(test_name, {"x": data.test_x, "y": data.test_y})
    for pid, endpoint in enumerate(deployment.clients):
        train_x, train_y, hold_x, hold_y = data.client_data(pid)
        put(
            private_object(f"clients/{endpoint.client_id}/data/", fingerprint),
            {
                "train_x": train_x,
                "train_y": train_y,
                "holdout_x": hold_x,
                "holdout_y": hold_y,
                "num_classes": np.asarray(data.model_spec.num_classes),
            },
        )


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
        name = f"runs/{self.run_id}/rounds/{server_round}/aggregators/{arch}/task-{params['kind']}-{index}.npz"
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


class RecordingGrid(CloudFunctionGrid):
    """Marks a round `running` in Firestore when its first message goes out."""

    def __init__(self, *args, rounds: RoundStore, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds, self.current_round = rounds, 0

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            r = round_of(msg)
            if r > self.current_round:
                self.current_round = r
                self.rounds.start_round(self.run_id, r)
        return super().push_messages(messages)


def overhead_summary(grid: CloudFunctionGrid) -> dict:
    """Per-invocation time beside the compute inside the function, and bytes per round."""
    calls = [c for c in grid.options.calls if not c.error]
    per_round: dict[int, int] = {}
    for c in grid.options.calls:
        per_round[c.server_round] = (
            per_round.get(c.server_round, 0) + c.bytes_request + c.bytes_reply + c.bytes_objects
        )
    if not calls:
        return {"calls": 0}
    total = float(np.mean([c.seconds for c in calls]))
    compute = float(np.mean([c.compute_seconds for c in calls]))
    return {
        "calls": len(grid.options.calls),
        "failed_calls": sum(1 for c in grid.options.calls if c.error),
        "mean_call_seconds": round(total, 4),
        "mean_compute_seconds": round(compute, 4),
        "mean_overhead_seconds": round(total - compute, 4),
        "overhead_share": round((total - compute) / total, 4) if total else 0.0,
        "bytes_per_round": {str(r): b for r, b in sorted(per_round.items())},
    }


#: How a function records a fault it injected (`functions.inject_call_fault`).
INJECTED_EVENT = re.compile(r"^attempt \d+: injected fault '([a-z0-9]+)'")


def reliability_summary(rounds: RoundStore, run_id: str, num_rounds: int) -> dict:
    """What the run's invocation documents say: faults injected (by kind), attempts, retried
    and taken-over calls, calls that ended failed, and replies left out, per round."""
    injected: dict[str, int] = {}
    summary = {
        "calls": 0,
        "attempts": 0,
        "retried_calls": 0,
        "taken_over": 0,
        "failed_calls": 0,
        "left_out": 0,
    }
    for server_round in range(num_rounds + 1):
        for doc in rounds.invocations(run_id, server_round):
            summary["calls"] += 1
            summary["attempts"] += int(doc.get("attempts", 0))
            summary["retried_calls"] += int(doc.get("attempts", 0)) > 1
            summary["failed_calls"] += doc.get("status") == FAILED
            summary["left_out"] += "dropped" in doc
            for event in doc.get("events", []):
                fault = INJECTED_EVENT.search(event)
                if fault:
                    injected[fault[1]] = injected.get(fault[1], 0) + 1
                summary["taken_over"] += "took over" in event
    return {
        **summary,
        "injected": dict(sorted(injected.items())),
        "injected_total": sum(injected.values()),
    }


def record_verdicts(
    rounds: RoundStore, grid: CloudFunctionGrid, run_id: str, server_round: int, dropped: list[dict]
) -> None:
    """Write why each left-out reply was left out into its call's invocation document (the
    function cannot know: a reply it sent may be late, invalid or lost on the way)."""
    for entry in dropped:
        endpoint = grid.endpoints.get(entry["node"])
        if endpoint is not None and entry.get("type"):
            rounds.record_verdict(
                run_id, server_round, f"{endpoint.client_id}:{entry['type']}", entry["reason"]
            )


def drive(
    cfg: ExperimentConfig,
    deployment: Deployment,
    run_id: str,
    *,
    resume: bool = False,
    options: GridOptions | None = None,
) -> dict:
    """Run (or resume) `run_id` on `deployment`; returns the result (written to cfg.out_dir)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, SUPERLINK_NODE_ID
    store = GcsArrayStore(deployment.bucket)
    rounds = RoundStore(database=deployment.firestore_database)
    hooks = RuntimeHooks(state_uri=f"gs://{deployment.bucket}/clients/state")
    if resume:
        run = rounds.get_run(run_id)
        cfg = dataclasses.replace(
            ExperimentConfig.from_run_config(run["config"]), out_dir=cfg.out_dir
        )
        hooks.rounds_done = int(run.get("last_done_round", 0))
        if hooks.rounds_done >= cfg.num_server_rounds:
            raise ValueError(
                f"run '{run_id}' finished all {cfg.num_server_rounds} rounds; nothing to resume"
            )
        if hooks.rounds_done:
            hooks.resume_arrays = state_to_record(store.get(run["state"]["arrays"]))
        print(f"resuming run {run_id} at round {hooks.rounds_done + 1} of {cfg.num_server_rounds}")
    else:
        rounds.create_run(run_id, cfg.to_run_config(), cfg.strategy)
    data = load_federated(cfg.data_spec)
    if len(deployment.clients) != cfg.num_clients:
        raise ValueError(
            f"{len(deployment.clients)} client functions but num-clients={cfg.num_clients}"
        )
    upload_client_data(store, data, deployment, data_fingerprint(cfg.data_spec.to_config()))
    grid = RecordingGrid(deployment.clients, store, run_id, options, rounds=rounds)
    hooks.fanout = fanout = CloudFanOut(deployment.aggregators, store, run_id, grid)

    def on_round_end(server_round, arrays, strategy):
        if server_round <= hooks.rounds_done:
            return  # round 0 (initial arrays) or the restored round
        name = f"runs/{run_id}/rounds/{server_round}/global.npz"
        try:
            store.put(name, record_to_state(arrays))
        except AlreadyExists:
            pass
        stats = strategy.stats.get(server_round)
        record = (
            {"bytes": stats.to_dict()["bytes"], "replies": stats.replies, "dropped": stats.dropped}
            if stats
            else {}
        )
        record_verdicts(rounds, grid, run_id, server_round, record.get("dropped", []))
        rounds.finish_round(run_id, server_round, record, {"arrays": name, "round": server_round})

    hooks.on_round_end = on_round_end
    run_cfg = dataclasses.replace(cfg, out_dir="")
    try:
        result = run_experiment(grid, run_cfg, hooks)
    except BaseException as exc:
        if isinstance(exc, TooFewReplies):
            record_verdicts(rounds, grid, run_id, grid.current_round, exc.dropped)
            exc.run_id = run_id
        rounds.fail_round(run_id, max(grid.current_round, 1), f"{type(exc).__name__}: {exc}")
        raise
    finally:
        grid.close()
    result["config"]["out-dir"] = cfg.out_dir
    result["serverless"] = {
        "run": run_id,
        "bucket": deployment.bucket,
        "invocations": overhead_summary(grid),
        "aggregator_calls": fanout.calls,
        "resumed_after_round": hooks.rounds_done,
        "reliability": reliability_summary(rounds, run_id, cfg.num_server_rounds),
    }
    rel = result["serverless"]["reliability"]
    kinds = ", ".join(f"{k} {n}" for k, n in rel["injected"].items())
    print(
        f"\ncalls {rel['calls']}, attempts {rel['attempts']}: {rel['retried_calls']} retried, {rel['taken_over']} taken over "
        f"after a crash, {rel['failed_calls']} failed; replies left out {rel['left_out']}"
        + (f"; faults injected {rel['injected_total']} ({kinds})" if rel["injected_total"] else "")
    )
    rounds.finish_run(
        run_id,
        result={"final_accuracy": result["rounds"][-1]["accuracy"] if result["rounds"] else {}},
    )
    if cfg.out_dir:
        path = write_result(cfg.out_dir, result)
        print(f"wrote {path}")
    return result


__all__ = ["CloudFanOut", "Deployment", "drive", "upload_client_data"]
