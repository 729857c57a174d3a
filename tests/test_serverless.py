"""The serverless runtime against real emulators (fake-gcs-server, Google's Firestore emulator,
functions-framework processes of `cloud/main.py`): the stores, the wire format, the client
function's HTTP boundary, `flwr-kd cloud emulate` end to end (FedDF and FedMD), a client
function killed mid-round, and a killed driver resumed with `cloud run --resume`.

Fixtures (emulators, a deployment of function processes) live in `serverless_fixtures.py`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest
import requests
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

pytest.register_assert_rewrite("serverless_fixtures")  # it is also a plugin (below)
from serverless_fixtures import (
    ARCHS,
    CLIENT_IDS,
    DEPLOY_BUCKET,
    EMULATE_BUCKET,
    MAX_BODY_BYTES,
    REPO,
    arch_of,
    ensure_bucket,
    experiment_flags,
    invocation_docs,
    list_objects,
    storage_client,
    wait_for,
)

from flwr_kd import protocol
from flwr_kd.cli import main
from flwr_kd.experiment import ExperimentConfig
from flwr_kd.serverless import names, wire
from flwr_kd.serverless.arraystore import (
    AlreadyExists,
    ArrayStoreError,
    GcsArrayStore,
    GcsStateStore,
)
from flwr_kd.serverless.callrecords import (
    COMPUTE,
    FROM_RECORD,
    REFUSED,
    read_history,
    took_over_event,
)
from flwr_kd.serverless.emulate import stack_policy
from flwr_kd.serverless.functions.claims import claim_call, finish_call
from flwr_kd.serverless.functions.env import FunctionEnv, ServedClient
from flwr_kd.serverless.functions.errors import HttpError
from flwr_kd.serverless.names import node_id_for
from flwr_kd.serverless.roundstore import DONE, RUNNING, RoundStore
from flwr_kd.serverless.trust import UntrustedReply, trusted_reply

# the fixtures (emulators, cloud_env, deployment, live_deployment)
pytest_plugins = ["serverless_fixtures"]

pytestmark = pytest.mark.usefixtures("cloud_env")

STORES_BUCKET = "kd-tests-stores"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def store(cloud_env) -> GcsArrayStore:
    ensure_bucket(STORES_BUCKET)
    return GcsArrayStore(STORES_BUCKET)


@pytest.fixture
def raw_bucket(store):
    """The bucket through the plain client, for writes behind the store's back."""
    return storage_client().bucket(STORES_BUCKET)


def assert_same_arrays(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(got[key], value)


# ===================================================================== array store (GCS)


def test_array_store_round_trip_is_checksummed(store):
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "n": np.arange(5),
        "scalar": np.asarray(7),
    }
    name = f"{unique('rt')}/arrays.npz"
    written = store.put(name, arrays, metadata={"kind": "test"})
    blob = storage_client().bucket(STORES_BUCKET).get_blob(name)
    assert written == blob.size > 0
    data = blob.download_as_bytes()
    assert blob.metadata == {"sha256": hashlib.sha256(data).hexdigest(), "kind": "test"}
    assert_same_arrays(store.get(name), arrays)
    assert store.exists(name) and not store.exists(name + ".missing")
    assert store.list(name.split("/")[0]) == [name]


def test_put_is_create_only(store):
    name = f"{unique('co')}/arrays.npz"
    store.put(name, {"v": np.zeros(3)})
    with pytest.raises(AlreadyExists, match="already exists"):
        store.put(name, {"v": np.ones(3)})
    assert_same_arrays(store.get(name), {"v": np.zeros(3)})


def test_object_overwritten_out_of_band_fails_its_checksum(store, raw_bucket):
    name = f"{unique('tamper')}/arrays.npz"
    store.put(name, {"v": np.arange(4)})
    old = raw_bucket.get_blob(name).metadata["sha256"]
    buf = io.BytesIO()
    np.savez(buf, v=np.arange(4) * 10)  # a valid archive, other contents, the old checksum
    blob = raw_bucket.blob(name)
    blob.metadata = {"sha256": old}
    blob.upload_from_string(buf.getvalue())
    with pytest.raises(ArrayStoreError, match="checksum"):
        store.get(name)


def test_truncated_object_fails_its_checksum(store, raw_bucket):
    name = f"{unique('trunc')}/arrays.npz"
    store.put(name, {"v": np.arange(100)})
    blob = raw_bucket.get_blob(name)
    meta, data = blob.metadata, blob.download_as_bytes()
    blob = raw_bucket.blob(name)
    blob.metadata = meta
    blob.upload_from_string(data[: len(data) // 2])
    with pytest.raises(ArrayStoreError, match="checksum"):
        store.get(name)


def test_missing_object_is_named(store):
    name = f"{unique('missing')}/arrays.npz"
    with pytest.raises(
        ArrayStoreError, match=re.escape(f"gs://{STORES_BUCKET}/{name} does not exist")
    ):
        store.get(name)


@pytest.mark.parametrize(
    "name",
    [
        "../escape.npz",
        "a/../../b.npz",
        "/absolute.npz",
        "with space.npz",
        "semi;colon.npz",
        "",
        "x\n.npz",
        "ünï.npz",
    ],
)
def test_unsafe_names_are_rejected_before_any_request(store, name):
    before = list_objects(STORES_BUCKET)
    for call in (
        lambda: store.put(name, {"v": np.zeros(1)}),
        lambda: store.get(name),
        lambda: store.exists(name),
    ):
        with pytest.raises(ArrayStoreError, match="unsafe object name"):
            call()
    assert list_objects(STORES_BUCKET) == before


def test_archive_with_an_object_array_is_refused_on_read(store, raw_bucket):
    """An object array needs pickle to load: a crafted archive (with a correct checksum) is
    refused instead of unpickled."""
    name = f"{unique('pickle')}/arrays.npz"
    buf = io.BytesIO()
    np.savez(buf, o=np.array([{"payload": 1}], dtype=object))
    data = buf.getvalue()
    blob = raw_bucket.blob(name)
    blob.metadata = {"sha256": hashlib.sha256(data).hexdigest()}
    blob.upload_from_string(data)
    with pytest.raises(ArrayStoreError, match="not a plain .npz archive"):
        store.get(name)


def test_put_refuses_object_arrays_and_writes_nothing(store):
    name = f"{unique('pickle-put')}/arrays.npz"
    with pytest.raises(ArrayStoreError):
        store.put(name, {"o": np.array([{"payload": 1}], dtype=object)})
    assert not store.exists(name)


def test_state_store_replaces_only_the_generation_it_read(store):
    prefix = f"{unique('state')}/clients/c0/state"
    a, b = GcsStateStore(store, prefix), GcsStateStore(store, prefix)
    assert a.load("node-1") is None and b.load("node-1") is None  # both: generation 0
    a.save("node-1", {"w": np.full(2, 1.0)})
    with pytest.raises(ArrayStoreError, match="changed concurrently"):
        b.save("node-1", {"w": np.full(2, 2.0)})  # b still holds generation 0 (must not exist)
    assert_same_arrays(b.load("node-1"), {"w": np.full(2, 1.0)})
    b.save("node-1", {"w": np.full(2, 3.0)})  # now at the current generation
    a.save("node-1", {"w": np.full(2, 4.0)})  # a's save without a load reads the generation first
    assert_same_arrays(GcsStateStore(store, prefix).load("node-1"), {"w": np.full(2, 4.0)})
    assert store.list(prefix) == [f"{prefix}/node-1.npz"]


# ==================================================================== round store (Firestore)


def test_create_run_twice_names_resume():
    rounds, run = RoundStore(), unique("run")
    rounds.create_run(run, {"num-clients": 3}, "feddf")
    with pytest.raises(ValueError, match=f"--resume {run}"):
        rounds.create_run(run, {"num-clients": 4}, "fedmd")
    doc = rounds.get_run(run)
    assert (doc["status"], doc["strategy"], doc["last_done_round"], doc["config"]) == (
        RUNNING,
        "feddf",
        0,
        {"num-clients": 3},
    )
    with pytest.raises(KeyError, match="no run"):
        rounds.get_run(unique("absent"))


def test_a_call_is_claimed_once_per_attempt_and_answered_from_its_record(store):
    """The function side of the call records (create-only objects, no Firestore): each request
    creates the next attempt; one that finds an earlier attempt unfinished is refused (409)
    unless the function runs one instance; a finished call answers from its record."""
    run, root = unique("claims"), "clients/client-0/"
    records = names.client_call_records(root, run, 1, protocol.TRAIN)
    first = claim_call(store, records, "m1", "driver@x", one_instance=False)
    assert (first.attempt, first.recorded) == (1, None)
    with pytest.raises(HttpError, match="in progress") as refused:
        claim_call(store, records, "m1", "driver@x", one_instance=False)
    assert refused.value.status == 409
    history = read_history(store, records)
    assert [a["action"] for a in history.attempts] == [COMPUTE, REFUSED] and history.reply is None
    took_over = claim_call(store, records, "m1", None, one_instance=True)
    assert (took_over.attempt, took_over.events) == (3, [took_over_event(3)])
    finish_call(store, took_over, {"status": DONE, "message_id": "m1", "reply": {"r": 1}})
    again = claim_call(store, records, "m1", "driver@x", one_instance=False)
    assert (again.attempt, again.recorded["reply"], again.recorded["attempt"]) == (4, {"r": 1}, 3)
    with pytest.raises(AlreadyExists):  # nothing of a call is ever replaced
        store.put_json(names.attempt_object(records, 1), {"forged": True})
    other = names.client_call_records(root, run, 2, protocol.TRAIN)  # another round
    assert claim_call(store, other, "m2", None, one_instance=False).attempt == 1
    assert store.list(f"{root}outbox/{run}/") == sorted(
        [names.attempt_object(records, n) for n in (1, 2, 3, 4)]
        + [names.reply_object(records), names.attempt_object(other, 1)]
    )


def test_finish_round_marks_done_and_stores_state():
    rounds, run = RoundStore(), unique("run")
    rounds.create_run(run, {}, "feddf")
    rounds.start_round(run, 1)
    assert rounds.rounds(run)[0]["status"] == RUNNING
    rounds.finish_round(run, 1, {"replies": 3}, {"arrays": names.global_object(run, 1), "round": 1})
    (doc,) = rounds.rounds(run)
    assert (
        (doc["status"], doc["round"], doc["replies"]) == (DONE, 1, 3)
        and "ended" in doc
        and "started" in doc
    )
    run_doc = rounds.get_run(run)
    assert run_doc["last_done_round"] == 1
    assert run_doc["state"] == {"arrays": f"runs/{run}/global/1.npz", "round": 1}
    rounds.start_round(run, 2)
    rounds.fail_round(run, 2, "RuntimeError: boom")
    assert [(d["round"], d["status"]) for d in rounds.rounds(run)] == [(1, DONE), (2, "failed")]
    assert rounds.get_run(run)["last_done_round"] == 1


def test_a_function_serves_its_own_client_or_the_pool_client_a_message_names():
    isolated = FunctionEnv("b", "resnet10t", client_id="c1", data_prefix="clients/c1/data/x/")
    assert isolated.serving(None) == ServedClient("c1", "clients/c1/", "clients/c1/data/x/")
    assert isolated.serving("c1").root == "clients/c1/"
    with pytest.raises(HttpError, match="message for client 'c2', this is 'c1'"):
        isolated.serving("c2")
    pool = FunctionEnv("b", "resnet10t", pool="resnet10t")
    assert pool.serving("c7") == ServedClient(
        "c7", "pools/resnet10t/clients/c7/", "pools/resnet10t/clients/c7/data/"
    )
    for bad in (None, "", "../c1", "a/b", 7):
        with pytest.raises(HttpError, match="needs the envelope's 'client'"):
            pool.serving(bad)


# ================================================================================= wire


def make_message(records: dict, dst: int, message_type: str, message_id: str) -> Message:
    msg = Message(RecordDict(records), dst_node_id=dst, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = message_id  # as CloudFunctionGrid sets it
    return msg


@pytest.mark.usefixtures("server_task_identity")
def test_wire_round_trip_offloads_only_large_records(store):
    run, rng = unique("wire"), np.random.default_rng(1)
    big = {"w": rng.standard_normal((200, 100)).astype(np.float32), "b": np.arange(3)}  # ~80 KB
    small = {"x": np.arange(10, dtype=np.int16)}
    msg = make_message(
        {
            "big": ArrayRecord({k: Array(v) for k, v in big.items()}),
            "small": ArrayRecord({k: Array(v) for k, v in small.items()}),
            "config": ConfigRecord({"arch": "resnet10t", "server-round": 1}),
        },
        dst=42,
        message_type="train",
        message_id=f"{run}.r1.client-0.train",
    )
    prefix = f"clients/client-0/inbox/{run}/1/{run}.r1.client-0.train"
    body, written = wire.encode(msg, run=run, server_round=1, store=store, prefix=prefix)
    assert body["objects"] == {"big": f"{prefix}/big.npz"}
    assert (body["version"], body["run"], body["round"]) == (1, run, 1)
    assert store.list(f"clients/client-0/inbox/{run}/") == [f"{prefix}/big.npz"]
    assert (
        written
        == storage_client().bucket(STORES_BUCKET).get_blob(f"{prefix}/big.npz").size
        > 80_000
    )
    assert len(wire.to_json(body)) < 10_000  # the large record travels by reference only

    back = wire.decode(json.loads(wire.to_json(body)), store)
    assert (back.metadata.dst_node_id, back.metadata.message_type, back.metadata.message_id) == (
        42,
        "train",
        msg.metadata.message_id,
    )
    assert_same_arrays({k: v.numpy() for k, v in back.content["big"].items()}, big)
    assert_same_arrays({k: v.numpy() for k, v in back.content["small"].items()}, small)
    assert dict(back.content["config"]) == {"arch": "resnet10t", "server-round": 1}

    again, written_again = wire.encode(msg, run=run, server_round=1, store=store, prefix=prefix)
    assert (again, written_again) == (body, 0)  # a retry reuses the object it wrote


@pytest.mark.usefixtures("server_task_identity")
def test_wire_small_message_travels_inline(store):
    run = unique("wire")
    msg = make_message(
        {"small": ArrayRecord({"x": Array(np.arange(10))})},
        dst=7,
        message_type="query.architecture",
        message_id="m",
    )
    body, written = wire.encode(
        msg, run=run, server_round=0, store=store, prefix=f"clients/c/inbox/{run}/0/m"
    )
    assert (body["objects"], written) == ({}, 0)
    assert store.list(f"clients/c/inbox/{run}/") == []
    np.testing.assert_array_equal(
        wire.decode(body, store).content["small"]["x"].numpy(), np.arange(10)
    )


GOOD_ENVELOPE = {"version": 1, "run": "r", "round": 1, "message": "", "objects": {}}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("not-a-dict", "JSON object"),
        ({"version": 2}, "version"),
        ({"version": None}, "version"),
        ({"run": None}, "'run'"),
        ({"run": 3}, "'run'"),
        ({"run": ""}, "'run'"),
        ({"run": "a/b"}, "'run'"),
        ({"round": "1"}, "'round'"),
        ({"round": True}, "'round'"),
        ({"round": 1.0}, "'round'"),
        ({"round": -1}, "'round'"),
        ({"message": None}, "'message'"),
        ({"message": 5}, "'message'"),
        ({"objects": []}, "'objects'"),
        ({"objects": None}, "'objects'"),
    ],
)
def test_parse_envelope_names_the_bad_field(change, named):
    body = [GOOD_ENVELOPE] if change == "not-a-dict" else {**GOOD_ENVELOPE, **change}
    with pytest.raises(wire.WireError, match=re.escape(named)):
        wire.parse_envelope(body)


@pytest.mark.usefixtures("server_task_identity")
def test_the_driver_believes_only_what_the_addressed_client_could_have_written(store):
    run, root = unique("trust"), "clients/client-1/"
    own_outbox = names.reply_prefix(root, run, 1, protocol.TRAIN)
    sent = make_message(
        {"config": ConfigRecord({"server-round": 1})},
        dst=node_id_for("client-1"),
        message_type=protocol.TRAIN,
        message_id=f"{run}.r1.client-1.train",
    )
    logits = RecordDict({"logits": ArrayRecord({"logits": Array(np.ones((4, 10), np.float16))})})

    def answer(reply: Message, prefix: str = own_outbox, stored=("logits",)) -> dict:
        body, _ = wire.encode(
            reply, run=run, server_round=1, store=store, prefix=prefix, always_store=stored
        )
        return body

    def reply_to(node: int, message_id: str) -> Message:
        return Message(RecordDict({}), reply_to=make_message({}, node, "train", message_id))

    good = answer(Message(logits, reply_to=sent))
    assert good["objects"] == {"logits": f"{root}outbox/{run}/1/train/logits.npz"}
    check = functools.partial(
        trusted_reply,
        sent=sent,
        client_id="client-1",
        root=root,
        run=run,
        server_round=1,
        store=store,
    )
    assert check(good).content["logits"]["logits"].numpy().shape == (4, 10)
    other_outbox = f"clients/client-2/outbox/{run}/1/train"
    refused = {
        "outside client client-1's outbox": answer(Message(logits, reply_to=sent), other_outbox),
        "reply for run": {**good, "round": 2},
        "sent inline": answer(Message(logits, reply_to=sent), stored=()),
        "reply from node 5": answer(reply_to(5, sent.metadata.message_id)),
        "reply to message 'other'": answer(reply_to(node_id_for("client-1"), "other")),
        "not a reply envelope": {**good, "version": 7},
    }
    for reason, payload in refused.items():
        with pytest.raises(UntrustedReply, match=re.escape(reason)):
            check(payload)


@pytest.mark.usefixtures("server_task_identity")
def test_decode_names_bad_message_and_objects(store):
    with pytest.raises(wire.WireError, match="field 'message'"):
        wire.decode({**GOOD_ENVELOPE, "message": "not base64 !!"}, store)
    msg = make_message(
        {"config": ConfigRecord({"a": 1})}, dst=1, message_type="train", message_id="m"
    )
    body, _ = wire.encode(msg, run="r", server_round=1, store=store, prefix="clients/c/inbox/r/1/m")
    with pytest.raises(wire.WireError, match="record 'arrays'"):
        wire.decode({**body, "objects": {"arrays": 5}}, store)


# ====================================================================== function boundary


def post(url: str, data: bytes, content_type: str | None = "application/json") -> requests.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return requests.post(url, data=data, headers=headers, timeout=120)


@functools.lru_cache(maxsize=1)
def deployed_data_config() -> dict:
    from flwr_kd.cli import _parser, config_from_args

    return config_from_args(
        _parser().parse_args(["cloud", "run", *experiment_flags()])
    ).data_spec.to_config()


def envelope(
    run: str,
    *,
    to: str = "client-0",
    arch: str | None = None,
    server_round: int = 0,
    message_type: str = protocol.DESCRIBE,
    objects: dict | None = None,
    message_id: str | None = None,
    records: dict | None = None,
    config: dict | None = None,
    inbox_of: str | None = "client-0",
) -> bytes:
    """A client message as the driver sends it (Flower proto in the JSON envelope), for the data
    split the `deployment` fixture uploaded; `records` are added to its content (inline) and
    `config` to its config. As the driver does, it is put into the inbox of `inbox_of` (the
    client function it is posted to; None: nowhere, so the function knows no such message)."""
    config = {
        **deployed_data_config(),
        "server-round": server_round,
        **({"arch": arch} if arch else {}),
        **(config or {}),
    }
    msg = make_message(
        {protocol.CONFIG: ConfigRecord(config), **(records or {})},
        dst=node_id_for(to),
        message_type=message_type,
        message_id=message_id or f"{run}.r{server_round}.{to}.{message_type}",
    )
    body, _ = wire.encode(msg, run=run, server_round=server_round, store=None, prefix="unused")
    body = {**body, "objects": objects or {}}
    if inbox_of is not None:
        sent = names.message_object(
            names.client_root(inbox_of), run, server_round, msg.metadata.message_id
        )
        with contextlib.suppress(AlreadyExists):
            GcsArrayStore(DEPLOY_BUCKET).put_json(sent, body)
    return wire.to_json(body)


@pytest.fixture(scope="module")
def boundary_run(deployment) -> str:
    run = unique("boundary")
    RoundStore().create_run(run, {"num-server-rounds": 3}, "feddf")
    return run


def boundary_case(case: str, run: str) -> tuple[bytes, str | None, int, list[str]]:
    """(body, content type, expected status, words the error must contain)."""
    js = "application/json"
    if case == "malformed-json":
        return b'{"version": 1, "run": ', js, 400, ["malformed JSON"]
    if case == "empty-body":
        return b"", js, 400, ["empty body"]
    if case == "not-json-content-type":
        return (
            envelope(run),
            "text/plain",
            415,
            ["content type must be application/json", "text/plain"],
        )
    if case == "no-content-type":
        return envelope(run), None, 415, ["content type must be application/json"]
    if case == "oversized":
        return b" " * (MAX_BODY_BYTES + 1), js, 413, [str(MAX_BODY_BYTES + 1), str(MAX_BODY_BYTES)]
    if case == "not-an-object":
        return b"[1, 2]", js, 400, ["JSON object"]
    if case == "bad-version":
        return (
            json.dumps({**json.loads(envelope(run)), "version": 9}).encode(),
            js,
            400,
            ["version 9"],
        )
    if case == "missing-round":
        body = json.loads(envelope(run))
        del body["round"]
        return json.dumps(body).encode(), js, 400, ["field 'round'"]
    if case == "bad-message":
        return (
            json.dumps({**json.loads(envelope(run)), "message": "%%%"}).encode(),
            js,
            400,
            ["field 'message'"],
        )
    if case == "unknown-run":  # nothing in the inbox of this run
        other = unique("no-such-run")
        return envelope(other, inbox_of=None), js, 404, [f"unknown run '{other}'"]
    if case == "other-node":
        return (
            envelope(run, to="client-1"),
            js,
            400,
            [f"addressed to node {node_id_for('client-1')}", "'client-0'"],
        )
    if case == "wrong-architecture":
        return (
            envelope(run, arch="test_vit"),
            js,
            400,
            ["architecture 'test_vit'", "runs 'resnet10t'"],
        )
    if case == "wrong-shaped-weights":  # a train message whose weights are not resnet10t's
        weights = ArrayRecord({"conv1.weight": Array(np.zeros((2, 2), np.float32))})
        return (
            envelope(
                run,
                arch="resnet10t",
                message_type=protocol.TRAIN,
                records={protocol.ARRAYS: weights},
            ),
            js,
            400,
            ["weights do not fit 'resnet10t'"],
        )
    if case == "wrong-shaped-public":  # public inputs of another image size
        public = ArrayRecord({"x": Array(np.zeros((4, 1, 28, 28), np.float32))})
        return (
            envelope(
                run,
                arch="resnet10t",
                message_type=protocol.TRAIN,
                records={protocol.PUBLIC: public},
            ),
            js,
            400,
            ["public inputs must have shape (n, 1, 16, 16)", "(4, 1, 28, 28)"],
        )
    if case == "unknown-round":  # the boundary run sent nothing in round 4
        return (
            envelope(run, server_round=4, inbox_of=None),
            js,
            404,
            [f"run '{run}' or round 4", f"clients/client-0/inbox/{run}/4/"],
        )
    if case == "bad-fault-settings":  # fault injection asked for with a kind that does not exist
        return (
            envelope(run, arch="resnet10t", config={"fail-rate": 0.5, "fail-kinds": "meteor"}),
            js,
            400,
            ["bad fault-injection settings", "meteor"],
        )
    own = f"clients/client-0/inbox/{run}/0/"
    if case == "object-outside-messages":  # e.g. another client's private data
        return (
            envelope(run, objects={"arrays": "clients/client-1/data/private.npz"}),
            js,
            403,
            [f"must lie under {own}"],
        )
    if case == "object-of-another-client":
        obj = f"clients/client-1/inbox/{run}/0/m/arrays.npz"
        return envelope(run, objects={"arrays": obj}), js, 403, [f"must lie under {own}"]
    if case == "object-of-another-round":
        obj = f"clients/client-0/inbox/{run}/1/m/arrays.npz"
        return envelope(run, objects={"arrays": obj}), js, 403, [f"must lie under {own}"]
    if case == "object-not-a-string":
        return envelope(run, objects={"arrays": 5}), js, 403, [f"must lie under {own}"]
    if case == "missing-object":
        obj = f"clients/client-0/inbox/{run}/0/x/arrays.npz"
        return envelope(run, objects={"arrays": obj}), js, 400, [obj, "does not exist"]
    raise AssertionError(case)


BOUNDARY_CASES = [
    "malformed-json",
    "empty-body",
    "not-json-content-type",
    "no-content-type",
    "oversized",
    "not-an-object",
    "bad-version",
    "missing-round",
    "bad-message",
    "unknown-run",
    "other-node",
    "wrong-architecture",
    "object-outside-messages",
    "object-of-another-client",
    "object-of-another-round",
    "object-not-a-string",
    "missing-object",
    "wrong-shaped-weights",
    "wrong-shaped-public",
    "bad-fault-settings",
    "unknown-round",
]


@pytest.mark.usefixtures("server_task_identity")
@pytest.mark.parametrize("case", BOUNDARY_CASES)
def test_client_function_rejects_bad_requests_before_writing(live_deployment, boundary_run, case):
    body, content_type, status, words = boundary_case(case, boundary_run)
    objects_before = list_objects(DEPLOY_BUCKET)
    resp = post(live_deployment.clients["client-0"].url, body, content_type)
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    payload = resp.json()
    assert list(payload) == ["error"], payload
    for word in words:
        assert word in payload["error"], payload["error"]
    assert list_objects(DEPLOY_BUCKET) == objects_before  # no call record, no reply
    assert invocation_docs(boundary_run, 4) == {}
    if case == "unknown-run":  # nor is the unknown run created
        run = json.loads(body)["run"]
        with pytest.raises(KeyError):
            RoundStore().get_run(run)
        assert invocation_docs(run, 2) == {}


@pytest.mark.usefixtures("server_task_identity")
def test_client_function_answers_a_repeated_message_from_its_record(live_deployment):
    """The control for the test above: a good message is answered and recorded once (in the
    client's own call records); the same message again gets the same answer, from the record
    (attempts counted)."""
    run = unique("control")
    url = live_deployment.clients["client-0"].url
    records = names.client_call_records("clients/client-0/", run, 0, protocol.DESCRIBE)
    first = post(url, envelope(run, arch="resnet10t"))
    assert first.status_code == 200, first.text
    reply = wire.decode(first.json(), GcsArrayStore(DEPLOY_BUCKET))
    assert not reply.has_error(), reply.error.reason
    assert reply.metadata.src_node_id == node_id_for("client-0")
    assert str(reply.content[protocol.CONFIG]["arch"]) == "resnet10t"
    assert int(reply.content[protocol.METRICS]["num-examples"]) > 0
    history = read_history(GcsArrayStore(DEPLOY_BUCKET), records)
    doc = history.reply
    assert (doc["message_id"], doc["status"], len(history.attempts)) == (
        f"{run}.r0.client-0.query.architecture",
        DONE,
        1,
    )
    assert doc["seconds"]["total"] >= doc["seconds"]["compute"] >= 0
    second = post(url, envelope(run, arch="resnet10t"))
    assert second.status_code == 200 and second.json() == first.json()
    history = read_history(GcsArrayStore(DEPLOY_BUCKET), records)
    assert [a["action"] for a in history.attempts] == [COMPUTE, FROM_RECORD]


@pytest.mark.usefixtures("server_task_identity")
def test_retry_after_an_instance_crashed_mid_call_is_served(live_deployment):
    """An instance that dies mid-call (OOM, crash) leaves its attempt unfinished (no reply).
    A retry of the same message two hours later (past any function timeout) must be served,
    not refused as 'in progress' (409), which the grid retries until it gives up."""
    run = unique("crashed")
    message_id = f"{run}.r0.client-0.{protocol.DESCRIBE}"
    records = names.client_call_records("clients/client-0/", run, 0, protocol.DESCRIBE)
    started = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=2)
    GcsArrayStore(DEPLOY_BUCKET).put_json(
        names.attempt_object(records, 1),
        {"attempt": 1, "message_id": message_id, "action": COMPUTE, "started": started.isoformat()},
    )
    resp = post(
        live_deployment.clients["client-0"].url,
        envelope(run, arch="resnet10t", message_id=message_id),
    )
    assert resp.status_code == 200, resp.text


# ======================================================================== end to end: emulate


def run_object_patterns(run: str) -> list[re.Pattern]:
    """Every object a run may leave (docs/serverless.md, "Cloud Storage layout")."""
    run, types = re.escape(run), r"(query\.architecture|train|train\.fedmd)"
    message = rf"(?P<c>client-\d)/inbox/{run}/(?P<r>\d+)/{run}\.r(?P=r)\.(?P=c)\.{types}"
    reply = r"(query-architecture|train|train-fedmd)/(arrays|logits)\.npz"
    task = r"(task-(distill|train)-\d+|student|pretrained)\.npz"
    call_record = r"(attempt-\d+|reply)\.json"
    return [
        re.compile(p)
        for p in (
            # message records and envelopes (driver), in the client's inbox
            rf"clients/{message}/((arrays|public|consensus)\.npz|envelope\.json)",
            # reply records and call records (the client), in its outbox
            rf"clients/client-\d/outbox/{run}/\d+/{reply}",
            rf"clients/client-\d/outbox/{run}/\d+/calls/{types}/{call_record}",
            # aggregation tasks (driver), results and call records (aggregator)
            rf"aggregators/{run}/\d+/[A-Za-z0-9_]+/{task}",
            rf"aggregators/{run}/\d+/[A-Za-z0-9_]+/calls/task-(distill|train)-\d+/{call_record}",
            rf"runs/{run}/global/\d+\.npz",  # the driver's only
            rf"public/runs/{run}/pretrained-[A-Za-z0-9_]+\.npz",  # FedMD's, for every client
        )
    ]


def expected_invocations(strategy: str, num_rounds: int) -> dict[int, set[str]]:
    expected = {0: {f"{c}:query.architecture" for c in CLIENT_IDS}}
    for r in range(1, num_rounds + 1):
        if strategy == "feddf":
            expected[r] = {f"{c}:train" for c in CLIENT_IDS} | {
                f"aggregator:{a}:task-distill-{i}" for i, a in enumerate(ARCHS)
            }
        else:
            expected[r] = {f"{c}:train.fedmd" for c in CLIENT_IDS}
    if strategy == "fedmd":  # transfer learning on the aggregators, then the init phase
        expected[0] |= {f"{c}:train.fedmd" for c in CLIENT_IDS} | {
            f"aggregator:{a}:task-train-{i}" for i, a in enumerate(ARCHS)
        }
    return expected


def check_result(
    result: dict, run: str, bucket: str, strategy: str, rounds: list[int], resumed_after: int = 0
) -> None:
    """result.json of a serverless run: simulate's report plus the serverless summary."""
    assert result["config"]["strategy"] == strategy and result["config"]["num-clients"] == 3
    assert result["architectures"] == {"resnet10t": 2, "test_vit": 1}
    assert [row["round"] for row in result["rounds"]] == rounds
    for row in result["rounds"]:
        assert set(row["accuracy"]) == set(ARCHS), row
        assert all(0.0 <= v <= 1.0 for v in row["accuracy"].values()), row
    serverless = result["serverless"]
    assert (serverless["run"], serverless["bucket"], serverless["resumed_after_round"]) == (
        run,
        bucket,
        resumed_after,
    )
    inv = serverless["invocations"]
    for key in (
        "calls",
        "failed_calls",
        "mean_call_seconds",
        "mean_compute_seconds",
        "mean_overhead_seconds",
        "overhead_share",
        "bytes_per_round",
    ):
        assert key in inv, key
    assert inv["mean_call_seconds"] >= inv["mean_compute_seconds"] > 0
    assert inv["mean_overhead_seconds"] == pytest.approx(
        inv["mean_call_seconds"] - inv["mean_compute_seconds"], abs=1e-3
    )
    assert 0 <= inv["overhead_share"] < 1
    assert all(b > 0 for b in inv["bytes_per_round"].values()), inv["bytes_per_round"]


def check_stores(
    run: str, bucket: str, strategy: str, num_rounds: int
) -> dict[int, dict[str, dict]]:
    """Firestore and Cloud Storage after a finished run; returns the invocation documents."""
    rounds = RoundStore()
    run_doc = rounds.get_run(run)
    assert (run_doc["status"], run_doc["strategy"], run_doc["last_done_round"]) == (
        DONE,
        strategy,
        num_rounds,
    )
    assert run_doc["state"] == {
        "arrays": f"runs/{run}/global/{num_rounds}.npz",
        "round": num_rounds,
    }
    assert set(run_doc["result"]["final_accuracy"]) == set(ARCHS)
    round_docs = rounds.rounds(run)
    assert [(d["round"], d["status"]) for d in round_docs] == [
        (r, DONE) for r in range(1, num_rounds + 1)
    ]
    for doc in round_docs:
        assert (
            doc["replies"] == 3
            and doc["dropped"] == []
            and doc["bytes"]["down"] > 0
            and doc["bytes"]["up"] > 0
        )

    docs = invocation_docs(run, num_rounds)
    assert {r: set(d) for r, d in docs.items()} == expected_invocations(strategy, num_rounds)
    everything = list_objects(bucket)
    objects = {o for o in everything if f"/{run}/" in o}  # this run's
    for r, by_id in docs.items():
        for call, doc in by_id.items():
            assert doc["status"] == DONE and "error" not in doc, (r, call, doc)
            assert doc["seconds"]["total"] >= doc["seconds"]["compute"] > 0, (r, call)
            assert set(doc["objects"]) <= objects, (r, call, doc["objects"])

    patterns = run_object_patterns(run)
    unexpected = [o for o in objects if not any(p.fullmatch(o) for p in patterns)]
    assert not unexpected, unexpected
    for name in everything:  # nothing outside the documented prefixes
        assert re.fullmatch(
            r"public/([0-9a-f]{16}/(data|test)\.npz|runs/.+)"
            r"|clients/[\w.-]+/(data/[0-9a-f]{16}/private\.npz|state/node-\d+\.npz"
            r"|inbox/.+|outbox/.+)|aggregators/.+|runs/.+",
            name,
        ), name

    store = GcsArrayStore(bucket)
    for r in range(1, num_rounds + 1):
        assert f"runs/{run}/global/{r}.npz" in objects
    if strategy == "feddf":
        for r in range(1, num_rounds + 1):
            glob = store.get(f"runs/{run}/global/{r}.npz")
            for c in CLIENT_IDS:
                weights = f"clients/{c}/outbox/{run}/{r}/train/arrays.npz"
                assert weights in objects, weights
                logits = f"clients/{c}/outbox/{run}/{r}/train/logits.npz"
                assert docs[r][f"{c}:train"]["objects"] == sorted([weights, logits])
                assert store.get(logits)["logits"].shape == (100, 10)  # subset-size x classes
                arch = arch_of(c)
                assert set(store.get(weights)) == {
                    k.split("/", 1)[1] for k in glob if k.startswith(arch + "/")
                }
                # the global model (the round's public subset travels inline, as indices)
                message = f"clients/{c}/inbox/{run}/{r}/{run}.r{r}.{c}.train"
                assert f"{message}/arrays.npz" in objects and f"{message}/envelope.json" in objects
            for i, a in enumerate(ARCHS):
                assert f"aggregators/{run}/{r}/{a}/student.npz" in objects
                assert f"aggregators/{run}/{r}/{a}/task-distill-{i}.npz" in objects
    else:
        for i, a in enumerate(ARCHS):
            assert f"aggregators/{run}/0/{a}/pretrained.npz" in objects
            assert f"aggregators/{run}/0/{a}/task-train-{i}.npz" in objects
        for c in CLIENT_IDS:
            assert (
                f"clients/{c}/inbox/{run}/0/{run}.r0.{c}.train.fedmd/arrays.npz" in objects
            )  # pretrained weights
            state = f"clients/{c}/state/node-{node_id_for(c)}.npz"
            assert store.exists(state), state
    return docs


def run_cli(argv: list[str]) -> None:
    code = main(argv)
    assert code == 0


@pytest.fixture(scope="module")
def feddf_emulated(cloud_env, tmp_path_factory):
    run, out = unique("feddf"), tmp_path_factory.mktemp("feddf-emulate")
    run_cli(["cloud", "emulate", *experiment_flags("feddf", 2), "--run-id", run, "--out", str(out)])
    return run, json.loads((out / "result.json").read_text()), out


@pytest.fixture(scope="module")
def fedmd_emulated(cloud_env, tmp_path_factory):
    run, out = unique("fedmd"), tmp_path_factory.mktemp("fedmd-emulate")
    cache = tmp_path_factory.mktemp(
        "pretrain-cache"
    )  # empty: transfer learning runs on the aggregators
    run_cli(
        [
            "cloud",
            "emulate",
            *experiment_flags("fedmd", 2, "-c", f"cache-dir={cache}"),
            "--run-id",
            run,
            "--out",
            str(out),
        ]
    )
    return run, json.loads((out / "result.json").read_text())


def test_emulate_feddf_end_to_end(feddf_emulated):
    run, result, out = feddf_emulated
    check_result(result, run, EMULATE_BUCKET, "feddf", [1, 2])
    logs = out / "function-logs"  # kept beside result.json, not in a temporary folder
    assert (logs / "access.jsonl").stat().st_size > 0
    assert len(list(logs.glob("*.requests.log"))) == len(ARCHS) + 3  # a front end per function
    for row in result["rounds"]:
        assert row["replies"] == 3 and row["dropped"] == []
        assert set(row["distill"]) == set(ARCHS)
    inv = result["serverless"]["invocations"]
    assert (inv["calls"], inv["failed_calls"]) == (3 + 3 * 2, 0)  # describe once, train per round
    assert set(inv["bytes_per_round"]) == {"0", "1", "2"}
    calls = result["serverless"]["aggregator_calls"]
    assert sorted((c["round"], c["arch"], c["kind"]) for c in calls) == sorted(
        (r, a, "distill") for r in (1, 2) for a in ARCHS
    )
    docs = check_stores(run, EMULATE_BUCKET, "feddf", 2)
    # each call names the caller the front end verified: the driver's service account
    project = os.environ["GOOGLE_CLOUD_PROJECT"]
    driver = stack_policy(ExperimentConfig(), project).identities["driver"]
    assert {doc.get("caller") for by_id in docs.values() for doc in by_id.values()} == {driver}


def test_emulate_fedmd_end_to_end(fedmd_emulated):
    run, result = fedmd_emulated
    check_result(result, run, EMULATE_BUCKET, "fedmd", [1, 2])
    for row in result["rounds"]:
        assert row["replies"] == 3 and row["dropped"] == []
    assert set(result["transfer_learning"]["trained"]) == set(ARCHS)
    assert set(result["baselines"]["transfer_only"]) == set(ARCHS)
    inv = result["serverless"]["invocations"]
    assert (inv["calls"], inv["failed_calls"]) == (
        3 + 3 + 3 * 2,
        0,
    )  # describe, init, one per round
    calls = result["serverless"]["aggregator_calls"]
    assert sorted((c["round"], c["arch"], c["kind"]) for c in calls) == sorted(
        (0, a, "train") for a in ARCHS
    )
    check_stores(run, EMULATE_BUCKET, "fedmd", 2)


def test_client_logits_are_kept_in_cloud_storage(feddf_emulated):
    run, _, _ = feddf_emulated
    for r in (1, 2):
        for c in CLIENT_IDS:
            prefix = f"clients/{c}/outbox/{run}/{r}/"
            assert any("logits" in o for o in list_objects(EMULATE_BUCKET, prefix)), prefix


# ============================================================== `cloud run` on a deployment


def driver_argv(dep, tmp_path, *flags: str) -> list[str]:
    outputs = dep.write_outputs(tmp_path / "outputs.json")
    return [
        "cloud",
        "run",
        "--outputs",
        str(outputs),
        "--no-auth",
        "--skip-active-check",
        *flags,
    ]  # no Functions API locally


@pytest.mark.parametrize("kill_at", ["between-rounds", "aggregation"])
def test_resume_after_the_driver_is_killed(live_deployment, tmp_path, kill_at):
    """SIGKILLed in round 2 of 3 (as soon as round 1 is done, or while round 2's distillation
    runs on the aggregators): `--resume` continues at round 2 from round 1's global models,
    repeats no done round, round 2's client calls are answered from their records, not
    computed again, and result.json covers the whole run (round 1 from its round document)."""
    run = unique("resume")
    # while killed during distillation, a longer distillation keeps the kill inside that window
    flags = experiment_flags(
        "feddf", 3, *(["--distill-steps", "100"] if kill_at == "aggregation" else [])
    )
    log = tmp_path / "driver.log"
    argv = [
        sys.executable,
        "-m",
        "flwr_kd.cli",
        *driver_argv(
            live_deployment, tmp_path, *flags, "--run-id", run, "--out", str(tmp_path / "killed")
        ),
    ]
    rounds = RoundStore()

    def last_done() -> int:
        snap = rounds.run_ref(run).get()
        return snap.to_dict().get("last_done_round", 0) if snap.exists else 0

    with open(log, "wb") as out:
        driver = subprocess.Popen(
            argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        if kill_at == "between-rounds":
            killed_when = lambda: last_done() >= 1
        else:
            killed_when = lambda: any(
                d["id"].startswith("aggregator:") for d in rounds.invocations(run, 2)
            )
        wait_for(
            killed_when,
            240,
            f"{kill_at} of {run} (driver log: {log})",
            alive=lambda: driver.poll() is None,
            interval=0.2,
        )
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert last_done() == 1, (
        "the driver got past round 1 before it was killed; the test needs it killed in round 2"
    )
    assert rounds.get_run(run)["status"] == RUNNING
    assert not (tmp_path / "killed" / "result.json").exists()

    out = tmp_path / "resumed"
    run_cli(driver_argv(live_deployment, tmp_path, *flags, "--resume", run, "--out", str(out)))
    result = json.loads((out / "result.json").read_text())
    check_result(result, run, DEPLOY_BUCKET, "feddf", [1, 2, 3], resumed_after=1)
    first = RoundStore().rounds(run)[0]  # round 1, as the killed driver recorded it
    assert result["rounds"][0]["accuracy"] == first["scores"]["accuracy"]
    assert (result["rounds"][0]["replies"], result["rounds"][0]["dropped"]) == (3, [])
    assert sorted({c["round"] for c in result["serverless"]["aggregator_calls"]}) == [2, 3]
    docs = check_stores(run, DEPLOY_BUCKET, "feddf", 3)
    assert all(doc["attempts"] == 1 for doc in docs[1].values()), docs[
        1
    ]  # round 1 was not repeated
    # the resumed driver asked the architectures again and was answered from the records
    assert all(doc["attempts"] == 2 for doc in docs[0].values()), docs[0]
    if kill_at == "aggregation":  # round 2's clients had replied: the same replies, computed once
        assert all(docs[2][f"{c}:train"]["attempts"] == 2 for c in CLIENT_IDS), docs[2]
        assert all(not docs[2][f"{c}:train"].get("events") for c in CLIENT_IDS), docs[2]
    assert GcsArrayStore(DEPLOY_BUCKET).exists(f"runs/{run}/global/3.npz")


def test_a_run_with_another_data_split_gets_that_split(live_deployment, tmp_path):
    """The deployment holds the clients' partitions of `max-private=80`; a run of the same
    deployment with `max-private=40` must give each client its partition of *that* split (or
    refuse to run), not silently the old one."""
    from flwr_kd.cli import _parser, config_from_args
    from flwr_kd.data import load_federated

    run = unique("split")
    flags = experiment_flags("feddf", 1, "-c", "max-private=40")
    data = load_federated(
        config_from_args(_parser().parse_args(["cloud", "run", *flags])).data_spec
    )
    expected = {c: len(data.client_data(i)[0]) for i, c in enumerate(CLIENT_IDS)}
    try:
        code = main(
            driver_argv(
                live_deployment, tmp_path, *flags, "--run-id", run, "--out", str(tmp_path / "out")
            )
        )
    except (ValueError, ArrayStoreError):
        return  # refusing to run on a bucket holding another split is fine
    assert code == 0
    store = GcsArrayStore(DEPLOY_BUCKET)
    reported = {}
    for call in invocation_docs(run, 0)[0]:
        client = call.split(":")[0]
        records = names.client_call_records(names.client_root(client), run, 0, protocol.DESCRIBE)
        reply = wire.decode(read_history(store, records).reply["reply"], store)
        reported[client] = int(reply.content[protocol.METRICS]["num-examples"])
    assert reported == expected


def test_client_function_killed_mid_round_is_dropped(live_deployment, tmp_path):
    run, victim = unique("killed"), "client-2"
    rounds = RoundStore()
    killed = threading.Event()
    stop = threading.Event()

    def kill_when_round_2_starts():
        try:
            wait_for(lambda: stop.is_set() or rounds.round_ref(run, 2).get().exists, 240, "round 2")
        except AssertionError:
            return
        if not stop.is_set():
            live_deployment.clients[victim].proc.kill()
            killed.set()

    watcher = threading.Thread(target=kill_when_round_2_starts, daemon=True)
    watcher.start()
    out = tmp_path / "out"
    try:
        run_cli(
            driver_argv(
                live_deployment,
                tmp_path,
                *experiment_flags("feddf", 2),
                "--run-id",
                run,
                "--retries",
                "1",
                "--out",
                str(out),
            )
        )
    finally:
        stop.set()
        watcher.join()
    assert killed.is_set()
    result = json.loads((out / "result.json").read_text())
    check_result(result, run, DEPLOY_BUCKET, "feddf", [1, 2])
    first, second = result["rounds"]
    assert (first["replies"], first["dropped"]) == (3, [])
    assert second["replies"] == 2
    (dropped,) = second["dropped"]
    assert dropped["node"] == node_id_for(victim)
    assert victim in dropped["reason"] and "failed" in dropped["reason"], dropped
    assert result["serverless"]["invocations"]["failed_calls"] == 1

    assert [(d["round"], d["status"]) for d in rounds.rounds(run)] == [(1, DONE), (2, DONE)]
    assert rounds.get_run(run)["status"] == DONE
    docs = invocation_docs(run, 2)
    assert set(docs[1]) == expected_invocations("feddf", 2)[1]
    survivors = {f"{c}:train" for c in CLIENT_IDS if c != victim} | {
        f"aggregator:{a}:task-distill-{i}" for i, a in enumerate(ARCHS)
    }
    assert survivors <= set(docs[2])
    assert all(docs[2][call]["status"] == DONE for call in survivors)
    assert docs[2].get(f"{victim}:train", {}).get("status") != DONE  # never finished
    replies = [
        o
        for c in CLIENT_IDS
        for o in list_objects(DEPLOY_BUCKET, f"clients/{c}/outbox/{run}/2/")
        if "/calls/" not in o
    ]
    assert replies == sorted(
        f"clients/{c}/outbox/{run}/2/train/{record}.npz"
        for c in CLIENT_IDS
        if c != victim
        for record in ("arrays", "logits")
    )
    assert GcsArrayStore(DEPLOY_BUCKET).exists(f"runs/{run}/global/2.npz")


def test_an_aggregator_instance_that_dies_mid_task_is_retried(live_deployment, tmp_path):
    """The aggregator's instance (gunicorn's worker) is SIGKILLed while it distils round 1's
    resnet10t model: the driver retries the task, a new instance runs it, the round completes
    with that architecture distilled, and the student model is written once (create-only)."""
    import psutil

    run, arch = unique("agg-crash"), "resnet10t"
    rounds, killed, driver_done = RoundStore(), threading.Event(), threading.Event()
    task = names.aggregator_task_object(run, 1, arch, "distill", ARCHS.index(arch))
    call = names.aggregator_call(arch, task)
    first_attempt = names.attempt_object(names.aggregator_call_records(run, 1, arch, task), 1)

    def kill_the_worker_mid_task():
        def running():  # the aggregator claimed the task: it is computing now
            return driver_done.is_set() or GcsArrayStore(DEPLOY_BUCKET).exists(first_attempt)

        try:
            wait_for(running, 240, f"{call} running")
        except AssertionError:
            return
        if driver_done.is_set():  # the driver ended first: nothing left to kill
            return
        for worker in psutil.Process(live_deployment.aggregators[arch].proc.pid).children():
            worker.kill()
        killed.set()

    watcher = threading.Thread(target=kill_the_worker_mid_task, daemon=True)
    watcher.start()
    out = tmp_path / "out"
    flags = experiment_flags(
        "feddf", 1, "--distill-steps", "300"
    )  # a task long enough to be killed in
    try:
        run_cli(driver_argv(live_deployment, tmp_path, *flags, "--run-id", run, "--out", str(out)))
    finally:  # the watcher must not outlive the test (and the emulators' environment)
        driver_done.set()
        watcher.join()
    assert killed.is_set()
    result = json.loads((out / "result.json").read_text())
    assert result["rounds"][0]["replies"] == 3 and set(result["rounds"][0]["distill"]) == set(ARCHS)
    doc = invocation_docs(run, 1)[1][call]
    assert (doc["status"], doc["attempts"]) == (DONE, 2), doc
    assert list_objects(DEPLOY_BUCKET, f"aggregators/{run}/1/{arch}/student.npz") == [
        f"aggregators/{run}/1/{arch}/student.npz"
    ]
    assert [(d["round"], d["status"]) for d in rounds.rounds(run)] == [(1, DONE)]


def test_cloud_emulators_serves_both_until_stopped(tmp_path):
    """`flwr-kd cloud emulators` prints the environment of the emulators it started; they work
    (a run created, an object stored), and SIGTERM stops both."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flwr_kd.cli", "cloud", "emulators"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("export STORAGE_EMULATOR_HOST="), line
        env = dict(item.split("=", 1) for item in line.split()[1:])
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            RoundStore().create_run("served", {"k": 1}, "feddf")
            assert RoundStore().get_run("served")["config"] == {"k": 1}
            storage_client().create_bucket("served")
            GcsArrayStore("served").put("x.npz", {"a": np.arange(3)})
            np.testing.assert_array_equal(GcsArrayStore("served").get("x.npz")["a"], np.arange(3))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        for url in (env["STORAGE_EMULATOR_HOST"], "http://" + env["FIRESTORE_EMULATOR_HOST"]):
            with pytest.raises(requests.ConnectionError):
                requests.get(url, timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ------------------------------------------------------------------------- fuzzing the boundary

#: Seeds of the boundary fuzzer: each draws its own mutations, so a failure names the seed that
#: reproduces it (`fuzz_bodies(seed)`).
FUZZ_SEEDS = range(6)
FUZZ_BODIES_PER_SEED = 40


def random_json(rng, depth: int = 0):
    """A JSON value of any shape: scalars of every type and edge, strings of odd text, and
    containers nested a few levels."""
    kinds = ["null", "bool", "int", "float", "str", "list", "dict"]
    kind = rng.choice(kinds if depth < 4 else kinds[:5])
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64, rng.randint(-9, 9)])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e308, float("nan"), float("inf"), -0.0])
    if kind == "str":
        return rng.choice(
            ["", "x" * rng.randint(1, 5000), "../..", "gs://b/o", "\u0000\ud7ff", "%%%"]
        )
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["run", "round", "objects", "x", ""]): random_json(rng, depth + 1)}


def mutate(rng, value):
    """`value` with one random change somewhere inside: a field replaced, removed or added."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(sorted(value))
        out = dict(value)
        choice = rng.random()
        if choice < 0.15:
            del out[key]
        elif choice < 0.55:
            out[key] = random_json(rng)
        else:
            out[key] = mutate(rng, value[key])
        return out
    if isinstance(value, list) and value and rng.random() < 0.7:
        out = list(value)
        i = rng.randrange(len(out))
        out[i] = mutate(rng, out[i])
        return out
    return random_json(rng)


def fuzz_bodies(seed: int, valid: dict) -> list[bytes]:
    """Hostile bodies drawn from `seed`: mutations of a valid envelope (one to three changes),
    random JSON, and the shapes parsers choke on (deep nesting, huge numbers)."""
    import random

    rng = random.Random(seed)
    bodies = []
    for i in range(FUZZ_BODIES_PER_SEED):
        if i % 10 == 0:
            depth = rng.choice([100, 5000, 100000])
            bodies.append(b"[" * depth + b"]" * depth)
        elif i % 10 == 1:
            bodies.append(
                ('{"version": 1, "run": ' + "9" * rng.choice([50, 5000, 50000]) + "}").encode()
            )
        elif i % 10 == 2:
            bodies.append(json.dumps(random_json(rng)).encode())
        else:
            body = valid
            for _ in range(rng.randint(1, 3)):
                body = mutate(rng, body)
            bodies.append(json.dumps(body).encode())
    return bodies


@pytest.mark.usefixtures("server_task_identity")
@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_every_hostile_body_gets_a_4xx_json_error(live_deployment, seed):
    """A fuzzer, not a list of guesses: whatever the body's shape, size or depth, the client and
    aggregator functions answer a JSON error with a 4xx (never a 500 and a traceback)."""
    run = unique("fuzz")  # its own run: a mutant that is still valid is answered and recorded
    client_valid = json.loads(envelope(run, arch="resnet10t"))
    task = names.aggregator_task_object(run, 1, "resnet10t", "distill", 0)
    aggregator_valid = {
        "run": run,
        "round": 1,
        "task": task,
        "params": {"arch": "resnet10t"},
    }
    targets = [
        (live_deployment.clients["client-0"].url, client_valid),
        (live_deployment.aggregators["resnet10t"].url, aggregator_valid),
    ]
    for url, valid in targets:
        for body in fuzz_bodies(seed, valid):
            resp = post(url, body)
            what = f"seed {seed}, {url}, body {body[:200]!r}"
            assert resp.status_code < 500, f"{what}: {resp.status_code} {resp.text[:300]}"
            assert resp.headers["Content-Type"].startswith("application/json"), what
            if resp.status_code != 200:
                assert 400 <= resp.status_code < 500 and list(resp.json()) == ["error"], what
