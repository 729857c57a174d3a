"""The serverless driver: one experiment against client and aggregator Cloud Functions.

It is `run_experiment` (the same strategies, report and result.json as simulation) on a
`CloudFunctionGrid`, with the aggregator functions as fan-out, client state on Cloud Storage,
and the run recorded in Firestore, which only the driver touches: each round `running` when
its first message goes out, its statistics once aggregated (its global models in
`runs/<run>/global/`), `done` with its scores once evaluated; each call's invocation document
from the function's call records. A killed driver resumes at the first round not done
(`resume`).
"""

from __future__ import annotations

import numpy as np
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from flwr_kd.data import FederatedData, load_federated
from flwr_kd.experiment import ExperimentConfig
from flwr_kd.progress import progress_bar
from flwr_kd.records import record_to_state
from flwr_kd.runner import RuntimeHooks, run_experiment
from flwr_kd.serverless import names
from flwr_kd.serverless.arraystore import AlreadyExists, GcsArrayStore
from flwr_kd.serverless.cloudfanout import CloudFanOut
from flwr_kd.serverless.deployment import Deployment
from flwr_kd.serverless.grid import CloudFunctionGrid, GridOptions, round_of
from flwr_kd.serverless.invocations import InvocationLog
from flwr_kd.serverless.resume import earlier_rows, resume_hooks
from flwr_kd.serverless.roundstore import RoundStore
from flwr_kd.serverless.summary import overhead_summary, reliability_line, reliability_summary
from flwr_kd.strategy import TooFewReplies


def put_once(store: GcsArrayStore, name: str, arrays: dict) -> None:
    """Create `name` unless it exists: then it already holds these arrays (names say what)."""
    try:
        store.put(name, arrays)
    except AlreadyExists:
        pass


def upload_client_data(
    store: GcsArrayStore, data: FederatedData, deployment: Deployment, fingerprint: str
) -> None:
    """Public data for everybody, and each client's private partition under its data prefix
    (client i gets partition i), all named by the split's fingerprint. Create-only: an
    existing object already holds this split."""
    public_name, test_name = names.public_objects(fingerprint)
    put_once(store, public_name, {"x": data.public_x, "y": data.public_y})
    put_once(store, test_name, {"x": data.test_x, "y": data.test_y})
    clients = list(enumerate(deployment.clients))
    for pid, endpoint in progress_bar(clients, "upload client data", unit="client"):
        train_x, train_y, hold_x, hold_y = data.client_data(pid)
        put_once(
            store,
            names.private_object(endpoint.data_prefix, fingerprint),
            {
                "train_x": train_x,
                "train_y": train_y,
                "holdout_x": hold_x,
                "holdout_y": hold_y,
                "num_classes": np.asarray(data.model_spec.num_classes),
            },
        )


class RecordingGrid(CloudFunctionGrid):
    """Marks a round `running` in Firestore when its first message goes out."""

    def __init__(self, *args, rounds: RoundStore, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds = rounds

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            r = round_of(msg)
            if r > self.current_round:
                self.current_round = r
                self.rounds.start_round(self.run_id, r)
        return super().push_messages(messages)


def record_verdicts(grid: CloudFunctionGrid, server_round: int, dropped: list[dict]) -> None:
    """Write why each left-out reply was left out into its call's invocation document (the
    function cannot know: a reply it sent may be late, invalid or lost on the way)."""
    for entry in dropped:
        endpoint = grid.endpoints.get(entry["node"])
        if grid.log is not None and endpoint is not None and entry.get("type"):
            records = names.client_call_records(
                endpoint.root, grid.run_id, server_round, entry["type"]
            )
            call = names.client_call(endpoint.client_id, entry["type"])
            grid.log.left_out(server_round, call, records, entry["reason"])


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
    if resume:
        cfg, hooks = resume_hooks(cfg, rounds, store, run_id)
    else:
        hooks = RuntimeHooks()
        rounds.create_run(run_id, cfg.to_run_config(), cfg.strategy)
    hooks.state_uri = names.driver_state_uri(deployment.bucket, run_id)
    data = load_federated(cfg.data_spec)
    if len(deployment.clients) != cfg.num_clients:
        raise ValueError(
            f"{len(deployment.clients)} client functions but num-clients={cfg.num_clients}"
        )
    upload_client_data(store, data, deployment, names.data_fingerprint(cfg.data_spec.to_config()))
    log = InvocationLog(rounds, store, run_id)
    grid = RecordingGrid(deployment.clients, store, run_id, options, log, rounds=rounds)
    hooks.fanout = fanout = CloudFanOut(deployment.aggregators, store, run_id, grid)

    aggregated: dict[int, str] = {}  # round -> its global models, until the round is scored

    def on_round_end(server_round, arrays, strategy):
        name = aggregated[server_round] = names.global_object(run_id, server_round)
        put_once(store, name, record_to_state(arrays))
        stats = strategy.stats.get(server_round)
        record = {"stats": stats.to_dict()} if stats else {}
        if stats:
            record.update(bytes=record["stats"]["bytes"], replies=stats.replies)
            record["dropped"] = stats.dropped
        record_verdicts(grid, server_round, record.get("dropped", []))
        rounds.record_round(run_id, server_round, record)

    def on_round_scored(row: dict) -> None:
        """A round is done once aggregated and scored: a resumed run reports it from its
        round document, and starts from its global models."""
        name = aggregated.pop(row["round"], None)  # None: the restored round, scored again
        if name is not None:
            state = {"arrays": name, "round": row["round"]}
            rounds.finish_round(run_id, row["round"], {"scores": row}, state)

    finished = []  # the run is recorded done: a later error (writing result.json) fails no round

    def report(result: dict) -> dict:
        section = {
            "run": run_id,
            "bucket": deployment.bucket,
            "invocations": overhead_summary(grid),
            "aggregator_calls": fanout.calls,
            "resumed_after_round": hooks.rounds_done,
            "reliability": reliability_summary(rounds, run_id, cfg.num_server_rounds),
        }
        print("\n" + reliability_line(section["reliability"]))
        final = result["rounds"][-1]["accuracy"] if result["rounds"] else {}
        rounds.finish_run(run_id, result={"final_accuracy": final})
        finished.append(True)
        before = earlier_rows(rounds, run_id, hooks.rounds_done) if hooks.rounds_done else []
        return {"serverless": section, "rounds": before + result["rounds"]}

    hooks.on_round_end, hooks.on_round_scored, hooks.report = on_round_end, on_round_scored, report
    try:
        return run_experiment(grid, cfg, hooks)
    except BaseException as exc:
        if finished:
            raise
        if isinstance(exc, TooFewReplies):
            record_verdicts(grid, grid.current_round, exc.dropped)
            exc.run_id = run_id
        rounds.fail_round(run_id, max(grid.current_round, 1), f"{type(exc).__name__}: {exc}")
        raise
    finally:
        grid.close()


__all__ = ["drive", "upload_client_data"]
