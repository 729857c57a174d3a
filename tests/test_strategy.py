"""HeteroFedAvg and FedDF driven through a real ClientApp, in process (no Ray).

The grid is `InProcessGrid` (tests/inprocess_grid.py): every Message goes to a real `ClientApp`
carrying flwr-kd's `KDClient` handlers; optional faults tamper with a node's train replies to
exercise the strategy's checks.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp.strategy import Result
from inprocess_grid import InProcessGrid, node_id_of

from flwr_kd import protocol
from flwr_kd.client import KDClient, resolve_architecture
from flwr_kd.client.node import load_split_partition, partition_id
from flwr_kd.data import DataSpec, load_federated
from flwr_kd.distill import DistillConfig
from flwr_kd.fanout import SerialFanOut
from flwr_kd.models import ModelSpec, create_model, state_to_numpy
from flwr_kd.publicset import (
    CLIPPED_KEY,
    FINGERPRINT_KEY,
    decode_subset,
    fingerprint,
    logits_for_wire,
)
from flwr_kd.records import pack_models, record_to_state, unpack_models
from flwr_kd.strategy import FedDF, HeteroFedAvg, TooFewReplies
from flwr_kd.strategy.fedavg import fedavg

pytestmark = pytest.mark.usefixtures("server_task_identity")

ARCHS = ("resnet10t", "test_vit")


def _spec(num_nodes: int, alpha: float | None = None) -> DataSpec:
    return DataSpec(
        dataset="digits", num_partitions=num_nodes, alpha=alpha, max_private=20 * num_nodes
    )


def _train_config(spec: DataSpec, archs=ARCHS, **extra) -> ConfigRecord:
    settings = {"local-epochs": 1, "batch-size": 32}
    return ConfigRecord({**spec.to_config(), "archs": ",".join(archs), **settings, **extra})


def _initial(spec: ModelSpec, archs=ARCHS) -> dict[str, dict[str, np.ndarray]]:
    import torch

    states = {}
    for i, arch in enumerate(archs):
        torch.manual_seed(i)
        states[arch] = state_to_numpy(create_model(arch, spec))
    return states


def _grid(num_nodes: int, **kwargs) -> InProcessGrid:
    return InProcessGrid(KDClient().register(ClientApp()), num_nodes, **kwargs)


class RecordingFanOut(SerialFanOut):
    """The serial executor, keeping the tasks it ran."""

    def __init__(self) -> None:
        self.tasks: list = []

    def map(self, fn, tasks):
        self.tasks.extend(tasks)
        return super().map(fn, tasks)


def _feddf(data, **kwargs) -> FedDF:
    kwargs.setdefault("distill_config", DistillConfig(steps=5, batch_size=32, eval_every=5))
    kwargs.setdefault("fanout", SerialFanOut())
    return FedDF(
        public_x=data.public_x,
        val_x=data.val_x,
        val_y=data.val_y,
        model_spec=data.model_spec,
        subset_size=kwargs.pop("subset_size", 48),
        **kwargs,
    )


def _public_inputs(msg: Message, public_x: np.ndarray) -> np.ndarray:
    """The public inputs a FedDF train message means: its images, or the rows of the public
    set it indexes."""
    record = msg.content[protocol.PUBLIC]
    if "x" in record:
        return record["x"].numpy()
    return public_x[decode_subset(record, len(public_x))]


# ---------------------------------------------------------------------------- (a) configure


def test_each_node_receives_its_architectures_model():
    n = 4
    spec = _spec(n)
    data = load_federated(spec)
    initial = pack_models(_initial(data.model_spec))
    given = unpack_models(initial)  # each architecture's part of the global record
    grid = _grid(n)
    strategy = HeteroFedAvg(min_available_nodes=n)

    messages = list(strategy.configure_train(1, initial, _train_config(spec), grid))

    # every node described itself once, its architecture picked from 'archs' by partition id
    describes = [m for m in grid.sent if m.metadata.message_type == protocol.DESCRIBE]
    assert sorted(m.metadata.dst_node_id for m in describes) == sorted(grid.contexts)
    assert strategy.node_arch == {node_id_of(p): ARCHS[p % 2] for p in range(n)}

    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(grid.contexts)
    for msg in messages:
        pid = grid.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
        arch = ARCHS[pid % len(ARCHS)]
        assert msg.metadata.message_type == protocol.TRAIN
        config = msg.content[protocol.CONFIG]
        assert config["arch"] == arch
        assert config["server-round"] == 1
        assert config["data-num-partitions"] == n
        state = record_to_state(msg.content[protocol.ARRAYS])
        assert list(state) == list(given[arch])
        assert list(state) == list(create_model(arch, data.model_spec).state_dict())
        for key, value in state.items():
            assert value.shape == given[arch][key].shape and value.dtype == given[arch][key].dtype
            np.testing.assert_array_equal(value, given[arch][key])
        assert protocol.PUBLIC not in msg.content  # no public data without distillation
    assert strategy.stats[1].bytes_down == sum(
        m.content[protocol.ARRAYS].count_bytes() for m in messages
    )


def test_feddf_train_messages_carry_the_round_public_subset():
    n = 2
    spec = _spec(n)
    data = load_federated(spec)
    grid = _grid(n)
    strategy = _feddf(data, subset_size=40, logits_dtype="float32")
    config = _train_config(spec)
    messages = list(
        strategy.configure_train(1, pack_models(_initial(data.model_spec)), config, grid)
    )
    subsets = []
    for msg in messages:
        assert "x" not in msg.content[protocol.PUBLIC]  # these clients hold the public set
        x = _public_inputs(msg, data.public_x)
        assert x.shape == (40, *data.public_x.shape[1:])
        assert msg.content[protocol.CONFIG]["logits-dtype"] == "float32"
        # rows of the public set, in their original order
        rows = [int(np.flatnonzero((data.public_x == row).all(axis=(1, 2, 3)))[0]) for row in x]
        assert rows == sorted(rows)
        subsets.append(x)
    np.testing.assert_array_equal(subsets[0], subsets[1])  # one subset for all nodes
    other = list(strategy.configure_train(2, pack_models(_initial(data.model_spec)), config, grid))
    assert not np.array_equal(_public_inputs(other[0], data.public_x), subsets[0])


def test_nodes_of_an_architecture_without_global_model_are_skipped(caplog):
    n = 3
    spec = _spec(n)
    data = load_federated(spec)
    # node config 'arch' wins over the run's 'archs'
    grid = _grid(n, node_configs={2: {"arch": "mobilenetv3_small_050"}})
    strategy = HeteroFedAvg(min_available_nodes=n, min_train_nodes=1)
    caplog.set_level(logging.WARNING, logger="flwr")
    messages = list(
        strategy.configure_train(
            1, pack_models(_initial(data.model_spec)), _train_config(spec), grid
        )
    )
    assert strategy.node_arch[node_id_of(2)] == "mobilenetv3_small_050"
    assert sorted(m.metadata.dst_node_id for m in messages) == [node_id_of(0), node_id_of(1)]
    assert any(
        str(node_id_of(2)) in r.getMessage() and "no global model" in r.getMessage()
        for r in caplog.records
    )


def test_resolve_architecture_prefers_node_config_then_run_config_then_message():
    def ctx(node_config, run_config=None):
        return Context(
            run_id=1,
            node_id=5,
            node_config=node_config,
            state=RecordDict(),
            run_config=run_config or {},
        )

    assert resolve_architecture(ctx({"partition-id": 3, "arch": "lcnet_050"})) == "lcnet_050"
    assert resolve_architecture(ctx({"partition-id": 3}, {"archs": "a, b"})) == "b"
    assert (
        resolve_architecture(ctx({"partition-id": 4}, {}), ConfigRecord({"archs": "a,b,c"})) == "b"
    )
    with pytest.raises(ValueError, match="no architecture"):
        resolve_architecture(ctx({"partition-id": 0}))
    with pytest.raises(ValueError, match="partition-id"):
        resolve_architecture(ctx({}, {"archs": "a,b"}))


# ---------------------------------------------------------------------------- (b) bad replies


def _first_float_key(reply: Message) -> str:
    record = reply.content[protocol.ARRAYS]
    return next(
        k for k, v in record.items() if v.numpy().dtype == np.float32 and v.numpy().ndim > 1
    )


def _wrong_arch(reply: Message) -> Message:
    reply.content[protocol.CONFIG]["arch"] = "test_vit"
    return reply


def _wrong_shape(reply: Message) -> Message:
    key = _first_float_key(reply)
    value = reply.content[protocol.ARRAYS][key].numpy()
    reply.content[protocol.ARRAYS][key] = Array(
        np.zeros((value.shape[0] + 1, *value.shape[1:]), value.dtype)
    )
    return reply


def _nan_weights(reply: Message) -> Message:
    key = _first_float_key(reply)
    value = reply.content[protocol.ARRAYS][key].numpy().copy()
    value.flat[0] = np.nan
    reply.content[protocol.ARRAYS][key] = Array(value)
    return reply


def _wrong_logits_shape(reply: Message) -> Message:
    logits = reply.content[protocol.LOGITS]["logits"].numpy()
    reply.content[protocol.LOGITS]["logits"] = Array(
        np.zeros((len(logits) - 1, logits.shape[1]), logits.dtype)
    )
    return reply


def _nan_logits(reply: Message) -> Message:
    logits = reply.content[protocol.LOGITS]["logits"].numpy().copy()
    logits[3, 1] = np.nan
    reply.content[protocol.LOGITS]["logits"] = Array(logits)
    return reply


def _raise(reply: Message) -> Message:
    raise RuntimeError("disk full on this node")


def test_bad_replies_are_dropped_with_reasons_and_valid_ones_aggregated(caplog):
    n = 10  # partition p gets ARCHS[p % 2]: even ones resnet10t, odd ones test_vit
    faults = {
        0: (_wrong_arch, "architecture 'test_vit' but node registered as 'resnet10t'"),
        1: (_wrong_shape, "has shape"),
        2: (_nan_weights, "has non-finite values"),
        3: (_wrong_logits_shape, "logits have shape (47, 10), expected (48, 10)"),
        4: (_nan_logits, "logits have non-finite values"),
        5: (_raise, "client error:"),
    }
    valid = [6, 7, 8, 9]
    spec = _spec(n, alpha=1.0)  # unequal partitions, so that FedAvg's weights matter
    data = load_federated(spec)
    grid = _grid(n, faults={node_id_of(p): fault for p, (fault, _) in faults.items()})
    # no distillation steps: the round's models must be exactly the FedAvg of the valid replies
    strategy = _feddf(data, distill_config=DistillConfig(steps=0), min_available_nodes=n)
    initial_record = pack_models(_initial(data.model_spec))
    initial = unpack_models(initial_record)
    caplog.set_level(logging.WARNING, logger="flwr")

    replies = grid.send_and_receive(
        strategy.configure_train(1, initial_record, _train_config(spec), grid)
    )
    arrays, metrics = strategy.aggregate_train(1, replies)

    stats = strategy.stats[1]
    dropped = {d["node"]: d["reason"] for d in stats.dropped}
    assert sorted(dropped) == sorted(node_id_of(p) for p in faults)
    for p, (_, reason) in faults.items():
        assert reason in dropped[node_id_of(p)], (p, dropped[node_id_of(p)])
        assert any(
            f"dropped reply of node {node_id_of(p)}" in r.getMessage() and reason in r.getMessage()
            for r in caplog.records
        ), p
    assert "disk full on this node" in dropped[node_id_of(5)]
    assert stats.replies == len(valid)
    assert metrics["replies"] == len(valid) and metrics["dropped"] == len(faults)

    # every architecture's model is the example-weighted mean of its valid replies
    by_node = {r.metadata.src_node_id: r for r in grid.train_replies()}
    models = unpack_models(arrays)
    assert list(models) == list(ARCHS)
    for arch in ARCHS:
        group = [by_node[node_id_of(p)] for p in valid if ARCHS[p % 2] == arch]
        assert len(group) == 2
        weights = np.array([r.content[protocol.METRICS]["num-examples"] for r in group], np.float64)
        assert weights[0] != weights[1], "precondition: unequal client sizes"
        states = [record_to_state(r.content[protocol.ARRAYS]) for r in group]
        for key, ref in initial[arch].items():
            mean = (
                sum(w * s[key].astype(np.float64) for w, s in zip(weights, states)) / weights.sum()
            )
            got = models[arch][key]
            assert got.dtype == ref.dtype and got.shape == ref.shape, key
            if ref.dtype.kind == "f":
                np.testing.assert_allclose(got, mean, rtol=1e-5, atol=1e-6, err_msg=key)
            else:
                np.testing.assert_array_equal(got, np.rint(mean).astype(ref.dtype), err_msg=key)
        # and not the initial model: local training happened
        assert any(not np.array_equal(models[arch][k], initial[arch][k]) for k in initial[arch])


def test_round_without_enough_valid_replies_fails_naming_the_minimum():
    n = 2
    spec = _spec(n)
    data = load_federated(spec)
    grid = _grid(n, faults={node_id_of(p): _raise for p in range(n)})
    strategy = HeteroFedAvg(min_available_nodes=n)
    initial = pack_models(_initial(data.model_spec))
    with pytest.raises(
        TooFewReplies, match=r"round 1: 0 valid replies, fewer than min_replies=1"
    ) as info:
        strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=1, train_config=_train_config(spec)
        )
    assert sorted(d["node"] for d in info.value.dropped) == sorted(node_id_of(p) for p in range(n))
    assert all(d["type"] == "train" and "disk full" in d["reason"] for d in info.value.dropped)


@pytest.mark.parametrize("min_replies, completes", [(2, True), (3, False)])
def test_a_round_completes_with_the_replies_it_got_down_to_min_replies(min_replies, completes):
    n = 3
    spec = _spec(n)
    data = load_federated(spec)
    grid = _grid(n, faults={node_id_of(0): _raise})
    strategy = HeteroFedAvg(min_available_nodes=n, min_replies=min_replies)
    initial = pack_models(_initial(data.model_spec))
    run = lambda: strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=1, train_config=_train_config(spec)
    )
    if not completes:
        with pytest.raises(TooFewReplies, match="2 valid replies, fewer than min_replies=3"):
            run()
        return
    result = run()
    assert strategy.stats[1].replies == 2 and [d["node"] for d in strategy.stats[1].dropped] == [
        node_id_of(0)
    ]
    assert result.train_metrics_clientapp[1]["replies"] == 2


# ---------------------------------------------------------------------------- (c) fedavg


def test_fedavg_weighted_mean_and_integer_buffers():
    a = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "n": np.array(10, np.int64)}
    b = {"w": np.array([[5.0, 6.0], [7.0, 8.0]], np.float32), "n": np.array(13, np.int64)}
    out = fedavg([a, b], [1, 3])
    assert list(out) == ["w", "n"]
    assert out["w"].dtype == np.float32
    np.testing.assert_allclose(out["w"], (a["w"] + 3 * b["w"]) / 4)
    assert out["n"].dtype == np.int64
    assert out["n"] == 12  # 12.25 rounded, still an integer
    # equal weights are the plain mean
    np.testing.assert_allclose(fedavg([a, b], [2, 2])["w"], (a["w"] + b["w"]) / 2)
    # a single state comes back unchanged
    one = fedavg([b], [5])
    np.testing.assert_array_equal(one["w"], b["w"])
    assert one["n"] == 13


def test_fedavg_keeps_unsigned_and_float64_dtypes():
    a = {"u": np.array([1, 2], np.uint8), "d": np.array([0.5], np.float64)}
    b = {"u": np.array([4, 9], np.uint8), "d": np.array([1.5], np.float64)}
    out = fedavg([a, b], [1.0, 1.0])
    assert out["u"].dtype == np.uint8 and out["d"].dtype == np.float64
    np.testing.assert_array_equal(out["u"], [2, 6])  # 2.5 -> 2 (round half to even), 5.5 -> 6
    np.testing.assert_allclose(out["d"], [1.0])


# ---------------------------------------------------------------------------- (d) start()


def _run_feddf(teacher: str, num_rounds: int = 2):
    n = 4
    spec = _spec(n)
    data = load_federated(spec)
    grid = _grid(n)
    fanout = RecordingFanOut()
    strategy = _feddf(
        data, teacher=teacher, min_available_nodes=n, fraction_evaluate=1.0, fanout=fanout
    )
    initial_record = pack_models(_initial(data.model_spec))
    initial = unpack_models(initial_record)
    seen: list[tuple[int, list[str]]] = []

    def evaluate_fn(server_round, arrays):
        seen.append((server_round, list(unpack_models(arrays))))
        return MetricRecord({"round": server_round})

    result = strategy.start(
        grid=grid,
        initial_arrays=initial_record,
        num_rounds=num_rounds,
        train_config=_train_config(spec),
        evaluate_config=_train_config(spec),
        evaluate_fn=evaluate_fn,
    )
    return result, strategy, grid, initial, seen, fanout.tasks


def _assert_two_architecture_result(result, strategy, grid, initial, seen):
    assert isinstance(result, Result)
    models = unpack_models(result.arrays)
    assert list(models) == list(ARCHS)
    for arch in ARCHS:
        assert list(models[arch]) == list(initial[arch])
        for key, value in models[arch].items():
            assert value.shape == initial[arch][key].shape
            assert value.dtype == initial[arch][key].dtype
        assert any(not np.array_equal(models[arch][k], initial[arch][k]) for k in initial[arch])
    assert seen == [(r, list(ARCHS)) for r in range(3)]
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    for r in (1, 2):
        metrics = result.train_metrics_clientapp[r]
        assert metrics["replies"] == 4 and metrics["dropped"] == 0
        stats = strategy.stats[r]
        assert stats.dropped == [] and stats.replies == 4
        assert stats.bytes_down > 0 and stats.bytes_up > 0
        assert sorted(stats.distill) == sorted(ARCHS)
        for info in stats.distill.values():
            assert info["steps"] == 5
            # the default guard keeps all 5 steps, or refuses them and hands back the start
            assert info["best_step"] in (0, 5)
            if info["best_step"] == 0:
                assert info["val_accuracy_after"] == info["val_accuracy_before"]
            assert 0.0 <= min(info["val_accuracy_before"], info["val_accuracy_after"]) <= 1.0
            assert info["validation_seconds"] >= 0
        client_eval = result.evaluate_metrics_clientapp[r]
        for arch in ARCHS:
            assert 0.0 <= client_eval[f"accuracy/{arch}"] <= 1.0
    # architectures were asked once per node, not once per round
    describes = [m for m in grid.sent if m.metadata.message_type == protocol.DESCRIBE]
    assert len(describes) == 4
    assert len(grid.train_messages()) == 8


def _round_slices(items: list, per_round: int, r: int) -> list:
    return items[per_round * (r - 1) : per_round * r]


def test_feddf_start_two_rounds_with_client_logits():
    result, strategy, grid, initial, seen, tasks = _run_feddf("clients")
    _assert_two_architecture_result(result, strategy, grid, initial, seen)
    public_x = load_federated(_spec(4)).public_x
    for msg in grid.train_messages():
        assert _public_inputs(msg, public_x).shape[0] == 48
    for reply in grid.train_replies():
        logits = reply.content[protocol.LOGITS]["logits"].numpy()
        assert logits.shape == (48, 10) and logits.dtype == np.float16
    assert len(tasks) == 4  # one distillation per architecture per round
    for r in (1, 2):
        assert all(info["teacher_seconds"] == 0.0 for info in strategy.stats[r].distill.values())
        # the teacher is the mean of every client's logits (both architectures), on the
        # public subset the clients received this round
        replies = _round_slices(grid.train_replies(), 4, r)
        ensemble = np.mean(
            [m.content[protocol.LOGITS]["logits"].numpy().astype(np.float32) for m in replies],
            axis=0,
        )
        subset = _public_inputs(_round_slices(grid.train_messages(), 4, r)[0], public_x)
        round_tasks = _round_slices(tasks, 2, r)
        assert sorted(t.arch for t in round_tasks) == sorted(ARCHS)
        for task in round_tasks:
            assert task.teacher_models == []
            np.testing.assert_allclose(task.teacher_logits, ensemble, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(task.x, subset)


def test_feddf_start_two_rounds_with_server_side_teacher():
    result, strategy, grid, initial, seen, tasks = _run_feddf("server")
    _assert_two_architecture_result(result, strategy, grid, initial, seen)
    for msg in grid.train_messages():
        assert protocol.PUBLIC not in msg.content
    for reply in grid.train_replies():
        assert protocol.LOGITS not in reply.content
    assert len(tasks) == 4
    for r in (1, 2):
        # the server re-evaluated the client models to build the teacher
        assert all(info["teacher_seconds"] > 0.0 for info in strategy.stats[r].distill.values())
        replies = _round_slices(grid.train_replies(), 4, r)
        for task in _round_slices(tasks, 2, r):
            assert task.teacher_logits is None
            assert len(task.teacher_models) == 4  # every client model, of both architectures
            assert sorted(a for a, _ in task.teacher_models) == sorted(ARCHS * 2)
            for (arch, state), reply in zip(task.teacher_models, replies):
                sent = record_to_state(reply.content[protocol.ARRAYS])
                assert arch == reply.content[protocol.CONFIG]["arch"]
                assert all(np.array_equal(state[k], sent[k]) for k in sent)


def test_feddf_rejects_bad_options():
    data = load_federated(_spec(2))
    with pytest.raises(ValueError, match="teacher must be one of"):
        _feddf(data, teacher="oracle")
    with pytest.raises(ValueError, match="logits_dtype must be one of"):
        _feddf(data, logits_dtype="int8")
    with pytest.raises(ValueError, match="needs public data"):
        FedDF(
            public_x=data.public_x[:0],
            val_x=data.val_x,
            val_y=data.val_y,
            model_spec=data.model_spec,
            fanout=SerialFanOut(),
        )


# ---------------------------------------------------------------------------- (e) downlink


def _loader(public_of: dict[int, np.ndarray | None]):
    """The default data loader, except that partition p holds `public_of[p]` as its public set
    (None: none)."""

    def load(context, config):
        data = load_split_partition(context, config)
        pid = partition_id(context)
        return replace(data, public_x=public_of[pid]) if pid in public_of else data

    return load


def test_feddf_sends_indices_to_nodes_holding_its_public_set_and_images_to_the_others():
    n = 4
    spec = _spec(n)
    data = load_federated(spec)
    other_set = data.public_x + 1.0  # same shape, other values: another public set
    app = KDClient(load_data=_loader({1: None, 2: other_set})).register(ClientApp())
    grid = InProcessGrid(app, n)
    strategy = _feddf(data, subset_size=40, min_available_nodes=n, logits_dtype="float32")
    initial = pack_models(_initial(data.model_spec))
    messages = list(strategy.configure_train(1, initial, _train_config(spec), grid))

    by_node = {m.metadata.dst_node_id: m for m in messages}
    assert sorted(by_node) == sorted(grid.contexts)
    for pid in range(n):
        msg = by_node[node_id_of(pid)]
        sent = msg.content[protocol.PUBLIC]
        assert ("x" in sent) == (pid in (1, 2)), pid  # images only to who lacks the set
        assert msg.content[protocol.CONFIG][FINGERPRINT_KEY] == fingerprint(data.public_x)
    subset = _public_inputs(by_node[node_id_of(0)], data.public_x)
    np.testing.assert_array_equal(
        by_node[node_id_of(1)].content[protocol.PUBLIC]["x"].numpy(), subset
    )

    # every node's logits are on the same inputs: a teacher-only round leaves them comparable
    replies = grid.send_and_receive(messages)
    strategy.aggregate_train(1, replies)
    assert strategy.stats[1].replies == n and strategy.stats[1].dropped == []
    by_reply = {r.metadata.src_node_id: r for r in grid.train_replies()}
    for pid in range(n):
        logits = by_reply[node_id_of(pid)].content[protocol.LOGITS]["logits"].numpy()
        assert logits.shape == (40, 10)


def test_a_client_refuses_indices_into_another_public_set():
    n = 2
    spec = _spec(n)
    data = load_federated(spec)
    grid = _grid(n)
    strategy = _feddf(data, min_available_nodes=n)
    messages = list(
        strategy.configure_train(
            1, pack_models(_initial(data.model_spec)), _train_config(spec), grid
        )
    )
    messages[0].content[protocol.CONFIG][FINGERPRINT_KEY] = "another-set"
    replies = list(grid.send_and_receive(messages))
    assert replies[0].has_error() and "indexes public set 'another-set'" in replies[0].error.reason
    assert not replies[1].has_error()


def _serialized_bytes(msg: Message) -> int:
    """What a message's content costs on Flower's wire (its protobuf serialization)."""
    return recorddict_to_proto(msg.content).ByteSize()


def _downlink_ratios(data, archs, public_of=None, **feddf_options) -> dict[int, float]:
    """Per node: serialized bytes of FedDF's round-1 train message over FedAvg's."""
    n = len(archs)
    spec_n = DataSpec(dataset="digits", num_partitions=n, alpha=None, max_private=20 * n)
    config = _train_config(spec_n, archs)
    initial = pack_models(_initial(data.model_spec, archs))
    app = KDClient(load_data=_loader(public_of or {})).register(ClientApp())
    sizes = {}
    for name, strategy in (
        ("fedavg", HeteroFedAvg(min_available_nodes=n)),
        ("feddf", _feddf(data, min_available_nodes=n, **feddf_options)),
    ):
        grid = InProcessGrid(app, n)
        for msg in strategy.configure_train(1, initial, ConfigRecord(dict(config)), grid):
            sizes.setdefault(msg.metadata.dst_node_id, {})[name] = _serialized_bytes(msg)
    return {node: s["feddf"] / s["fedavg"] for node, s in sizes.items()}


def test_feddf_downlink_per_client_is_within_one_percent_of_fedavg():
    # the demo: digits, its three default architectures, the whole public set every round
    data = load_federated(_spec(3))
    archs = ("resnet10t", "mobilenetv3_small_050", "test_vit")
    ratios = _downlink_ratios(data, archs, subset_size=len(data.public_x))
    assert len(ratios) == 3 and max(ratios.values()) <= 1.01, ratios

    # Fashion-MNIST's default public subset (15,000 images of 28x28) and its smallest models:
    # the images alone would be 47 MB per client per round
    rng = np.random.default_rng(0)
    public = rng.standard_normal((15_000, 1, 28, 28)).astype(np.float32)
    big = replace(
        data, public_x=public, model_spec=ModelSpec(num_classes=10, in_chans=1, img_size=28)
    )
    small = ("test_vit", "lcnet_050")
    ratios = _downlink_ratios(big, small, {0: public, 1: public}, subset_size=len(public))
    assert max(ratios.values()) <= 1.01, ratios
    # what it would cost to send the images instead: the measurement tells them apart
    ratios = _downlink_ratios(big, small, {0: None, 1: None}, subset_size=len(public))
    assert min(ratios.values()) > 10, ratios


# ---------------------------------------------------------------------------- (f) overflow


def test_logits_for_wire_clips_to_the_finite_range_and_counts():
    logits = np.array([[1.5, 7e4, -np.inf], [np.inf, -1e9, 65504.0]], np.float32)
    wire, clipped = logits_for_wire(logits, "float16")
    assert wire.dtype == np.float16 and np.isfinite(wire).all() and clipped == 4
    np.testing.assert_array_equal(wire, [[1.5, 65504, -65504], [65504, -65504, 65504]])
    wire, clipped = logits_for_wire(logits, "float32")
    assert wire.dtype == np.float32 and clipped == 2  # only the infinities
    assert np.isnan(logits_for_wire(np.array([np.nan], np.float32), "float16")[0]).all()


def test_float16_overflow_is_clipped_counted_and_no_reply_is_dropped(monkeypatch):
    from flwr_kd.client import handlers

    real = handlers.predict_logits
    monkeypatch.setattr(handlers, "predict_logits", lambda *a, **k: real(*a, **k) * 1e6)
    n = 4
    spec = _spec(n)
    data = load_federated(spec)
    grid = _grid(n)
    strategy = _feddf(data, distill_config=DistillConfig(steps=0), min_available_nodes=n)
    messages = strategy.configure_train(
        1, pack_models(_initial(data.model_spec)), _train_config(spec), grid
    )
    _, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))

    stats = strategy.stats[1]
    assert stats.replies == n and stats.dropped == []
    per_reply = []
    for reply in grid.train_replies():
        logits = reply.content[protocol.LOGITS]["logits"].numpy()
        assert logits.dtype == np.float16 and np.isfinite(logits).all()
        clipped = reply.content[protocol.METRICS][CLIPPED_KEY]
        assert clipped == np.count_nonzero(np.abs(logits) == 65504)
        per_reply.append(clipped)
    assert sum(per_reply) > 0, "precondition: the logits overflowed float16"
    assert stats.logits_clipped == sum(per_reply) == metrics[CLIPPED_KEY]
    assert stats.to_dict()["logits_clipped"] == sum(per_reply)
