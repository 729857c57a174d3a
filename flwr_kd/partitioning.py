"""Client partitions of the private pool, by partitioner name (`DataSpec.partitioner`).

The partitioners are flwr-datasets' own, as Flower users write them; this module only maps a
name and a few `DataSpec` fields to their arguments. Embedded datasets hand it a small
`datasets.Dataset` of labels; Hugging Face datasets reach it through `FederatedDataset`.
Either way a pool carries an `index` column (the row's position in the private pool), which is
what a partition is returned as.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)

from flwr_kd.dataspec import DataError, DataSpec

#: The column a pool's partitioners group by, and the one that names a row's pool position.
LABEL_COLUMN, INDEX_COLUMN = "label", "index"


def build_partitioner(spec: DataSpec, pool_size: int) -> Partitioner:
    """The flwr-datasets partitioner `spec` names, sized for a private pool of `pool_size`."""
    n = spec.num_partitions
    if spec.partitioner == "iid" or (spec.partitioner == "dirichlet" and spec.alpha is None):
        return IidPartitioner(num_partitions=n)
    if spec.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=n,
            partition_by=LABEL_COLUMN,
            alpha=spec.alpha,
            # every client needs a few samples to train on; tiny pools cannot ask for more
            min_partition_size=max(1, min(10, pool_size // (4 * n))),
            self_balancing=False,
            seed=spec.seed,
        )
    if spec.partitioner == "shard":
        # flwr-datasets' "use all data" form: n * k shards at most, the last one incomplete,
        # so every sample belongs to a client and none holds more than k shards.
        return ShardPartitioner(
            num_partitions=n,
            partition_by=LABEL_COLUMN,
            shard_size=-(-pool_size // (n * spec.shards_per_client)),
            keep_incomplete_shard=True,
            seed=spec.seed,
        )
    # Every class is some client's first while there are at least as many clients as classes.
    return PathologicalPartitioner(
        num_partitions=n,
        partition_by=LABEL_COLUMN,
        num_classes_per_partition=spec.classes_per_client,
        class_assignment_mode="first-deterministic",
        seed=spec.seed,
    )


class SpecPartitioner(Partitioner):
    """The partitioner `spec` names, built once its pool is assigned: Dirichlet's minimum
    partition size and the shard size depend on the pool's size, which `FederatedDataset` knows
    only after it has loaded and re-split the dataset."""

    def __init__(self, spec: DataSpec) -> None:
        super().__init__()
        self._spec = spec
        self._built: Partitioner | None = None

    @property
    def num_partitions(self) -> int:
        return self._spec.num_partitions

    def load_partition(self, partition_id: int) -> Dataset:
        if self._built is None:
            self._built = build_partitioner(self._spec, len(self.dataset))
            self._built.dataset = self.dataset
        return self._built.load_partition(partition_id)


def client_partitions(spec: DataSpec, load_partition: Callable[[int], Dataset]) -> list[np.ndarray]:
    """Each client's indices into the private pool, from a `load_partition` over it."""
    try:
        with warnings.catch_warnings():
            # ShardPartitioner's sort trips a pyarrow deprecation no user can act on
            warnings.filterwarnings("ignore", "Specifying null_placement", FutureWarning)
            return [
                np.asarray(load_partition(pid)[INDEX_COLUMN], dtype=np.int64)
                for pid in range(spec.num_partitions)
            ]
    except ValueError as exc:
        raise DataError(
            f"cannot split the private pool over {spec.num_partitions} clients with the "
            f"'{spec.partitioner}' partitioner: {exc}"
        ) from exc


def partition_labels(spec: DataSpec, labels: np.ndarray) -> list[np.ndarray]:
    """Client partitions of a private pool given as an array of labels."""
    partitioner = SpecPartitioner(spec)
    partitioner.dataset = Dataset.from_dict(
        {LABEL_COLUMN: labels, INDEX_COLUMN: np.arange(len(labels))}
    )
    return client_partitions(spec, partitioner.load_partition)
