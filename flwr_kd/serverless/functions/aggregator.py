"""The aggregator Cloud Function: one fan-out task (FedDF distillation or FedMD transfer
learning) of this function's architecture, read from and written to Cloud Storage under
`aggregators/<run>/<round>/<arch>/`, where the driver put the task."""

from __future__ import annotations

import time

from flwr_kd.serverless import names, taskcodec
from flwr_kd.serverless.arraystore import AlreadyExists, ArrayStoreError
from flwr_kd.serverless.callrecords import DONE
from flwr_kd.serverless.functions.claims import claim_call, finish_call
from flwr_kd.serverless.functions.env import FunctionEnv, array_store
from flwr_kd.serverless.functions.errors import HttpError
from flwr_kd.serverless.functions.http import check_run_and_round, parse_request
from flwr_kd.tasks import run_distill_task, run_local_train_task


def checked_request(body: bytes, content_type: str | None, env: FunctionEnv) -> dict:
    """`{"run", "round", "task", "params"}` for this architecture, its task object under this
    architecture's prefix of that round; 4xx otherwise."""
    request = parse_request(body, content_type, env)
    if not isinstance(request, dict):
        raise HttpError(400, "body must be a JSON object")
    for key, kind in (("run", str), ("round", int), ("task", str), ("params", dict)):
        if not isinstance(request.get(key), kind) or isinstance(request.get(key), bool):
            raise HttpError(400, f"field '{key}' missing or not a {kind.__name__}")
    if not names.is_safe_id(request["run"]) or request["round"] < 0:
        raise HttpError(400, "field 'run' or 'round' is not a run name or round number")
    if request["params"].get("arch") != env.arch:
        raise HttpError(
            400,
            f"task for architecture '{request['params'].get('arch')}', "
            f"this aggregator serves '{env.arch}'",
        )
    prefix = names.aggregator_prefix(request["run"], request["round"], env.arch)
    task = request["task"]
    if not (task.startswith(prefix) and "/" not in task[len(prefix) :]):
        raise HttpError(403, f"task object must lie under {prefix}")
    return request


def handle_aggregator(
    body: bytes, content_type: str | None, env: FunctionEnv | None = None, caller: str | None = None
) -> tuple[int, dict]:
    """Run one task; a retried task is answered from its record (computed once), and a task
    whose earlier attempt died is run again, its first result kept (create-only)."""
    t0 = time.perf_counter()
    env = env or FunctionEnv.from_environ("aggregator")
    request = checked_request(body, content_type, env)
    run, server_round, params = request["run"], request["round"], request["params"]
    store = array_store(env.bucket)
    check_run_and_round(store, request["task"], run, server_round, "task")
    try:
        task = taskcodec.decode_task(store.get(request["task"]), params)
    except (ArrayStoreError, ValueError) as exc:
        raise HttpError(400, str(exc)) from exc
    claim = claim_call(
        store,
        names.aggregator_call_records(run, server_round, env.arch, request["task"]),
        request["task"],
        caller,
        one_instance=True,  # several instances, but a task is never refused: it runs again
    )
    if claim.recorded is not None:
        return 200, claim.recorded["reply"]
    result_name = names.aggregator_result_object(run, server_round, env.arch, params["kind"])
    t1 = time.perf_counter()
    outcome = run_distill_task(task) if params["kind"] == "distill" else run_local_train_task(task)
    compute = time.perf_counter() - t1
    state, meta = taskcodec.encode_outcome(outcome)
    try:
        written = store.put(result_name, state) if state else 0
    except AlreadyExists:
        written = 0  # an earlier attempt of this task wrote it before it died: the first stands
    total = time.perf_counter() - t0
    timing = {"compute": round(compute, 4), "total": round(total, 4)}
    answer = {"result": result_name if state else None, "meta": meta, "timing": timing}
    record = finish_call(
        store,
        claim,
        {
            "status": DONE,
            "message_id": request["task"],
            "reply": answer,
            "seconds": timing,
            "bytes_in": len(body),
            "bytes_out": written,
            "objects": [result_name] if state else [],
        },
    )
    return 200, record["reply"]
