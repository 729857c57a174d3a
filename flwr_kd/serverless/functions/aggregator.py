"""The aggregator Cloud Function: one fan-out task (FedDF distillation or FedMD transfer
learning) of this function's architecture, read from and written to Cloud Storage."""

from __future__ import annotations

import time

from flwr_kd.serverless import names, taskcodec
from flwr_kd.serverless.arraystore import AlreadyExists, ArrayStoreError
from flwr_kd.serverless.functions.env import FunctionEnv, stores
from flwr_kd.serverless.functions.errors import HttpError
from flwr_kd.serverless.functions.http import check_run_and_round, parse_request
from flwr_kd.serverless.roundstore import DONE
from flwr_kd.tasks import run_distill_task, run_local_train_task


def checked_request(body: bytes, content_type: str | None, env: FunctionEnv) -> dict:
    """`{"run", "round", "task", "params"}` for this architecture, its task object under this
    architecture's prefix of that round; 4xx otherwise."""
    request = parse_request(body, content_type, env)
    if not isinstance(request, dict):
        raise HttpError(400, "body must be a JSON object")
    for key, kind in (("run", str), ("round", int), ("task", str), ("params", dict)):
        if not isinstance(request.get(key), kind):
            raise HttpError(400, f"field '{key}' missing or not a {kind.__name__}")
    if request["params"].get("arch") != env.arch:
        raise HttpError(
            400,
            f"task for architecture '{request['params'].get('arch')}', "
            f"this aggregator serves '{env.arch}'",
        )
    prefix = names.aggregator_prefix(request["run"], request["round"], env.arch)
    if not request["task"].startswith(prefix):
        raise HttpError(403, f"task object must lie under {prefix}")
    return request


def handle_aggregator(
    body: bytes, content_type: str | None, env: FunctionEnv | None = None
) -> tuple[int, dict]:
    """Run one task; a retried task finds its first result (create-only) and keeps it."""
    t0 = time.perf_counter()
    env = env or FunctionEnv.from_environ("aggregator")
    request = checked_request(body, content_type, env)
    run, server_round, params = request["run"], request["round"], request["params"]
    store, rounds = stores(env.bucket, env.database)
    check_run_and_round(rounds, run, server_round)
    try:
        task = taskcodec.decode_task(store.get(request["task"]), params)
    except (ArrayStoreError, ValueError) as exc:
        raise HttpError(400, str(exc)) from exc
    call = names.aggregator_call(env.arch, request["task"])  # one per task
    result_name = names.aggregator_result_object(run, server_round, env.arch, params["kind"])
    rounds.begin_invocation(run, server_round, call, request["task"])
    t1 = time.perf_counter()
    outcome = run_distill_task(task) if params["kind"] == "distill" else run_local_train_task(task)
    compute = time.perf_counter() - t1
    state, meta = taskcodec.encode_outcome(outcome)
    try:
        written = store.put(result_name, state) if state else 0
    except AlreadyExists:
        written = 0  # a retried task: the first result stands (create-only), and is the same task's
    total = time.perf_counter() - t0
    rounds.end_invocation(
        run,
        server_round,
        call,
        {
            "status": DONE,
            "seconds": {"total": round(total, 4), "compute": round(compute, 4)},
            "bytes_out": written,
            "objects": [result_name],
        },
    )
    return 200, {
        "result": result_name if state else None,
        "meta": meta,
        "timing": {"compute": round(compute, 4), "total": round(total, 4)},
    }
