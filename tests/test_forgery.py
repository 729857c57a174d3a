"""A malicious client, holding its own real permissions, against the records of the others.

Client A (`client-0`) acts as its own service account through the storage and Firestore gates
of the session's emulated stack (`gated_stack`: the gates enforce terraform/'s grants). Before
the run it tries to forge client B's (`client-2`, same architecture) reply and call records,
to hand an object of its own outbox to B's reply, to overwrite B's state, and to write the
run's global models, an aggregator's result and the run's Firestore documents. During the run
A's function answers with B's reply objects as its own (round 1) and with its logits inline
(round 2). Both rounds complete with the three honest replies, B's records are B's own, and
each attempt is recorded: denied in the gates' access log, or left out with its reason in A's
invocation document and the round's.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
from google.api_core import exceptions as gexc

pytest.register_assert_rewrite("serverless_fixtures")  # it is also a plugin (below)
from serverless_fixtures import EMULATE_BUCKET, experiment_flags, invocation_docs

from flwr_kd import protocol
from flwr_kd.cli import main
from flwr_kd.serverless import names, wire
from flwr_kd.serverless.arraystore import GcsArrayStore
from flwr_kd.serverless.callrecords import DONE, read_history
from flwr_kd.serverless.roundstore import RoundStore

pytest_plugins = ["serverless_fixtures"]

A, B = "client-0", "client-2"
ROOT_A, ROOT_B = names.client_root(A), names.client_root(B)
NODE_A, NODE_B = names.node_id_for(A), names.node_id_for(B)
RUN = f"forged-{uuid.uuid4().hex[:8]}"


def b_reply_objects(server_round: int) -> dict[str, str]:
    prefix = names.reply_prefix(ROOT_B, RUN, server_round, protocol.TRAIN)
    return {r: names.record_object(prefix, r) for r in ("arrays", "logits")}


def attacks(store_a: GcsArrayStore, rounds_a: RoundStore) -> tuple[dict[str, tuple], str]:
    """What A tries, {name: (what it writes, how)}, each to be refused; and the name of the
    object of its own outbox that it tries to hand to B's reply."""
    b_calls = names.client_call_records(ROOT_B, RUN, 1, protocol.TRAIN)
    own = names.record_object(f"{ROOT_A}outbox/{RUN}/1/forged", "logits")  # A's own: allowed
    forged_reply = {
        "status": DONE,
        "message_id": names.message_id(RUN, 1, B, protocol.TRAIN),
        "reply": {"objects": {"logits": own}},
    }
    zeros = {"w": np.zeros(3, np.float32)}
    b_state = names.state_object(f"{ROOT_B}state", f"node-{NODE_B}")
    result = names.aggregator_result_object(RUN, 1, "resnet10t", "distill")
    return {
        "B's finished call, pointing at A's own object": (
            names.reply_object(b_calls),
            lambda: store_a.put_json(names.reply_object(b_calls), forged_reply),
        ),
        "B's first attempt": (
            names.attempt_object(b_calls, 1),
            lambda: store_a.put_json(names.attempt_object(b_calls, 1), {"attempt": 1}),
        ),
        "B's logits": (
            b_reply_objects(1)["logits"],
            lambda: store_a.put(b_reply_objects(1)["logits"], zeros),
        ),
        "B's state": (b_state, lambda: store_a.put(b_state, zeros)),
        "the global models": (
            names.global_object(RUN, 1),
            lambda: store_a.put(names.global_object(RUN, 1), zeros),
        ),
        "an aggregator's result": (result, lambda: store_a.put(result, zeros)),
        "the run document": (
            names.run_document(RUN),
            lambda: rounds_a.create_run(RUN, {"num-server-rounds": 9}, "feddf"),
        ),
        "B's invocation document": (
            names.invocation_document(RUN, 1, names.client_call(B, protocol.TRAIN)),
            lambda: rounds_a.invocation_ref(RUN, 1, names.client_call(B, protocol.TRAIN)).set(
                {"status": DONE}
            ),
        ),
    }, own


class MaliciousA(BaseHTTPRequestHandler):
    """A's function as A could rewrite it: the real function's answer, but in round 1 naming
    B's reply objects as its own, and in round 2 with its logits inline."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        resp = requests.post(
            self.server.real_url, data=body, headers={"Content-Type": "application/json"}
        )
        answer = resp.json()
        if resp.status_code == 200 and json.loads(body)["round"] >= 1:
            answer = self.forged(answer)
        data = json.dumps(answer).encode()
        self.send_response(resp.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def forged(self, answer: dict) -> dict:
        if answer["round"] == 1:
            return {**answer, "objects": b_reply_objects(1)}
        reply = wire.decode(answer, self.server.store)
        inline, _ = wire.encode(
            reply,
            run=RUN,
            server_round=answer["round"],
            store=None,
            prefix="-",
            offload_bytes=2**40,
        )
        return {**answer, **inline}

    def log_message(self, *args):
        pass


def attack_as_client_a(gated_stack) -> tuple[dict, dict, list]:
    """Each attack, made with A's own stores (through A's ports of the gates): (what was tried,
    {attack: the error it got}, the gates' denied records of A)."""
    log = gated_stack.stack.access_log
    mark = log.mark()
    refused = {}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in gated_stack.stack.identity_env[f"client:{A}"].items():
            mp.setenv(key, value)
        store_a, rounds_a = GcsArrayStore(EMULATE_BUCKET), RoundStore()
        tried, own = attacks(store_a, rounds_a)
        store_a.put(own, {"logits": np.ones((100, 10), np.float16)})  # its own outbox: allowed
        for what, (_, attempt) in tried.items():
            with pytest.raises((gexc.Forbidden, gexc.PermissionDenied)) as err:
                attempt()
            refused[what] = type(err.value).__name__
    return tried, refused, [r for r in log.denied(mark) if r.identity == f"client:{A}"]


@pytest.fixture(scope="module")
def attacked_run(cloud_env, gated_stack, tmp_path_factory):
    """A's attacks, then the run (driven as the driver) with A's function rewritten."""
    tried, refused, denied = attack_as_client_a(gated_stack)
    outputs = json.loads(gated_stack.outputs.read_text())
    server = ThreadingHTTPServer(("127.0.0.1", 0), MaliciousA)
    server.real_url = outputs["client_function_urls"]["value"][A]
    server.store = GcsArrayStore(EMULATE_BUCKET)  # as the driver reads A's answer
    outputs["client_function_urls"]["value"][A] = f"http://127.0.0.1:{server.server_port}"
    path = tmp_path_factory.mktemp("forged") / "outputs.json"
    path.write_text(json.dumps(outputs))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    out = tmp_path_factory.mktemp("forged-run")
    try:
        argv = ["cloud", "run", "--outputs", str(path), "--no-auth", "--skip-active-check"]
        flags = [*experiment_flags("feddf", 2), "--clients", "4", "--min-replies", "3"]
        assert main([*argv, *flags, "--run-id", RUN, "--out", str(out)]) == 0
    finally:
        server.shutdown()
        server.server_close()
    return tried, refused, denied, json.loads((out / "result.json").read_text())


def test_every_write_outside_a_clients_own_folders_is_refused_and_logged(attacked_run):
    tried, refused, denied, _ = attacked_run
    assert set(refused) == set(tried)
    storage = {r.resource for r in denied if r.service == "storage"}
    for what, (resource, _) in tried.items():
        if what.endswith("document"):
            continue
        assert resource in storage, (what, resource, storage)
    assert any(r.service == "firestore" for r in denied), denied  # A holds no Firestore role


def test_the_rounds_use_only_the_honest_replies(attacked_run):
    _, _, _, result = attacked_run
    reasons = {1: "outside client client-0's outbox", 2: "sent inline"}
    for row in result["rounds"]:
        assert row["replies"] == 3, row
        (dropped,) = row["dropped"]
        assert dropped["node"] == NODE_A and reasons[row["round"]] in dropped["reason"], dropped
    docs = invocation_docs(RUN, 2)
    store = GcsArrayStore(EMULATE_BUCKET)
    for r in (1, 2):
        a_doc, b_doc = docs[r][f"{A}:train"], docs[r][f"{B}:train"]
        assert reasons[r] in a_doc["dropped"], a_doc  # A's attempt, recorded
        assert any(e["event"] == "left-out" for e in a_doc["events"]), a_doc
        assert b_doc["status"] == DONE and "dropped" not in b_doc, b_doc
        assert b_doc["objects"] == sorted(b_reply_objects(r).values())
        history = read_history(store, names.client_call_records(ROOT_B, RUN, r, protocol.TRAIN))
        assert len(history.attempts) == 1 and history.reply["objects"] == b_doc["objects"]
        assert store.exists(names.global_object(RUN, r))
    run = RoundStore().get_run(RUN)
    assert (run["status"], run["config"]["num-server-rounds"]) == (DONE, 2)  # the driver's
