"""Client partitions of the private pool, by partitioner name (`DataSpec.partitioner`).

The partitioners are flwr-datasets' own, as Flower users write them; this module only maps a
name and a few `DataSpec` fields to their arguments. Embedded datasets hand it a small
`datasets.Dataset` of labels; Hugging Face datasets reach it through `FederatedDataset`.
Either way a pool carries an `index` column (the row's position in the private pool), which is
what a partition is returned as: lazily (`Partitions`), since a process that serves a few clients
of a 1,000-client split should not pay for the other partitions.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence

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


class Partitions(Sequence):
    """Each client's indices into the private pool, materialised on first use and kept.

    flwr-datasets builds a `Dataset` per partition (about 10 ms each), so building all of them
    in every process of a 1,000-client run costs seconds per process and grows with the
    population; a client process pays only for the partitions it serves. The partitioner's
    assignment is computed up front (partition 0): an impossible split fails at load time."""

    def __init__(self, spec: DataSpec, load_partition: Callable[[int], Dataset]) -> None:
        self._spec = spec
        self._load_partition = load_partition
        self._built: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # a client process may serve several threads
        self._built[0] = self._load(0)  # computes the assignment: an impossible split fails here

    def __len__(self) -> int:
        return self._spec.num_partitions

    def __getitem__(self, partition_id):
        if isinstance(partition_id, slice):
            return [self[i] for i in range(*partition_id.indices(len(self)))]
        pid = partition_id + len(self) if partition_id < 0 else partition_id
        if not 0 <= pid < len(self):
            raise IndexError(f"partition {partition_id} of {len(self)}")
        with self._lock:
            if pid not in self._built:
                self._built[pid] = self._load(pid)
            return self._built[pid]

    def _load(self, pid: int) -> np.ndarray:
        try:
            with warnings.catch_warnings():
                # ShardPartitioner's sort trips a pyarrow deprecation no user can act on
                warnings.filterwarnings("ignore", "Specifying null_placement", FutureWarning)
                # Dirichlet's redraws below the minimum size are expected with skewed, small
                # pools; it fails (a DataError below) if none of its draws fits
                warnings.filterwarnings("ignore", "The specified min_partition_size", UserWarning)
                partition = self._load_partition(pid)
        except ValueError as exc:
            raise DataError(
                f"cannot split the private pool over {self._spec.num_partitions} clients with "
                f"the '{self._spec.partitioner}' partitioner: {exc}"
            ) from exc
        # numpy format: reading the column row by row would cost more than the partition
        return np.asarray(partition.with_format("numpy")[INDEX_COLUMN], dtype=np.int64)


def client_partitions(spec: DataSpec, load_partition: Callable[[int], Dataset]) -> Partitions:
    """Each client's indices into the private pool, from a `load_partition` over it."""
    return Partitions(spec, load_partition)


def partition_labels(spec: DataSpec, labels: np.ndarray) -> Partitions:
    """Client partitions of a private pool given as an array of labels."""
    partitioner = SpecPartitioner(spec)
    partitioner.dataset = Dataset.from_dict(
        {LABEL_COLUMN: labels, INDEX_COLUMN: np.arange(len(labels))}
    )
    return client_partitions(spec, partitioner.load_partition)
