"""A round costs what its participants cost: with 1% of a large population sampled, only the
sampled nodes are asked for their architecture, and a client process loads its data once and
builds only the partitions of the clients it serves."""

from __future__ import annotations

import random

import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.clientapp import ClientApp
from flwr_datasets.partitioner import IidPartitioner
from inprocess_grid import InProcessGrid

from flwr_kd import protocol
from flwr_kd.client import KDClient
from flwr_kd.client.node import load_split_partition
from flwr_kd.data import DataSpec, load_federated
from flwr_kd.models import create_model, state_to_numpy
from flwr_kd.records import pack_models
from flwr_kd.strategy import HeteroFedAvg

pytestmark = pytest.mark.usefixtures("server_task_identity")

NODES, ARCH = 300, "test_resnet"
SPEC = DataSpec(dataset="digits", num_partitions=NODES, alpha=None)


def _round(strategy: HeteroFedAvg, grid: InProcessGrid, server_round: int) -> list[int]:
    """Nodes a round's training messages go to."""
    model = state_to_numpy(create_model(ARCH, load_federated(SPEC).model_spec))
    config = ConfigRecord({**SPEC.to_config(), "archs": ARCH})
    messages = strategy.configure_train(server_round, pack_models({ARCH: model}), config, grid)
    return [m.metadata.dst_node_id for m in messages]


def test_one_percent_of_the_nodes_are_described_and_trained_not_all():
    grid = InProcessGrid(KDClient().register(ClientApp()), NODES)
    strategy = HeteroFedAvg(fraction_train=0.01, min_available_nodes=NODES, seed=3)
    everyone = sorted(grid.contexts)
    # the draws among all nodes that describing every node first would give
    draws = {r: sorted(random.Random(3 * 100003 + r).sample(everyone, 3)) for r in (1, 2, 3)}
    asked_before: list[int] = []
    for server_round in (1, 2):
        sampled = _round(strategy, grid, server_round)
        assert sampled == draws[server_round]
        asked = [m.metadata.dst_node_id for m in grid.messages_of(protocol.DESCRIBE)]
        assert len(asked) == len(set(asked))  # each node asked once
        # this round's sample was asked by the round before (off its critical path), and the
        # next round's sample is asked now, while this round's clients would train
        new = set(asked) - set(asked_before)
        expected_new = set(draws[server_round + 1]) - set(asked_before)
        if server_round == 1:
            expected_new |= set(draws[1])
        assert new == expected_new
        asked_before = asked
    assert len(asked_before) <= 9


def test_a_client_process_loads_its_split_once_and_builds_only_its_partitions(
    clean_data_cache, monkeypatch
):
    built = []
    load_partition = IidPartitioner.load_partition

    def recording(self, partition_id):
        built.append(partition_id)
        return load_partition(self, partition_id)

    monkeypatch.setattr(IidPartitioner, "load_partition", recording)
    config = SPEC.to_config()
    for partition_id in (7, 7, 250):  # one message each, each with a config of its own
        context = Context(1, partition_id, {"partition-id": partition_id}, RecordDict(), {})
        data = load_split_partition(context, ConfigRecord(dict(config)))
        assert len(data.train_x) + len(data.holdout_x) == len(
            load_federated(SPEC).partitions[partition_id]
        )
    info = load_federated.cache_info()
    assert info.misses == 1 and info.hits >= 2
    assert built == [0, 7, 250]  # partition 0 at load: an impossible split fails there
