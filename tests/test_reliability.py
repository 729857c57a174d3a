"""Reliability: injected faults and invalid replies against the emulated serverless stack, the
fault injector itself, the simulation's fault mod, and the round deadline for stragglers.

The end-to-end tests drive the session's emulated stack (started as `flwr-kd cloud emulate`
starts it, each function acting as its own service account) with `flwr-kd cloud run`: every
fault kind at once (FedDF), every invalid reply (FedMD), and a straggler. Draws are a pure
function of (seed, round, client, message type, attempt), so the tests compute what was
injected into each call, and what must have come of it, and check the invocation documents
(which the driver writes from the functions' call records) and the result against that, call
by call.
"""

from __future__ import annotations

import collections
import http.server
import json
import threading
import time
import uuid

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from inprocess_grid import InProcessGrid, node_id_of

pytest.register_assert_rewrite("serverless_fixtures")  # it is also a plugin (below)
from serverless_fixtures import (
    EMULATE_BUCKET,
    STACK_CLIENTS,
    ensure_bucket,
    experiment_flags,
    invocation_docs,
)

from flwr_kd import protocol
from flwr_kd.cli import _parser, config_from_args, main
from flwr_kd.client import KDClient
from flwr_kd.data import DataSpec, load_federated
from flwr_kd.distill import DistillConfig
from flwr_kd.experiment import ConfigError, ExperimentConfig
from flwr_kd.fanout import SerialFanOut
from flwr_kd.faults import (
    FAILURES,
    INVALID_REPLIES,
    KINDS,
    FaultPlan,
    fault_injection_mod,
    parse_kinds,
)
from flwr_kd.records import state_to_record
from flwr_kd.report import ServerTestScore
from flwr_kd.runner import initial_arrays
from flwr_kd.serverless import names
from flwr_kd.serverless.arraystore import GcsArrayStore
from flwr_kd.serverless.audit import audit_run
from flwr_kd.serverless.grid import ClientEndpoint, CloudFunctionGrid, GridOptions
from flwr_kd.serverless.names import node_id_for
from flwr_kd.serverless.roundstore import DONE, RUNNING, RoundStore
from flwr_kd.strategy import FedDF, TooFewReplies

pytest_plugins = ["serverless_fixtures"]

RETRIED = ("5xx", "timeout", "kill")  # the driver retries these; the others end the call
REASON = {  # what the driver records for a reply that ends in each kind
    "exception": "InjectedFault: injected fault: exception",
    "nan": "logits have non-finite values",
    "shape": "logits have shape (99, 10), expected (100, 10)",
    "dtype": "logits have dtype int32",
    "subset": "logits have shape (99, 10), expected (100, 10)",  # FedDF: logits on another subset
    "tamper": "checksum mismatch",
    "missing": "does not exist",
    "5xx": "HTTP 503",
    "timeout": "HTTP 504",
    "kill": "failed: ConnectionError",
}


# ============================================================================ the injector


def test_draws_are_reproducible_and_near_the_rate():
    plan = FaultPlan(rate=0.3, kinds=KINDS, seed=4)
    draws = [plan.draw(r, f"client-{c}", protocol.TRAIN) for r in range(1, 101) for c in range(20)]
    assert draws == [
        plan.draw(r, f"client-{c}", protocol.TRAIN) for r in range(1, 101) for c in range(20)
    ]
    faults = [d for d in draws if d is not None]
    assert 0.27 < len(faults) / len(draws) < 0.33
    assert set(faults) == set(KINDS)  # every kind is drawn
    other_seed = FaultPlan(rate=0.3, kinds=KINDS, seed=5)
    assert draws != [
        other_seed.draw(r, f"client-{c}", protocol.TRAIN) for r in range(1, 101) for c in range(20)
    ]


def test_a_retry_draws_anew_and_only_training_calls_of_real_rounds_fail():
    plan = FaultPlan(rate=0.5, kinds=("5xx",), seed=0)
    per_attempt = [
        [plan.draw(1, f"c{i}", protocol.TRAIN, attempt) for attempt in (1, 2)] for i in range(200)
    ]
    assert any(a == "5xx" and b is None for a, b in per_attempt)  # a retried call can succeed
    assert all(
        plan.draw(0, f"c{i}", protocol.FEDMD_ROUND) is None for i in range(200)
    )  # set-up round
    assert all(
        plan.draw(1, f"c{i}", t) is None
        for i in range(200)
        for t in (protocol.DESCRIBE, protocol.EVALUATE)
    )
    assert all(
        FaultPlan(rate=0.0, kinds=KINDS).draw(r, "c", protocol.TRAIN) is None for r in range(1, 500)
    )
    assert all(
        FaultPlan(rate=1.0, kinds=("kill",)).draw(r, "c", protocol.TRAIN) == "kill"
        for r in range(1, 50)
    )


def test_default_kinds_are_the_failures_the_runtime_can_produce():
    assert FaultPlan.from_config({"fail-rate": 0.2}, serverless=True).kinds == FAILURES
    assert FaultPlan.from_config({"fail-rate": 0.2}, serverless=False).kinds == (
        "exception",
        "timeout",
    )
    assert FaultPlan.from_config({}, serverless=True).rate == 0.0  # off by default
    assert parse_kinds(" nan, tamper ") == ("nan", "tamper")
    with pytest.raises(ValueError, match="unknown fault kind.*explode"):
        parse_kinds("nan,explode")


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("fail-rate", 1.5, "fail-rate must lie in [0, 1]"),
        ("fail-rate", -0.1, "fail-rate must lie in [0, 1]"),
        ("fail-kinds", "nan,meteor", "fail-kinds: unknown fault kind(s) meteor"),
        ("fail-hang-seconds", -1, "fail-hang-seconds and round-timeout"),
        ("round-timeout", -5, "fail-hang-seconds and round-timeout"),
        ("min-replies", 0, "min-replies must lie in [1, num-clients]"),
    ],
)
def test_bad_reliability_settings_are_refused_by_name(key, value, named):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_run_config({key: value})
    assert named in str(info.value)


def test_messages_carry_fault_settings_only_when_injecting():
    assert not any(k.startswith("fail-") for k in ExperimentConfig().client_config())
    config = ExperimentConfig(fail_rate=0.3, fail_kinds="nan").client_config()
    assert (config["fail-rate"], config["fail-kinds"]) == (0.3, "nan")


def test_simulate_refuses_serverless_only_kinds_before_running(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "simulate",
            "--clients",
            "2",
            "--rounds",
            "1",
            "--fail-rate",
            "0.3",
            "--fail-kinds",
            "exception,kill",
            "--out",
            str(out),
        ]
    )
    assert code == 2
    assert "fault kind(s) kill need the serverless runtime" in capsys.readouterr().err
    assert not out.exists()


# ================================================================ the simulation's fault mod


@pytest.mark.usefixtures("server_task_identity")
def test_the_fault_mod_makes_clients_fail_and_lie_and_the_strategy_leaves_them_out():
    """The simulation's ClientApp mod, through FedDF with an in-process grid: every drawn fault
    ends as a left-out reply with the kind's reason; the other replies are aggregated."""
    n, kinds = 6, ("exception", "nan", "shape", "dtype")
    spec = DataSpec(dataset="digits", num_partitions=n, max_private=20 * n, seed=3)
    data = load_federated(spec)
    plan = FaultPlan(rate=0.5, kinds=kinds, seed=3)
    drawn = {p: plan.draw(1, str(p), protocol.TRAIN) for p in range(n)}
    assert 0 < sum(k is not None for k in drawn.values()) < n, drawn  # seed 3 gives a mix
    grid = InProcessGrid(KDClient().register(ClientApp(mods=[fault_injection_mod])), n)
    strategy = FedDF(
        public_x=data.public_x[:100],
        val_x=data.val_x,
        val_y=data.val_y,
        model_spec=data.model_spec,
        distill_config=DistillConfig(steps=2),
        fanout=SerialFanOut(),
        min_available_nodes=n,
        seed=0,
    )
    config = ConfigRecord(
        {
            **spec.to_config(),
            "archs": "resnet10t,test_vit",
            "local-epochs": 1,
            "batch-size": 32,
            "fail-rate": 0.5,
            "fail-kinds": ",".join(kinds),
        }
    )
    strategy.start(
        grid=grid,
        initial_arrays=initial_arrays(["resnet10t", "test_vit"], data.model_spec, 0),
        num_rounds=1,
        train_config=config,
    )
    dropped = {d["node"]: d["reason"] for d in strategy.stats[1].dropped}
    expected = {
        node_id_of(p): REASON[k].replace("(99, 10), expected (100, 10)", "")
        for p, k in drawn.items()
        if k
    }
    assert set(dropped) == set(expected)
    for node, reason in expected.items():
        assert reason in dropped[node], (node, dropped[node])
    assert strategy.stats[1].replies == sum(k is None for k in drawn.values())


# ===================================================================== deadline for stragglers


class _SlowFunction(http.server.BaseHTTPRequestHandler):
    """Stands in for a client function that never answers in time."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(5)
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.usefixtures("cloud_env", "server_task_identity")
def test_stragglers_are_cut_by_the_round_deadline():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowFunction)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        ensure_bucket(EMULATE_BUCKET)  # where the message goes (its inbox) before the call
        store = GcsArrayStore(EMULATE_BUCKET)
        grid = CloudFunctionGrid(
            [ClientEndpoint("client-slow", url, "resnet10t")],
            store,
            "deadline-run",
            GridOptions(retries=0),
        )
        msg = Message(
            RecordDict({protocol.CONFIG: ConfigRecord({"server-round": 1})}),
            dst_node_id=node_id_for("client-slow"),
            message_type=protocol.TRAIN,
        )
        t0 = time.perf_counter()
        (reply,) = grid.send_and_receive([msg], timeout=1.0)
        waited = time.perf_counter() - t0
        grid.close()
    finally:
        server.shutdown()
        server.server_close()
    assert reply.has_error() and "no reply within the round deadline of 1.0s" in reply.error.reason
    assert reply.metadata.src_node_id == node_id_for("client-slow")
    assert waited < 4.0, waited  # the 5 s call was not waited for


# ============================================================= end to end: every kind at once

ROUNDS, RATE, RETRIES = 3, 0.6, 1
CLIENT_IDS = [f"client-{i}" for i in range(4)]  # 4 clients: some seed then draws every kind


def outcome(plan: FaultPlan, server_round: int, client: str) -> list[str | None]:
    """The draws of one call's attempts: retried kinds lead to another attempt, up to RETRIES."""
    draws = []
    for attempt in range(1, RETRIES + 2):
        draws.append(plan.draw(server_round, client, protocol.TRAIN, attempt))
        if draws[-1] not in RETRIED:
            break
    return draws


def covering_seed() -> int:
    """The first seed whose draws inject every kind, leave every round at least one good
    reply, and exhaust the retries of at least one call (so that path is covered too)."""
    for seed in range(10_000):
        plan = FaultPlan(RATE, KINDS, seed=seed)
        calls = {(r, c): outcome(plan, r, c) for r in range(1, ROUNDS + 1) for c in CLIENT_IDS}
        drawn = {k for draws in calls.values() for k in draws if k}
        good_each_round = all(
            any(calls[(r, c)][-1] is None for c in CLIENT_IDS) for r in range(1, ROUNDS + 1)
        )
        exhausted = any(len(d) == RETRIES + 1 and d[-1] in RETRIED for d in calls.values())
        if drawn == set(KINDS) and good_each_round and exhausted:
            return seed
    raise AssertionError("no seed covers every fault kind")


@pytest.fixture(scope="module")
def stack(cloud_env, gated_stack):
    """The session's emulated deployment, as `cloud emulate` starts it (4 one-instance client
    functions, supervised, and an aggregator per architecture, each acting as its own service
    account); the end-to-end runs drive it with `cloud run --outputs`, the straggler's last (its
    hung call outlives the run)."""
    assert len(CLIENT_IDS) == STACK_CLIENTS
    return gated_stack.outputs


def drive_argv(outputs, *flags: str) -> list[str]:
    return ["cloud", "run", "--outputs", str(outputs), "--no-auth", "--skip-active-check", *flags]


@pytest.fixture(scope="module")
def faulty_run(stack, tmp_path_factory):
    seed, run = covering_seed(), f"faults-{uuid.uuid4().hex[:8]}"
    out = tmp_path_factory.mktemp("faults")
    argv = [
        *drive_argv(stack, *experiment_flags("feddf", ROUNDS)),
        "--clients",
        str(len(CLIENT_IDS)),
        "--seed",
        str(seed),
        "--fail-rate",
        str(RATE),
        "--fail-kinds",
        ",".join(KINDS),
        "-c",
        "fail-hang-seconds=1",
        "--min-replies",
        "1",
        "--retries",
        str(RETRIES),
        "--run-id",
        run,
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    return seed, run, json.loads((out / "result.json").read_text()), argv


def test_every_round_completes_despite_every_fault_kind(faulty_run):
    _, run, result, _ = faulty_run
    assert [row["round"] for row in result["rounds"]] == list(range(1, ROUNDS + 1))
    rounds = RoundStore()
    assert [(d["round"], d["status"]) for d in rounds.rounds(run)] == [
        (r, DONE) for r in range(1, ROUNDS + 1)
    ]
    assert rounds.get_run(run)["status"] == DONE


def test_each_call_is_recorded_with_its_faults_attempts_and_verdict(faulty_run):
    seed, run, result, _ = faulty_run
    plan = FaultPlan(RATE, KINDS, seed=seed)
    docs = invocation_docs(run, ROUNDS)
    injected = collections.Counter()
    for r in range(1, ROUNDS + 1):
        row = result["rounds"][r - 1]
        dropped = {d["node"]: d["reason"] for d in row["dropped"]}
        accepted = []
        for c in CLIENT_IDS:
            draws, doc = outcome(plan, r, c), docs[r][f"{c}:train"]
            injected.update(k for k in draws if k)
            assert doc["attempts"] == len(draws), (r, c, draws, doc)
            for attempt, kind in enumerate(draws, 1):
                if kind:
                    event = {"attempt": attempt, "event": "fault", "fault": kind}
                    assert event in doc["events"], (
                        r,
                        c,
                        doc,
                    )
            if "kill" in draws[:-1]:
                assert any(e["event"] == "took-over" for e in doc["events"]), doc
            final = draws[-1]
            if final is None:
                accepted.append(c)
                assert doc["status"] == DONE and "dropped" not in doc and "error" not in doc, (
                    r,
                    c,
                    doc,
                )
                assert node_id_for(c) not in dropped
            else:
                assert REASON[final] in dropped[node_id_for(c)], (r, c, final, dropped)
                assert doc["dropped"] == dropped[node_id_for(c)], doc  # the driver's verdict
            assert doc["status"] != RUNNING, (r, c, doc)
        assert row["replies"] == len(accepted) >= 1  # each accepted reply counted once
        assert len(dropped) == len(CLIENT_IDS) - len(accepted)
    reliability = result["serverless"]["reliability"]
    assert reliability["injected"] == dict(sorted(injected.items()))
    assert set(reliability["injected"]) == set(KINDS)


def test_a_call_that_fails_records_why(faulty_run):
    seed, run, _, _ = faulty_run
    plan = FaultPlan(RATE, KINDS, seed=seed)
    docs = invocation_docs(run, ROUNDS)
    for r in range(1, ROUNDS + 1):
        for c in CLIENT_IDS:
            final, doc = outcome(plan, r, c)[-1], docs[r][f"{c}:train"]
            if final in ("exception", "5xx", "timeout"):
                assert (
                    doc["status"] == "failed" and REASON[final].split(": ", 1)[-1] in doc["error"]
                ), doc
            if final in INVALID_REPLIES:  # the function did its part; the driver refused the reply
                assert doc["status"] == DONE and REASON[final] in doc["dropped"], doc


def test_the_run_audits_complete_and_final_models_evaluate_to_the_reported_accuracy(faulty_run):
    _, run, result, argv = faulty_run
    assert audit_run(run, RoundStore(), GcsArrayStore(EMULATE_BUCKET)) == []
    assert main(["cloud", "audit", run]) == 0
    cfg = config_from_args(_parser().parse_args(argv))
    data = load_federated(cfg.data_spec)
    state = GcsArrayStore(EMULATE_BUCKET).get(names.global_object(run, ROUNDS))
    scores = ServerTestScore(cfg.arch_list, data.model_spec, data.test_x, data.test_y)(
        ROUNDS, state_to_record(state)
    )
    assert scores == pytest.approx(result["rounds"][-1]["accuracy"], abs=1e-4)
    assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in scores.values()), (
        scores
    )  # (3 tiny rounds: no accuracy claim)


def test_too_few_replies_fail_the_round_and_name_the_minimum():
    assert issubclass(TooFewReplies, RuntimeError)
    with pytest.raises(ConfigError, match="min-replies"):
        ExperimentConfig.from_run_config({"num-clients": 3, "min-replies": 4})


# ================================================= FedMD on the emulators: every invalid reply

FEDMD_INVALID = ("subset", "nan", "shape", "dtype", "tamper", "missing")
FEDMD_REASON = {
    # a reply is on the next round's subset
    "subset": "logits for the wrong public subset (round {next_plus_one}, expected {next})",
    "nan": "logits have non-finite values",
    "shape": "logits have shape",
    "dtype": "logits have dtype int32",
    "tamper": "checksum mismatch",
    "missing": "does not exist",
}


def test_fedmd_leaves_out_every_kind_of_invalid_reply_with_its_reason(stack, tmp_path):
    """4 clients, 2 rounds; seed 1008 draws each invalid kind once and leaves one good reply a
    round. Each bad reply is left out of the consensus with its kind's reason, recorded in
    result.json, the round document and the call's invocation document."""
    seed, run, clients = (
        1008,
        f"fedmd-invalid-{uuid.uuid4().hex[:8]}",
        [f"client-{i}" for i in range(4)],
    )
    plan = FaultPlan(0.7, FEDMD_INVALID, seed=seed)
    drawn = {(r, c): plan.draw(r, c, protocol.FEDMD_ROUND) for r in (1, 2) for c in clients}
    assert {k for k in drawn.values() if k} == set(FEDMD_INVALID)  # the seed still covers them
    cache = tmp_path / "pretrain-cache"
    argv = [
        *drive_argv(stack, *experiment_flags("fedmd", 2, "-c", f"cache-dir={cache}")),
        "--clients",
        "4",
        "--seed",
        str(seed),
        "--fail-rate",
        "0.7",
        "--fail-kinds",
        ",".join(FEDMD_INVALID),
        "--min-replies",
        "1",
        "--run-id",
        run,
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    docs = invocation_docs(run, 2)
    round_docs = {d["round"]: d for d in RoundStore().rounds(run)}
    for r in (1, 2):
        row = result["rounds"][r - 1]
        dropped = {d["node"]: d["reason"] for d in row["dropped"]}
        assert dropped == {d["node"]: d["reason"] for d in round_docs[r]["dropped"]}
        for c in clients:
            kind, doc = drawn[(r, c)], docs[r][f"{c}:train.fedmd"]
            if kind is None:
                assert node_id_for(c) not in dropped and "dropped" not in doc
                continue
            reason = FEDMD_REASON[kind].format(next=r + 1, next_plus_one=r + 2)
            assert reason in dropped[node_id_for(c)], (r, c, kind, dropped)
            assert (
                doc["dropped"] == dropped[node_id_for(c)]
                and {"attempt": 1, "event": "fault", "fault": kind} in doc["events"]
            )
        assert row["replies"] == sum(drawn[(r, c)] is None for c in clients)
    assert audit_run(run, RoundStore(), GcsArrayStore(EMULATE_BUCKET)) == []


def test_a_straggler_is_cut_by_the_round_deadline_on_the_emulators(stack, tmp_path):
    """`--round-timeout 8`: client-3 hangs 60 s (seed 0 draws it alone); the round completes at
    the deadline with the other three replies, and client-3's call carries the driver's verdict
    (and is marked failed: the driver gave up on it while it was still running)."""
    run = f"straggler-{uuid.uuid4().hex[:8]}"
    assert [
        FaultPlan(0.3, ("timeout",), seed=0).draw(1, c, protocol.TRAIN) for c in CLIENT_IDS
    ] == [None, None, None, "timeout"]
    argv = [
        *drive_argv(stack, *experiment_flags("feddf", 1)),
        "--clients",
        "4",
        "--seed",
        "0",
        "--fail-rate",
        "0.3",
        "--fail-kinds",
        "timeout",
        "-c",
        "fail-hang-seconds=60",
        "--round-timeout",
        "8",
        "--run-id",
        run,
        "--out",
        str(tmp_path / "out"),
    ]
    t0 = time.perf_counter()
    assert main(argv) == 0
    assert time.perf_counter() - t0 < 60  # the hung call was not waited for
    (row,) = json.loads((tmp_path / "out" / "result.json").read_text())["rounds"]
    assert row["replies"] == 3
    (dropped,) = row["dropped"]
    assert (
        dropped["node"] == node_id_for("client-3")
        and "no reply within the round deadline of 8.0s" in dropped["reason"]
    )
    doc = invocation_docs(run, 1)[1]["client-3:train"]
    assert doc["dropped"] == dropped["reason"] and doc["status"] == "failed", doc
    assert {"attempt": 1, "event": "fault", "fault": "timeout"} in doc["events"]
