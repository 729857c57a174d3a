"""What a client handler knows about its node: its private data (and where it comes from by
default), its timm architecture and its seed.

A node learns all of it from its Flower `Context` and the message's config alone, so the same
handlers serve the simulation engine and stateless client functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Context

from flwr_kd.data import DataSpec, load_federated
from flwr_kd.models import ModelSpec


@dataclass
class ClientData:
    """A client's private data: a training part and a held-out part, plus the model shape."""

    train_x: np.ndarray
    train_y: np.ndarray
    holdout_x: np.ndarray
    holdout_y: np.ndarray
    model_spec: ModelSpec
    public_x: np.ndarray | None = None  # the public set, addressed by index (FedMD, FedDF)
    test_x: np.ndarray | None = None  # optional shared test set for per-round accuracy
    test_y: np.ndarray | None = None
    task_classes: int = 0  # the test task's classes (leading outputs); 0: all


def partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("node config has no 'partition-id'; set it, or pass load_data")
    return int(context.node_config["partition-id"])


def node_seed(context: Context) -> int:
    """A per-node seed that is stable across runs: the partition id where there is one."""
    return int(context.node_config.get("partition-id", context.node_id % 100_000))


def load_split_partition(context: Context, config: ConfigRecord) -> ClientData:
    """The default data source: this node's partition of the flwr-kd split named in config."""
    data = load_federated(DataSpec.from_config(dict(config)))
    train_x, train_y, hold_x, hold_y = data.client_data(partition_id(context))
    return ClientData(
        *(train_x, train_y, hold_x, hold_y, data.model_spec),
        *(data.public_x, data.test_x, data.test_y, data.task_classes),
    )


def resolve_architecture(context: Context, config: ConfigRecord | None = None) -> str:
    """This node's timm architecture: node config `arch`, else the `archs` list of the run
    config (or of the server's message) indexed by partition id."""
    if "arch" in context.node_config:
        return str(context.node_config["arch"])
    for source in (context.run_config, config or {}):
        if "archs" in source:
            archs = [a.strip() for a in str(source["archs"]).split(",") if a.strip()]
            return archs[partition_id(context) % len(archs)]
    raise ValueError("no architecture: set node config 'arch' or run config 'archs'")
