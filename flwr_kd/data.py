"""Datasets and their federated split: the one entry point, `load_federated(DataSpec)`.

One labelled pool becomes: a public distillation set (unlabelled for FedDF, labelled for FedMD's
transfer learning; or another task's pool, `DataSpec.public_dataset`), a small labelled server
validation set (guarding distillation), a test set, and one private partition per client,
split by the flwr-datasets partitioner that `DataSpec.partitioner` names (Dirichlet over
labels by default). The same `DataSpec` always gives the same split, so clients and server can
each rebuild it from a few config values.

Where things live: `flwr_kd.dataspec` (the spec and the cut into pools), `flwr_kd.local_data`
(digits, Fashion-MNIST), `flwr_kd.hf_data` (hf:<id or directory> through FederatedDataset),
`flwr_kd.partitioning` (partitioners by name).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flwr_kd.dataspec import DATASETS, PARTITIONERS, DataError, DataSpec, Pools, split_positions
from flwr_kd.models import ModelSpec

__all__ = [
    "CLIENT_HOLDOUT_FRACTION",
    "DATASETS",
    "PARTITIONERS",
    "DataError",
    "DataSpec",
    "FederatedData",
    "load_federated",
]

logger = logging.getLogger(__name__)

#: Share of each client's private partition held out for its own evaluation and early stopping.
CLIENT_HOLDOUT_FRACTION = 0.2


@dataclass
class FederatedData:
    """The split of one `DataSpec`. Images are float32 NCHW, standardised; labels int64."""

    spec: DataSpec
    model_spec: ModelSpec
    public_x: np.ndarray
    public_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    private_x: np.ndarray
    private_y: np.ndarray
    partitions: Sequence[np.ndarray]  # indices into private_x, one per client (built lazily)
    #: The private task's classes: the head's leading outputs (all of them unless the public set
    #: is another task, whose classes follow).
    task_classes: int = 0

    def client_data(
        self, partition_id: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(train_x, train_y, holdout_x, holdout_y) of one client's private partition."""
        if not 0 <= partition_id < len(self.partitions):
            raise DataError(
                f"partition id {partition_id} out of range for {len(self.partitions)} clients"
            )
        idx = self.partitions[partition_id]
        rng = np.random.default_rng((self.spec.seed, partition_id))
        idx = idx[rng.permutation(len(idx))]
        n_hold = round(len(idx) * CLIENT_HOLDOUT_FRACTION) if len(idx) >= 5 else 0
        hold, train = idx[:n_hold], idx[n_hold:]
        return (
            self.private_x[train],
            self.private_y[train],
            self.private_x[hold],
            self.private_y[hold],
        )


def _local_pools(spec: DataSpec) -> Pools:
    """The pools of an embedded dataset, cut from its arrays."""
    from flwr_kd.local_data import load_local, resize
    from flwr_kd.partitioning import partition_labels

    x, y, test = load_local(spec.dataset)
    num_classes = int(max(y.max(), -1 if test is None else test[1].max())) + 1
    if spec.img_size and spec.img_size != x.shape[2]:
        x = resize(x, spec.img_size)
        test = None if test is None else (resize(test[0], spec.img_size), test[1])
    public = None
    if spec.public_classes_from:  # the public task: classes >= K; the private one: the rest
        task, k = y < spec.public_classes_from, spec.public_classes_from
        if not 0 < k < num_classes:
            raise DataError(f"public_classes_from {k} leaves no class for one of the two tasks")
        keep = np.random.default_rng(spec.seed).permutation(int((~task).sum()))
        keep = keep[: max(1, int(len(keep) * spec.public_fraction))]  # as a same-task cut's
        public, x, y = (x[~task][keep], y[~task][keep]), x[task], y[task]
        test = None if test is None else (test[0][test[1] < k], test[1][test[1] < k])
    pos = split_positions(spec, len(x), None if test is None else len(test[0]))
    test_x, test_y = (x, y) if test is None else test
    private_y = y[pos.private]
    return Pools(
        public=(x[pos.public], y[pos.public]) if public is None else public,
        val=(x[pos.val], y[pos.val]),
        private=(x[pos.private], private_y),
        test=(test_x[pos.test], test_y[pos.test]),
        partitions=partition_labels(spec, private_y),
        num_classes=num_classes,
        task_classes=spec.public_classes_from or num_classes,
    )


def _foreign_public(spec: DataSpec, private_x: np.ndarray, num_classes: int) -> tuple:
    """(x, y, classes) of the public set from another task (`spec.public_dataset`): that
    embedded dataset's whole labelled pool, resized to the private images' size (grey images
    repeated over their channels), labels shifted by the private `num_classes`."""
    from flwr_kd.local_data import load_local, resize

    x, y, _ = load_local(spec.public_dataset)
    channels, size = private_x.shape[1], private_x.shape[2]
    if x.shape[2] != size:
        x = resize(x, size)
    if x.shape[1] != channels:
        if x.shape[1] != 1:
            raise DataError(
                f"public dataset '{spec.public_dataset}' has {x.shape[1]} channels, the private "
                f"images {channels}: only grey public images can be repeated over channels"
            )
        x = np.repeat(x, channels, axis=1)
    return x, y + num_classes, int(y.max()) + 1


@functools.lru_cache(maxsize=4)
def load_federated(spec: DataSpec) -> FederatedData:
    """Load and split `spec`'s dataset, once per process and spec: clients call it for every
    message, and a simulation actor serves many clients of the same split. Client partitions
    are built when first asked for (`flwr_kd.partitioning.Partitions`)."""
    logger.debug("loading and splitting %s for %d clients", spec.dataset, spec.num_partitions)
    if spec.dataset.startswith("hf:"):
        from flwr_kd.hf_data import load_hf_pools

        pools = load_hf_pools(spec)
    else:
        pools = _local_pools(spec)
    task_classes = pools.task_classes or pools.num_classes
    if spec.public_dataset:
        px, py, public_classes = _foreign_public(spec, pools.private[0], pools.num_classes)
        pools.public, pools.num_classes = (px, py), pools.num_classes + public_classes
    # Standardise with the statistics of the training pool only.
    private_x = pools.private[0]
    mean, std = float(private_x.mean()), float(private_x.std()) or 1.0

    def norm(a: np.ndarray) -> np.ndarray:
        """In place where the pool is float32 already (its own copy): the peak memory of a
        client process is the dataset once, not twice."""
        a = a if a.dtype == np.float32 else a.astype(np.float32)
        a -= np.float32(mean)
        a /= np.float32(std)
        return a

    channels, size = private_x.shape[1], private_x.shape[2]
    return FederatedData(
        spec=spec,
        model_spec=ModelSpec(num_classes=pools.num_classes, in_chans=channels, img_size=size),
        public_x=norm(pools.public[0]),
        public_y=pools.public[1],
        val_x=norm(pools.val[0]),
        val_y=pools.val[1],
        test_x=norm(pools.test[0]),
        test_y=pools.test[1],
        private_x=norm(private_x),
        private_y=pools.private[1],
        partitions=pools.partitions,
        task_classes=task_classes,
    )
