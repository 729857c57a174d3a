"""The client Cloud Function: one Flower message in, its reply out.

It runs the very same `KDClient` handlers as the simulation, on its private data from its own
root on Cloud Storage (`clientdata`). It reads only its own root (`names.client_root`): the
message objects the driver put into its inbox, its data and state; it writes only its outbox
(reply records and call records, create-only) and its state. Each call is claimed in a
create-only attempt record (`claims`): a retry of a finished call gets the recorded answer,
computed once; a retry of a call whose instance died takes it over.
"""

from __future__ import annotations

import json
import time

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from flwr_kd import faults, protocol
from flwr_kd.client import KDClient
from flwr_kd.serverless import names, wire
from flwr_kd.serverless.arraystore import ArrayStoreError, GcsArrayStore
from flwr_kd.serverless.callrecords import DONE, FAILED
from flwr_kd.serverless.functions.claims import claim_call, finish_call
from flwr_kd.serverless.functions.clientdata import load_function_data, payload_problem
from flwr_kd.serverless.functions.env import FunctionEnv, ServedClient, array_store
from flwr_kd.serverless.functions.errors import HttpError
from flwr_kd.serverless.functions.http import check_run_and_round, parse_request
from flwr_kd.serverless.functions.injected import act_out, damaging
from flwr_kd.serverless.wire import STORED_REPLY_RECORDS

CLIENT_APP = KDClient(load_data=load_function_data).register(ClientApp())


def handle_client(
    body: bytes, content_type: str | None, env: FunctionEnv | None = None, caller: str | None = None
) -> tuple[int, dict]:
    """Answer one message; `caller` is the e-mail the front end verified, recorded."""
    t0 = time.perf_counter()
    env = env or FunctionEnv.from_environ("client")
    envelope = wire.parse_envelope(parse_request(body, content_type, env))
    store = array_store(env.bucket)
    client = env.serving(envelope.get("client"))
    run, server_round = envelope["run"], envelope["round"]
    msg = own_message(envelope, client, store)
    config = msg.content.get(protocol.CONFIG) if msg.has_content() else None
    plan = checked_fault_plan(msg, env, client, config)
    message_type = msg.metadata.message_type
    claim = claim_call(
        store,
        names.client_call_records(client.root, run, server_round, message_type),
        msg.metadata.message_id,
        caller,
        one_instance=env.one_instance,
        draw=lambda attempt: plan.draw(server_round, client.client_id, message_type, attempt),
    )
    if claim.recorded is not None:
        return 200, claim.recorded["reply"]  # a retry: the same answer, computed once
    if config is not None and "state-uri" in config:  # a client keeps state under its own root
        config["state-uri"] = names.client_state_uri(env.bucket, client.root)
    if claim.fault is not None:
        act_out(claim.fault, plan)
    t1 = time.perf_counter()
    reply, status = run_client_app(msg, env, client, claim.fault)
    compute = time.perf_counter() - t1
    out, written = store_reply(reply, msg, client, store, envelope, claim.fault)
    total = time.perf_counter() - t0
    out["timing"] = {"compute": round(compute, 4), "total": round(total, 4)}
    out["stored_bytes"] = written  # what the reply put on Cloud Storage (the driver counts bytes)
    record = finish_call(
        store,
        claim,
        {
            "status": status,
            "message_id": msg.metadata.message_id,
            "reply": out,
            "seconds": {"total": round(total, 4), "compute": round(compute, 4)},
            "bytes_in": len(body),
            "bytes_out": written + len(json.dumps(out)),
            "objects": sorted(out["objects"].values()),
            **({"error": reply.error.reason} if reply.has_error() else {}),
        },
    )
    return 200, record["reply"]


def own_message(envelope: dict, client: ServedClient, store: GcsArrayStore) -> Message:
    """The envelope's message, if the driver put it into this client's inbox (404 otherwise),
    it reads only this client's message objects of that round, and is addressed to this
    client's node."""
    run, server_round = envelope["run"], envelope["round"]
    msg = wire.decode_proto(envelope)
    if not names.is_safe_id(msg.metadata.message_type):
        raise HttpError(400, f"message type {msg.metadata.message_type!r} cannot name a call")
    sent = names.message_object(client.root, run, server_round, msg.metadata.message_id)
    check_run_and_round(store, sent, run, server_round, "message")
    own = names.inbox_prefix(client.root, run, server_round)
    if not all(isinstance(o, str) and o.startswith(own) for o in envelope["objects"].values()):
        raise HttpError(403, f"message objects must lie under {own}")
    try:
        msg = wire.decode(envelope, store)
    except ArrayStoreError as exc:
        raise HttpError(400, str(exc)) from exc
    node = names.node_id_for(client.client_id)
    if msg.metadata.dst_node_id != node:
        raise HttpError(
            400,
            f"message addressed to node {msg.metadata.dst_node_id}, "
            f"this is client '{client.client_id}' (node {node})",
        )
    return msg


def checked_fault_plan(
    msg: Message, env: FunctionEnv, client: ServedClient, config: ConfigRecord | None
) -> faults.FaultPlan:
    """The message's fault-injection plan, once its architecture and arrays are known to fit
    this client (400s otherwise, before anything is written)."""
    if config is None:
        return faults.FaultPlan()
    if "arch" in config and str(config["arch"]) != env.arch:
        raise HttpError(
            400, f"message for architecture '{config['arch']}', this client runs '{env.arch}'"
        )
    problem = payload_problem(msg, env, client.data_prefix, config)
    if problem:
        raise HttpError(400, problem)
    try:
        return faults.FaultPlan.from_config(config, serverless=True)
    except (TypeError, ValueError) as exc:
        raise HttpError(400, f"bad fault-injection settings: {exc}") from exc


def run_client_app(
    msg: Message, env: FunctionEnv, client: ServedClient, fault: str | None
) -> tuple[Message, str]:
    """(reply, call status): the ClientApp's reply, or an error reply as Flower sends."""
    context = Context(
        run_id=msg.metadata.run_id,
        node_id=names.node_id_for(client.client_id),
        node_config={"arch": env.arch, "client-id": client.client_id},
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
    client: ServedClient,
    store: GcsArrayStore,
    envelope: dict,
    fault: str | None,
) -> tuple[dict, int]:
    """(reply envelope, bytes stored): the reply's weights and logits go to this client's
    outbox, after any injected damage to the reply or its objects."""
    if fault in faults.CORRUPTING:
        faults.corrupt_reply(reply, fault)
    reply.metadata.__dict__["_message_id"] = f"{msg.metadata.message_id}.reply"
    run, server_round = envelope["run"], envelope["round"]
    with damaging(store, fault) as target:
        return wire.encode(
            reply,
            run=run,
            server_round=server_round,
            store=target,
            prefix=names.reply_prefix(client.root, run, server_round, msg.metadata.message_type),
            always_store=STORED_REPLY_RECORDS,
        )
