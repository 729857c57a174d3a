"""The client Cloud Function: one Flower message in, its reply out.

It runs the very same `KDClient` handlers as the simulation, on its private data from its own
Cloud Storage prefix (`clientdata`). Each call is recorded in its invocation document, created
once: a retry of a finished call gets the recorded answer, computed once; a retry of a call
whose instance died takes it over.
"""

from __future__ import annotations

import datetime
import json
import time

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from flwr_kd import faults, protocol
from flwr_kd.client import KDClient
from flwr_kd.serverless import names, wire
from flwr_kd.serverless.arraystore import ArrayStoreError, GcsArrayStore
from flwr_kd.serverless.functions.clientdata import load_function_data, payload_problem
from flwr_kd.serverless.functions.env import FunctionEnv, stores
from flwr_kd.serverless.functions.errors import HttpError
from flwr_kd.serverless.functions.http import check_run_and_round, parse_request
from flwr_kd.serverless.functions.injected import damage_object, inject_call_fault
from flwr_kd.serverless.roundstore import DONE, FAILED, RoundStore, took_over_event

#: A gen2 HTTP function runs at most 60 minutes: a call still "running" after that was
#: abandoned by a crashed instance, and a retry takes it over.
INVOCATION_LEASE_SECONDS = 3600
#: Reply records kept on Cloud Storage whatever their size (logits: the record of what a
#: client said; weights: what aggregators read).
ALWAYS_STORED = ("logits", "arrays")

CLIENT_APP = KDClient(load_data=load_function_data).register(ClientApp())

#: (run, round, call id) of one invocation document.
Call = tuple[str, int, str]


def handle_client(
    body: bytes, content_type: str | None, env: FunctionEnv | None = None
) -> tuple[int, dict]:
    t0 = time.perf_counter()
    env = env or FunctionEnv.from_environ("client")
    envelope = wire.parse_envelope(parse_request(body, content_type, env))
    store, rounds = stores(env.bucket, env.database)
    run, server_round = envelope["run"], envelope["round"]
    check_run_and_round(rounds, run, server_round)
    msg = own_message(envelope, env, store)
    config = msg.content.get(protocol.CONFIG) if msg.has_content() else None
    plan = checked_fault_plan(msg, env, config)
    call = (run, server_round, names.client_call(env.client_id, msg.metadata.message_type))
    attempt, answered = claim_call(rounds, call, msg.metadata.message_id, env)
    if answered is not None:
        return 200, answered  # a retry: the same answer, computed once
    if config is not None and "state-uri" in config:  # a client keeps state under its own prefix
        config["state-uri"] = names.client_state_uri(env.bucket, env.client_id)
    fault = plan.draw(server_round, env.client_id, msg.metadata.message_type, attempt)
    if fault is not None:
        inject_call_fault(fault, plan, rounds, call, attempt)
    t1 = time.perf_counter()
    reply, status = run_client_app(msg, env, fault)
    compute = time.perf_counter() - t1
    out, written = store_reply(reply, msg, env, store, call, fault)
    total = time.perf_counter() - t0
    out["timing"] = {"compute": round(compute, 4), "total": round(total, 4)}
    out["stored_bytes"] = written  # what the reply put on Cloud Storage (the driver counts bytes)
    rounds.end_invocation(
        *call,
        {
            "status": status,
            "message_id": msg.metadata.message_id,
            "reply": json.dumps(out),
            "seconds": {"total": round(total, 4), "compute": round(compute, 4)},
            "bytes_in": len(body),
            "bytes_out": written + len(json.dumps(out)),
            "objects": sorted(out["objects"].values()),
            **({"error": reply.error.reason} if reply.has_error() else {}),
        },
    )
    return 200, out


def own_message(envelope: dict, env: FunctionEnv, store: GcsArrayStore) -> Message:
    """The envelope's message, if it reads only this client's message objects and is
    addressed to this client's node."""
    own = names.client_messages_prefix(envelope["run"], envelope["round"], env.client_id)
    if not all(isinstance(o, str) and o.startswith(own) for o in envelope["objects"].values()):
        raise HttpError(403, f"message objects must lie under {own}")
    try:
        msg = wire.decode(envelope, store)
    except ArrayStoreError as exc:
        raise HttpError(400, str(exc)) from exc
    node = names.node_id_for(env.client_id)
    if msg.metadata.dst_node_id != node:
        raise HttpError(
            400,
            f"message addressed to node {msg.metadata.dst_node_id}, "
            f"this is client '{env.client_id}' (node {node})",
        )
    return msg


def checked_fault_plan(
    msg: Message, env: FunctionEnv, config: ConfigRecord | None
) -> faults.FaultPlan:
    """The message's fault-injection plan, once its architecture and arrays are known to fit
    this client (400s otherwise, before anything is written)."""
    if config is None:
        return faults.FaultPlan()
    if "arch" in config and str(config["arch"]) != env.arch:
        raise HttpError(
            400, f"message for architecture '{config['arch']}', this client runs '{env.arch}'"
        )
    problem = payload_problem(msg, env, config)
    if problem:
        raise HttpError(400, problem)
    try:
        return faults.FaultPlan.from_config(config, serverless=True)
    except (TypeError, ValueError) as exc:
        raise HttpError(400, f"bad fault-injection settings: {exc}") from exc


def claim_call(
    rounds: RoundStore, call: Call, message_id: str, env: FunctionEnv
) -> tuple[int, dict | None]:
    """Open the call's invocation document: (attempt, None) to go ahead, or (attempt, reply)
    when this very message was answered already. 409 while an earlier attempt may still run."""
    run, server_round, call_id = call
    prior = rounds.begin_invocation(run, server_round, call_id, message_id)
    if prior is None:
        return 1, None
    attempt = int(prior.get("attempts", 2))
    if prior.get("status") == DONE and prior.get("message_id") == message_id:
        return attempt, json.loads(prior["reply"])
    if prior.get("status") not in (FAILED, DONE):
        started = prior.get("started")
        expired = (
            started is not None
            and (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
            > INVOCATION_LEASE_SECONDS
        )
        if not (expired or env.one_instance):
            raise HttpError(409, f"call {call_id} of round {server_round} is in progress")
        rounds.note_invocation(*call, took_over_event(attempt))
    rounds.restart_invocation(*call)
    return attempt, None


def run_client_app(msg: Message, env: FunctionEnv, fault: str | None) -> tuple[Message, str]:
    """(reply, invocation status): the ClientApp's reply, or an error reply as Flower sends."""
    context = Context(
        run_id=msg.metadata.run_id,
        node_id=names.node_id_for(env.client_id),
        node_config={"arch": env.arch, "client-id": env.client_id},
        state=RecordDict(),
        run_config={},
    )
    try:
        if fault == "exception":
            faults.fail(fault, 0.0)
        return CLIENT_APP(msg, context), DONE
    except Exception as exc:  # noqa: BLE001 - reported to the driver as Flower does
        return Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg), FAILED


def store_reply(
    reply: Message,
    msg: Message,
    env: FunctionEnv,
    store: GcsArrayStore,
    call: Call,
    fault: str | None,
) -> tuple[dict, int]:
    """(reply envelope, bytes stored): the reply's weights and logits go to this client's
    reply prefix, after any injected damage to the reply or its objects."""
    if fault in faults.CORRUPTING:
        faults.corrupt_reply(reply, fault)
    reply.metadata.__dict__["_message_id"] = f"{msg.metadata.message_id}.reply"
    run, server_round, _ = call
    out, written = wire.encode(
        reply,
        run=run,
        server_round=server_round,
        store=store,
        prefix=names.reply_prefix(run, server_round, env.client_id, msg.metadata.message_type),
        always_store=ALWAYS_STORED,
    )
    if fault in ("tamper", "missing") and out["objects"]:
        damage_object(store, min(out["objects"].values()), fault)
    return out, written
