"""FedMD driven through a real ClientApp on the in-process grid (tests/inprocess_grid.py).

Covers the consensus math and the public subsets, the order of the fused client round and the
client's model in the state store, cached transfer learning, invalid replies, `start()` end to
end, `run_experiment`'s report, and option validation.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Message
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import Result
from inprocess_grid import InProcessGrid, node_id_of

from flwr_kd import protocol
from flwr_kd.client import KDClient, handlers
from flwr_kd.data import DataSpec, load_federated
from flwr_kd.distill import average_logits
from flwr_kd.experiment import ExperimentConfig
from flwr_kd.fanout import SerialFanOut
from flwr_kd.models import ModelSpec, create_model, load_numpy_state, state_to_numpy
from flwr_kd.pretrain import (
    PretrainConfig,
    TransferData,
    per_client_seconds,
    transfer_learning,
)
from flwr_kd.records import pack_models, record_to_state
from flwr_kd.registry import STRATEGY_REGISTRY
from flwr_kd.state import LocalStateStore
from flwr_kd.strategy import FedMD, FedMDError
from flwr_kd.training import predict_logits

pytestmark = pytest.mark.usefixtures("server_task_identity")

ARCHS = ("resnet10t", "test_vit")
SUBSET = 32
N_PUBLIC = 160
NUM_CLASSES = 10


# ---------------------------------------------------------------------------- helpers


def _spec(num_nodes: int) -> DataSpec:
    # IID, so that every tiny partition has a held-out slice and at least two training samples
    return DataSpec(
        dataset="digits", num_partitions=num_nodes, alpha=None, max_private=20 * num_nodes
    )


def _config(spec: DataSpec) -> ConfigRecord:
    return ConfigRecord({**spec.to_config(), "archs": ",".join(ARCHS)})


def _initial(spec: ModelSpec, archs=ARCHS) -> dict[str, dict[str, np.ndarray]]:
    states = {}
    for i, arch in enumerate(archs):
        torch.manual_seed(i)
        states[arch] = state_to_numpy(create_model(arch, spec))
    return states


def _arch_of(partition_id: int) -> str:
    return ARCHS[partition_id % len(ARCHS)]


def _grid(num_nodes: int, **kwargs) -> InProcessGrid:
    kwargs.setdefault("fault_types", (protocol.FEDMD_ROUND,))
    return InProcessGrid(KDClient().register(ClientApp()), num_nodes, **kwargs)


def _fedmd(data, tmp_path, num_nodes: int, **kwargs) -> FedMD:
    options = {
        "state_uri": f"file://{tmp_path / 'clients'}",
        "subset_size": SUBSET,
        "digest_epochs": 1,
        "digest_batch_size": 16,
        "revisit_epochs": 1,
        "batch_size": 16,
        "finetune_epochs": 1,
        "finetune_patience": 1,
        "pretrain": PretrainConfig(epochs=1, batch_size=64),
        "cache_dir": tmp_path / "cache",
        "min_available_nodes": num_nodes,
        "fanout": SerialFanOut(),
    }
    options.update(kwargs)
    # the server's public set: the first rows of the clients' (indices address both alike),
    # few enough that transfer learning takes a moment
    return FedMD(
        public_x=data.public_x[:N_PUBLIC],
        public_y=data.public_y[:N_PUBLIC],
        val_x=data.val_x,
        val_y=data.val_y,
        model_spec=data.model_spec,
        **options,
    )


class RecordingFanOut(SerialFanOut):
    """The serial executor, keeping the tasks it ran."""

    def __init__(self) -> None:
        self.tasks: list = []

    def map(self, fn, tasks):
        self.tasks.extend(tasks)
        return super().map(fn, tasks)


def _federation(tmp_path, num_nodes: int, **kwargs):
    """(data, grid, strategy, config) of a FedMD federation of `num_nodes` in-process
    nodes on the digits split, as most tests here start one."""
    spec = _spec(num_nodes)
    data = load_federated(spec)
    strategy = _fedmd(data, tmp_path, num_nodes, **kwargs)
    return data, _grid(num_nodes), strategy, _config(spec)


def _client_store(tmp_path) -> LocalStateStore:
    return LocalStateStore(tmp_path / "clients")


def _round(strategy: FedMD, grid: InProcessGrid, server_round: int, arrays, config):
    replies = list(
        grid.send_and_receive(strategy.configure_train(server_round, arrays, config, grid))
    )
    consensus, metrics = strategy.aggregate_train(server_round, replies)
    return replies, consensus, metrics


def _logits(reply: Message) -> np.ndarray:
    return reply.content[protocol.LOGITS]["logits"].numpy()


def _states_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- subsets & consensus


def test_subsets_are_deterministic_per_seed_and_differ_between_rounds(tmp_path):
    data = load_federated(_spec(2))
    n_public = N_PUBLIC
    strategy = _fedmd(data, tmp_path, 2, seed=3)
    again = _fedmd(data, tmp_path, 2, seed=3)
    other_seed = _fedmd(data, tmp_path, 2, seed=4)
    subsets = [strategy.subset(r) for r in range(1, 5)]
    for r, subset in enumerate(subsets, start=1):
        assert subset.shape == (SUBSET,) and subset.dtype.kind == "i"
        assert np.all(np.diff(subset) > 0), "sorted, without repeats"
        assert 0 <= subset.min() and subset.max() < n_public
        np.testing.assert_array_equal(subset, again.subset(r))  # deterministic per seed
        np.testing.assert_array_equal(subset, strategy.subset(r))  # and per call
        assert not np.array_equal(subset, other_seed.subset(r))
    for i in range(len(subsets)):
        for j in range(i + 1, len(subsets)):
            assert not np.array_equal(subsets[i], subsets[j]), (i + 1, j + 1)
    # no subset size: the whole public set; a too large one is capped
    np.testing.assert_array_equal(
        _fedmd(data, tmp_path, 2, subset_size=None).subset(1), np.arange(n_public)
    )
    assert _fedmd(data, tmp_path, 2, subset_size=10 * n_public).subset(1).shape == (n_public,)


def test_consensus_is_the_float32_mean_of_the_replies_logits(tmp_path):
    n = 4
    data, grid, strategy, config = _federation(tmp_path, n)
    store = _client_store(tmp_path)

    consensus = strategy.init_phase(grid, _initial(data.model_spec), config, timeout=60)
    rounds = {0: (list(grid.replies_of(protocol.FEDMD_ROUND)), consensus)}
    previous = consensus
    replies, consensus, metrics = _round(strategy, grid, 1, previous, config)
    rounds[1] = (replies, consensus)
    assert metrics["replies"] == n and metrics["dropped"] == 0

    sent = grid.messages_of(protocol.FEDMD_ROUND)
    assert len(sent) == 2 * n
    for msg in sent[n:]:  # round 1 carries round 0's consensus, unchanged
        got = msg.content[protocol.CONSENSUS]
        np.testing.assert_array_equal(got["indices"].numpy(), previous["indices"].numpy())
        np.testing.assert_array_equal(got["logits"].numpy(), previous["logits"].numpy())

    for r, (round_replies, record) in rounds.items():
        assert sorted(record) == ["indices", "labels", "logits"]  # digest-label-weight 0.5
        np.testing.assert_array_equal(
            record["labels"].numpy(), strategy.public_y[strategy.subset(r + 1)]
        )
        assert len(round_replies) == n and not any(m.has_error() for m in round_replies)
        np.testing.assert_array_equal(record["indices"].numpy(), strategy.subset(r + 1))
        for msg in sent[r * n : (r + 1) * n]:  # the clients were asked for the same subset
            asked = msg.content[protocol.PUBLIC]["indices"].numpy()
            np.testing.assert_array_equal(asked, strategy.subset(r + 1))
            assert asked.dtype == np.int32  # 4 bytes per public index on the wire, not 8
        client_logits = [_logits(m) for m in round_replies]
        for logits in client_logits:
            assert logits.shape == (SUBSET, NUM_CLASSES) and logits.dtype == np.float16
        got = record["logits"].numpy()
        assert got.dtype == np.float32 and got.shape == (SUBSET, NUM_CLASSES)
        np.testing.assert_array_equal(got, average_logits(client_logits))
        np.testing.assert_allclose(
            got,
            np.mean([a.astype(np.float32) for a in client_logits], axis=0),
            rtol=1e-6,
            atol=1e-6,
        )
        assert not all(np.array_equal(client_logits[0], a) for a in client_logits[1:]), (
            "clients differ"
        )
        # accuracy per architecture: the mean of the replies' test accuracy
        accuracy = strategy.accuracy[r]
        assert sorted(accuracy) == sorted(ARCHS)
        for arch in ARCHS:
            scores = [
                m.content[protocol.METRICS]["test-accuracy"]
                for m in round_replies
                if m.content[protocol.CONFIG]["arch"] == arch
            ]
            assert len(scores) == n // 2
            assert accuracy[arch] == pytest.approx(np.mean(scores), abs=1e-4)
        assert strategy.stats[r].replies == n and strategy.stats[r].dropped == []
        assert strategy.stats[r].bytes_down > 0 and strategy.stats[r].bytes_up > 0

    # each reply holds the logits of the model the node saved, on the requested subset
    for reply in rounds[1][0]:
        node = reply.metadata.src_node_id
        arch = _arch_of(grid.contexts[node].node_config["partition-id"])
        model = create_model(arch, data.model_spec)
        load_numpy_state(model, store.load(f"node-{node}"))
        expected = predict_logits(model, data.public_x[strategy.subset(2)]).astype(np.float16)
        np.testing.assert_array_equal(_logits(reply), expected)
        np.testing.assert_array_equal(
            reply.content[protocol.LOGITS]["indices"].numpy(), strategy.subset(2)
        )


def test_a_public_set_of_another_task_gets_a_centred_consensus_of_the_private_outputs(tmp_path):
    n, task = 4, 3
    data, grid, strategy, config = _federation(
        tmp_path, n, consensus_classes=task, center_consensus=True
    )
    consensus = strategy.init_phase(grid, _initial(data.model_spec), config, timeout=60)
    mean = average_logits([_logits(m) for m in grid.replies_of(protocol.FEDMD_ROUND)])[:, :task]
    got = consensus["logits"].numpy()
    assert got.shape == (SUBSET, task)
    np.testing.assert_allclose(got, mean - mean.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(got.mean(axis=0), np.zeros(task), atol=1e-5)  # no class favoured
    assert np.ptp(got, axis=0).min() > 0  # how the samples differ is kept


def test_a_digest_with_label_weight_gets_the_subsets_labels_among_the_consensus_classes(
    tmp_path, monkeypatch
):
    n, task = 4, 6
    data, grid, strategy, config = _federation(
        tmp_path, n, consensus_classes=task, digest_label_weight=0.5
    )
    digested = []  # what each client's digest got
    real = handlers.digest
    monkeypatch.setattr(handlers, "digest", lambda *a, **kw: digested.append(kw) or real(*a, **kw))
    consensus = strategy.init_phase(grid, _initial(data.model_spec), config, timeout=60)
    truth = data.public_y[strategy.subset(1)]
    expected = np.where(truth < task, truth, -1)
    assert (expected == -1).any() and (expected >= 0).any()
    np.testing.assert_array_equal(consensus["labels"].numpy(), expected)
    _, _, metrics = _round(strategy, grid, 1, consensus, config)
    assert metrics["replies"] == n
    assert len(digested) == n
    for kw in digested:
        assert kw["config"].digest_label_weight == 0.5
        np.testing.assert_array_equal(kw["labels"], expected)

    plain = _fedmd(data, tmp_path / "plain", n, digest_label_weight=0.0)  # no labels sent
    assert "labels" not in plain.init_phase(grid, _initial(data.model_spec), config, timeout=60)


@pytest.mark.parametrize(("public_classes_from", "centred"), [(0, False), (6, True)])
def test_the_consensus_is_centred_exactly_when_the_public_set_is_another_tasks(
    tmp_path, public_classes_from, centred
):
    cfg = ExperimentConfig.from_run_config(
        {
            "strategy": "fedmd",
            "dataset": "digits",
            "num-clients": 2,
            "alpha": 0.5,
            "public-classes-from": public_classes_from,
        }
    )
    data = load_federated(cfg.data_spec)
    strategy = STRATEGY_REGISTRY["fedmd"].build(cfg, data, SerialFanOut(), str(tmp_path))
    assert strategy.center_consensus is centred
    assert strategy.consensus_classes == (public_classes_from or 10)


# ---------------------------------------------------------------------------- the client round


def test_fused_round_digests_then_revisits_then_replies_and_keeps_the_model_in_the_store(
    tmp_path, monkeypatch
):
    n = 4
    data, grid, strategy, config = _federation(tmp_path, n)
    store = _client_store(tmp_path)

    events: list[tuple] = []  # (name, node or details)

    def deliver(msg, context):  # the real ClientApp, marking whose call the events belong to
        if msg.metadata.message_type == protocol.FEDMD_ROUND:
            events.append(("deliver", context.node_id, msg.content[protocol.CONFIG]["phase"]))
        return app(msg, context)

    app = grid.app
    grid.app = deliver

    real = {
        name: getattr(handlers, name)
        for name in ("digest", "train_supervised", "predict_logits", "train_with_early_stopping")
    }

    def digest(model, x, consensus, **kwargs):
        events.append(("digest", state_to_numpy(model), x, np.array(consensus)))
        return real["digest"](model, x, consensus, **kwargs)

    def train_supervised(model, *args, **kwargs):
        out = real["train_supervised"](model, *args, **kwargs)
        events.append(("revisit", state_to_numpy(model), kwargs["lr"]))
        return out

    def predict_logits_(model, x, *args):
        events.append(("logits", state_to_numpy(model)))
        return real["predict_logits"](model, x, *args)

    def finetune(model, *args, **kwargs):
        events.append(("finetune",))
        return real["train_with_early_stopping"](model, *args, **kwargs)

    monkeypatch.setattr(handlers, "digest", digest)
    monkeypatch.setattr(handlers, "train_supervised", train_supervised)
    monkeypatch.setattr(handlers, "predict_logits", predict_logits_)
    monkeypatch.setattr(handlers, "train_with_early_stopping", finetune)

    def calls() -> dict[int, list[tuple]]:
        """Events per node since the last call, in order."""
        out: dict[int, list[tuple]] = {}
        node = None
        for event in events:
            if event[0] == "deliver":
                node = event[1]
                out.setdefault(node, []).append(event)
            else:
                out[node].append(event)
        events.clear()
        return out

    # init: fine-tune the pretrained weights, then reply logits; no digest, no revisit
    consensus = strategy.init_phase(grid, _initial(data.model_spec), config, timeout=60)
    init_calls = calls()
    assert sorted(init_calls) == sorted(grid.contexts)
    for node, node_events in init_calls.items():
        assert [e[0] for e in node_events] == ["deliver", "finetune", "logits"], node
        assert node_events[0][2] == "init"
        saved = store.load(f"node-{node}")
        assert saved is not None, "the model persists in the state store"
        assert (tmp_path / "clients" / f"node-{node}.npz").is_file()
        assert _states_equal(saved, node_events[2][1]), "logits come from the saved model"
    after_init = {node: store.load(f"node-{node}") for node in grid.contexts}

    # a round: digest the consensus, revisit private data, reply logits, in that order
    previous = consensus
    _, consensus, _ = _round(strategy, grid, 1, previous, config)
    round_calls = calls()
    assert sorted(round_calls) == sorted(grid.contexts)
    after_round = {}
    for node, node_events in round_calls.items():
        assert [e[0] for e in node_events] == ["deliver", "digest", "revisit", "logits"], node
        assert node_events[0][2] == "round"
        _, start, x, teacher = node_events[1]
        # the digest starts from the model the store held, on the previous consensus
        assert _states_equal(start, after_init[node]), node
        np.testing.assert_array_equal(x, data.public_x[previous["indices"].numpy()])
        np.testing.assert_array_equal(teacher, previous["logits"].numpy())
        # and what the round ends with is saved: the revisited model, which replied the logits
        after_round[node] = store.load(f"node-{node}")
        assert _states_equal(after_round[node], node_events[2][1]), node
        assert _states_equal(after_round[node], node_events[3][1]), node
        # revisiting is gentler than the other steps (a skewed private set forgets classes)
        assert node_events[2][2] == strategy.round_config.revisit_lr < strategy.round_config.lr
        assert not _states_equal(after_round[node], after_init[node]), "the round changed the model"

    # the next round starts from the store: replace one node's saved model and see it used
    node0 = node_id_of(0)
    store.save(f"node-{node0}", after_init[node0])
    _round(strategy, grid, 2, consensus, config)
    next_calls = calls()
    for node, node_events in next_calls.items():
        _, start, _, _ = node_events[1]
        assert _states_equal(start, after_init[node] if node == node0 else after_round[node]), node

    # nothing of the model lives in the node's context (Flower would copy it with every message)
    for context in grid.contexts.values():
        assert len(context.state) == 0, dict(context.state)
    # and no message carries a client model: down, pretrained weights (init) or consensus only
    for msg in grid.messages_of(protocol.FEDMD_ROUND):
        phase = msg.content[protocol.CONFIG]["phase"]
        assert (protocol.ARRAYS in msg.content) == (phase == "init")
        assert (protocol.CONSENSUS in msg.content) == (phase == "round")
    for reply in grid.replies_of(protocol.FEDMD_ROUND):
        assert sorted(reply.content.array_records) == [protocol.LOGITS]


def test_round_without_a_saved_model_is_a_client_error(tmp_path):
    """...when there are no transfer-learned weights to rejoin from either (`init_phase`
    alone publishes none)."""
    n = 2
    spec = _spec(n)
    data = load_federated(spec)
    grid = _grid(n)
    strategy = _fedmd(data, tmp_path, n, min_replies=1)
    consensus = strategy.init_phase(grid, _initial(data.model_spec), _config(spec), timeout=60)
    (tmp_path / "clients" / f"node-{node_id_of(1)}.npz").unlink()
    replies, _, metrics = _round(strategy, grid, 1, consensus, _config(spec))
    error = next(r for r in replies if r.metadata.src_node_id == node_id_of(1))
    assert error.has_error()
    assert f"no saved model for node-{node_id_of(1)}" in error.error.reason
    assert "no transfer-learned 'test_vit' weights to rejoin from" in error.error.reason
    assert metrics["replies"] == 1 and metrics["dropped"] == 1


def test_a_client_whose_state_is_gone_rejoins_from_its_transfer_learned_weights(
    tmp_path, monkeypatch
):
    n = 4
    data, grid, strategy, config = _federation(tmp_path, n)
    consensus = strategy.prepare(grid, pack_models(_initial(data.model_spec)), config, 60)
    _, consensus, metrics = _round(strategy, grid, 1, consensus, config)
    assert metrics["rejoined"] == 0
    lost = node_id_of(1)
    (tmp_path / "clients" / f"node-{lost}.npz").unlink()

    starts = []  # the weights each fine-tuning starts from
    real = handlers.train_with_early_stopping

    def finetune(model, *args, **kwargs):
        starts.append(state_to_numpy(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(handlers, "train_with_early_stopping", finetune)
    replies, _, metrics = _round(strategy, grid, 2, consensus, config)

    # it takes part in round 2, and says it rejoined
    assert metrics["replies"] == n and metrics["dropped"] == 0 and metrics["rejoined"] == 1
    assert strategy.stats[2].replies == n
    assert metrics["logits-clipped"] == strategy.stats[2].logits_clipped == 0
    for reply in replies:
        rejoined = reply.content[protocol.METRICS]["rejoined"]
        assert rejoined == int(reply.metadata.src_node_id == lost)
    # from its architecture's transfer-learned weights: what the init phase sent it
    init_msg = next(
        m
        for m in grid.messages_of(protocol.FEDMD_ROUND)
        if m.metadata.dst_node_id == lost and m.content[protocol.CONFIG]["phase"] == "init"
    )
    assert len(starts) == 1
    assert _states_equal(starts[0], record_to_state(init_msg.content[protocol.ARRAYS]))
    assert _client_store(tmp_path).load(f"node-{lost}") is not None  # and keeps its model again


# ---------------------------------------------------------------------------- transfer learning


def _pretrain_inputs(n_public: int = 96):
    data = load_federated(_spec(2))
    return data, data.public_x[:n_public], data.public_y[:n_public]


def test_transfer_learning_is_cached_per_architecture(tmp_path):
    data, x, y = _pretrain_inputs()
    initial = _initial(data.model_spec)
    config = PretrainConfig(epochs=1, batch_size=32)
    cache = tmp_path / "cache"
    args = TransferData(data.model_spec, x, y, data.val_x, data.val_y)

    fanout = RecordingFanOut()
    first, report = transfer_learning(initial, args, config, fanout, cache)
    assert report.trained == list(ARCHS) and report.cached == []
    assert [t.arch for t in fanout.tasks] == list(ARCHS)
    assert sorted(report.val_accuracy) == sorted(ARCHS)
    assert all(0.0 <= a <= 1.0 for a in report.val_accuracy.values())
    assert len(list(cache.glob("*.npz"))) == len(ARCHS)
    for arch in ARCHS:
        assert list(first[arch]) == list(initial[arch])
        assert not _states_equal(first[arch], initial[arch]), "trained"

    # the same call again: nothing trained, nothing sent to the executor, the same weights
    fanout = RecordingFanOut()
    second, report = transfer_learning(initial, args, config, fanout, cache)
    assert report.trained == [] and report.cached == list(ARCHS)
    assert fanout.tasks == []
    for arch in ARCHS:
        assert _states_equal(second[arch], first[arch])
        for key, value in second[arch].items():
            assert value.dtype == first[arch][key].dtype

    # and those are the weights training gives: a cold cache trains them again, identically
    fanout = RecordingFanOut()
    cold, report = transfer_learning(initial, args, config, fanout, tmp_path / "cold")
    assert report.trained == list(ARCHS) and len(fanout.tasks) == len(ARCHS)
    for arch in ARCHS:
        assert _states_equal(cold[arch], first[arch])

    # a changed hyper-parameter, public set or initial model misses the cache
    other_y = y.copy()
    other_y[0] = (other_y[0] + 1) % NUM_CLASSES
    other_init = _initial(data.model_spec, archs=ARCHS[::-1])  # other seeds per architecture
    changes = {
        "epochs": (initial, x, y, PretrainConfig(epochs=2, batch_size=32)),
        "lr": (initial, x, y, PretrainConfig(epochs=1, batch_size=32, lr=2e-3)),
        "public inputs": (initial, x[:-1], y[:-1], config),
        "public labels": (initial, x, other_y, config),
        "initial weights": (other_init, x, y, config),
    }
    for name, (init, px, py, cfg) in changes.items():
        fanout = RecordingFanOut()
        _, report = transfer_learning(
            init, TransferData(data.model_spec, px, py, data.val_x, data.val_y), cfg, fanout, cache
        )
        assert sorted(report.trained) == sorted(ARCHS) and report.cached == [], name
        assert len(fanout.tasks) == len(ARCHS), name


def test_retraining_an_evicted_cache_entry_reproduces_it(tmp_path):
    """A cache entry is a function of its key; losing one entry (and retraining it) must not
    change the weights a run gets. Exposes the per-task seed depending on the position of the
    architecture among the *missing* ones (flwr_kd/pretrain.py, `transfer_learning`)."""
    data, x, y = _pretrain_inputs()
    initial = _initial(data.model_spec)
    config = PretrainConfig(epochs=1, batch_size=32)
    cache = tmp_path / "cache"
    args = (TransferData(data.model_spec, x, y, data.val_x, data.val_y), config)
    first, _ = transfer_learning(initial, *args, SerialFanOut(), cache)

    evicted = ARCHS[1]
    (entry,) = cache.glob(f"{evicted}-*.npz")
    entry.unlink()
    fanout = RecordingFanOut()
    again, report = transfer_learning(initial, *args, fanout, cache)
    assert report.trained == [evicted] and report.cached == [ARCHS[0]]
    assert [t.arch for t in fanout.tasks] == [evicted]
    assert _states_equal(again[ARCHS[0]], first[ARCHS[0]])
    assert _states_equal(again[evicted], first[evicted]), (
        "retrained weights differ from the evicted entry"
    )


def test_per_client_seconds_runs_one_task_per_client(tmp_path):
    data, x, y = _pretrain_inputs(n_public=48)
    initial = _initial(data.model_spec)
    client_archs = [_arch_of(p) for p in range(4)]
    fanout = RecordingFanOut()
    seconds = per_client_seconds(
        client_archs,
        initial,
        TransferData(data.model_spec, x, y, data.val_x, data.val_y),
        PretrainConfig(epochs=1),
        fanout,
    )
    assert seconds > 0.0
    assert [t.arch for t in fanout.tasks] == client_archs
    for task in fanout.tasks:
        assert _states_equal(task.init_state, initial[task.arch])
        assert task.epochs == 1 and len(task.x) == len(x)


# ---------------------------------------------------------------------------- invalid replies


def _other_arch(arch: str) -> str:
    return ARCHS[1 - ARCHS.index(arch)]


def test_invalid_replies_are_left_out_of_the_consensus(tmp_path, caplog):
    n = 11
    data, grid, strategy, config = _federation(tmp_path, n)
    consensus = strategy.init_phase(grid, _initial(data.model_spec), config, timeout=60)
    assert strategy.stats[0].replies == n

    def wrong_shape(reply):
        logits = _logits(reply)
        reply.content[protocol.LOGITS]["logits"] = Array(np.ascontiguousarray(logits[:-1]))
        return reply

    def non_finite(reply):
        logits = _logits(reply).copy()
        logits[3, 1] = np.inf
        reply.content[protocol.LOGITS]["logits"] = Array(logits)
        return reply

    def wrong_subset_round(reply):
        reply.content[protocol.CONFIG]["subset-round"] = 1
        return reply

    def wrong_indices(reply):
        reply.content[protocol.LOGITS]["indices"] = Array(strategy.subset(3))
        return reply

    def int_logits(reply):
        reply.content[protocol.LOGITS]["logits"] = Array(_logits(reply).astype(np.int32))
        return reply

    def wrong_arch(reply):
        reply.content[protocol.CONFIG]["arch"] = _other_arch(
            str(reply.content[protocol.CONFIG]["arch"])
        )
        return reply

    def no_logits(reply):
        del reply.content[protocol.LOGITS]
        return reply

    faults = {
        0: (
            wrong_shape,
            f"logits have shape ({SUBSET - 1}, {NUM_CLASSES}), expected ({SUBSET}, {NUM_CLASSES})",
        ),
        1: (non_finite, "logits have non-finite values"),
        2: (wrong_subset_round, "logits for the wrong public subset (round 1, expected 2)"),
        3: (wrong_indices, "logits for the wrong public subset"),
        4: (int_logits, "logits have dtype int32"),
        5: (
            wrong_arch,
            f"architecture '{_other_arch(_arch_of(5))}' but node registered as '{_arch_of(5)}'",
        ),
        6: (None, "client error:"),  # a real client exception: its saved model is gone
        7: (no_logits, "reply lacks logits"),
    }
    valid = [8, 9, 10]
    grid.faults = {node_id_of(p): fault for p, (fault, _) in faults.items() if fault is not None}
    (tmp_path / "clients" / f"node-{node_id_of(6)}.npz").unlink()
    caplog.set_level(logging.WARNING, logger="flwr")

    replies, record, metrics = _round(strategy, grid, 1, consensus, config)

    stats = strategy.stats[1]
    dropped = {d["node"]: d["reason"] for d in stats.dropped}
    assert sorted(dropped) == sorted(node_id_of(p) for p in faults)
    for p, (_, reason) in faults.items():
        node = node_id_of(p)
        assert reason in dropped[node], (p, dropped[node])
        assert any(
            f"left node {node} out of the consensus" in r.getMessage() and reason in r.getMessage()
            for r in caplog.records
        ), p
    assert "no saved model" in dropped[node_id_of(6)]
    assert stats.replies == len(valid)
    assert metrics["replies"] == len(valid) and metrics["dropped"] == len(faults)

    # the round went on: the consensus is the mean of the valid replies alone
    by_node = {r.metadata.src_node_id: r for r in replies}
    valid_logits = [_logits(by_node[node_id_of(p)]) for p in valid]
    np.testing.assert_array_equal(record["logits"].numpy(), average_logits(valid_logits))
    np.testing.assert_array_equal(record["indices"].numpy(), strategy.subset(2))
    assert sorted(strategy.accuracy[1]) == sorted({_arch_of(p) for p in valid})


def test_a_malformed_reply_config_is_left_out_not_fatal(tmp_path, caplog):
    """A reply whose 'subset-round' is not a number is one more invalid reply: it must be left
    out with a reason while the round goes on, not crash the server's aggregation."""
    n = 3
    data, grid, strategy, config = _federation(tmp_path, n)
    consensus = strategy.init_phase(grid, _initial(data.model_spec), config, timeout=60)

    def garbled_round(reply):
        reply.content[protocol.CONFIG]["subset-round"] = "two"
        return reply

    grid.faults = {node_id_of(0): garbled_round}
    caplog.set_level(logging.WARNING, logger="flwr")
    replies, record, metrics = _round(strategy, grid, 1, consensus, config)
    dropped = {d["node"]: d["reason"] for d in strategy.stats[1].dropped}
    assert list(dropped) == [node_id_of(0)]
    assert "subset" in dropped[node_id_of(0)]
    assert any(
        f"left node {node_id_of(0)} out of the consensus" in r.getMessage() for r in caplog.records
    )
    assert metrics["replies"] == n - 1
    valid = [_logits(r) for r in replies if r.metadata.src_node_id != node_id_of(0)]
    np.testing.assert_array_equal(record["logits"].numpy(), average_logits(valid))


def test_too_few_valid_replies_stop_the_run(tmp_path):
    n = 3
    spec = _spec(n)
    data = load_federated(spec)

    def raise_(reply):
        raise RuntimeError("disk full on this node")

    grid = _grid(n, faults={node_id_of(0): raise_, node_id_of(1): raise_})
    strategy = _fedmd(data, tmp_path, n, min_replies=2)
    with pytest.raises(FedMDError) as info:
        strategy.start(
            grid, pack_models(_initial(data.model_spec)), num_rounds=2, train_config=_config(spec)
        )
    message = str(info.value)
    assert "round 0: 1 valid replies, fewer than min_replies=2" in message
    assert "disk full on this node" in message and str(node_id_of(0)) in message
    # nothing after the init phase was sent
    assert {
        int(m.content[protocol.CONFIG]["server-round"])
        for m in grid.messages_of(protocol.FEDMD_ROUND)
    } == {0}


# ---------------------------------------------------------------------------- start()


def test_fedmd_start_two_rounds(tmp_path):
    n = 4
    spec = _spec(n)
    data = load_federated(spec)
    grid = _grid(n)
    fanout = RecordingFanOut()
    strategy = _fedmd(data, tmp_path, n, fanout=fanout, measure_pretrain_per_client=True)
    initial = _initial(data.model_spec)
    seen: list[tuple[int, list[str]]] = []

    def evaluate_fn(server_round, arrays):
        seen.append((server_round, sorted(arrays)))

    result = strategy.start(
        grid,
        pack_models(initial),
        num_rounds=2,
        train_config=_config(spec),
        evaluate_fn=evaluate_fn,
    )

    assert isinstance(result, Result)
    assert sorted(result.arrays) == ["indices", "labels", "logits"]
    np.testing.assert_array_equal(result.arrays["indices"].numpy(), strategy.subset(3))
    logits = result.arrays["logits"].numpy()
    assert logits.shape == (SUBSET, NUM_CLASSES) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert seen == [(r, ["indices", "labels", "logits"]) for r in range(3)]
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    for r in (1, 2):
        assert result.train_metrics_clientapp[r]["replies"] == n
        assert result.train_metrics_clientapp[r]["dropped"] == 0

    assert sorted(strategy.accuracy) == [0, 1, 2]
    for r in range(3):
        assert sorted(strategy.accuracy[r]) == sorted(ARCHS)
        assert all(0.0 <= a <= 1.0 for a in strategy.accuracy[r].values())
        assert strategy.stats[r].replies == n and strategy.stats[r].dropped == []
    assert "client-finetune-max" in strategy.stats[0].seconds
    assert {"client-digest-max", "client-revisit-max", "client-logits-max"} <= set(
        strategy.stats[1].seconds
    )

    # transfer learning: each architecture once (cold cache), plus once per client for the record
    transfer = strategy.transfer
    assert transfer.trained == list(ARCHS) and transfer.cached == []
    assert sorted(transfer.val_accuracy) == sorted(ARCHS)
    assert transfer.per_client_seconds is not None and transfer.per_client_seconds > 0
    assert [t.arch for t in fanout.tasks] == list(ARCHS) + [_arch_of(p) for p in range(n)]
    report = transfer.to_dict()
    assert report["trained"] == list(ARCHS) and "speedup" in report

    # one call per client per round: exactly one train.fedmd message per node for rounds 0..2
    sent = grid.messages_of(protocol.FEDMD_ROUND)
    assert len(sent) == 3 * n
    for r in range(3):
        round_msgs = [m for m in sent if m.content[protocol.CONFIG]["server-round"] == r]
        assert sorted(m.metadata.dst_node_id for m in round_msgs) == sorted(grid.contexts), r
        assert {m.content[protocol.CONFIG]["phase"] for m in round_msgs} == {
            "init" if r == 0 else "round"
        }
        for msg in round_msgs:
            pid = grid.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
            assert msg.content[protocol.CONFIG]["arch"] == _arch_of(pid)
            assert msg.content[protocol.CONFIG]["subset-round"] == r + 1
    # architectures were asked once per node; no other messages (no separate evaluate round)
    assert len(grid.messages_of(protocol.DESCRIBE)) == n
    assert len(grid.sent) == len(sent) + n

    # a second run: transfer learning comes from the cache
    fanout2 = RecordingFanOut()
    strategy2 = _fedmd(data, tmp_path, n, fanout=fanout2)
    strategy2.start(_grid(n), pack_models(initial), num_rounds=1, train_config=_config(spec))
    assert strategy2.transfer.cached == list(ARCHS) and strategy2.transfer.trained == []
    assert fanout2.tasks == []


def test_run_experiment_fedmd_reports_baselines_and_transfer_learning(tmp_path):
    """`run_experiment` (what `flwr-kd simulate` runs inside Ray) on the in-process grid.

    flwr_kd.report binds `sys.stdout` when imported (see test_report.py): imported while
    collecting, it would take the CLI test's printed summary away from that test's capsys,
    hence the import here; and after the CLI test it prints to that test's closed capsys
    stream ("I/O operation on closed file") until report.py resolves stdout per call."""
    from flwr_kd.runner import run_experiment

    n = 4
    cfg = ExperimentConfig.from_run_config(
        {
            "strategy": "fedmd",
            "num-clients": n,
            "alpha": 0,
            "num-server-rounds": 2,
            "archs": ",".join(ARCHS),
            "batch-size": 16,
            "subset-size": SUBSET,
            "pretrain-epochs": 1,
            "finetune-epochs": 1,
            "digest-epochs": 1,
            "revisit-epochs": 1,
            "max-private": 20 * n,
            "fanout": "serial",
            "cache-dir": str(tmp_path / "cache"),
            "out-dir": str(tmp_path / "out"),
        }
    )
    grid = _grid(n)
    returned = run_experiment(grid, cfg)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result == json.loads(json.dumps(returned))

    baselines = result["baselines"]
    assert sorted(baselines) == ["local_only", "transfer_only"]
    for name in ("local_only", "transfer_only"):
        assert sorted(baselines[name]) == sorted(ARCHS), name
        assert all(0.0 <= a <= 1.0 for a in baselines[name].values()), name
    assert baselines["transfer_only"] == result["initial"]["accuracy"]
    transfer = result["transfer_learning"]
    assert transfer["trained"] == list(ARCHS) and transfer["cached"] == []
    assert sorted(transfer["val_accuracy"]) == sorted(ARCHS) and transfer["seconds"] >= 0
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for row in result["rounds"]:
        assert sorted(row["accuracy"]) == sorted(ARCHS)
        assert row["replies"] == n and row["dropped"] == []
        assert row["bytes"]["down"] > 0 and row["bytes"]["up"] > 0
    assert result["initial"]["phase"]["replies"] == n
    assert len(grid.messages_of(protocol.FEDMD_ROUND)) == 3 * n


# ---------------------------------------------------------------------------- options


def test_fedmd_rejects_bad_options(tmp_path):
    data = load_federated(_spec(2))
    with pytest.raises(ValueError, match="digest_loss must be one of"):
        _fedmd(data, tmp_path, 2, digest_loss="mse")
    with pytest.raises(ValueError, match="logits_dtype must be one of"):
        _fedmd(data, tmp_path, 2, logits_dtype="int8")
    with pytest.raises(ValueError, match="min_replies must be at least 1"):
        _fedmd(data, tmp_path, 2, min_replies=0)
    for weight in (-0.1, 1.5):
        with pytest.raises(ValueError, match="digest_label_weight must lie in"):
            _fedmd(data, tmp_path, 2, digest_label_weight=weight)
    for loss in ("kl", "mae"):
        assert _fedmd(data, tmp_path, 2, digest_loss=loss).round_config.digest_loss == loss
