"""quickstart-feddf: the data and the models of this app.

Data comes through flwr-datasets, as in Flower's quickstart-pytorch: a `FederatedDataset` for a
Hugging Face dataset (run config `dataset = "ylecun/mnist"`, online or from the cache) or,
offline, scikit-learn's handwritten digits as a `datasets.DatasetDict` split by the same
partitioner. The training split is divided into private data (partitioned across the nodes),
public data (unlabelled for FedDF: the server distils on it) and a small server validation set.
Everything is a function of the run config, so every node and the server rebuild the same split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner
from flwr_datasets.preprocessor import Divider

from flwr_kd.client import ClientData
from flwr_kd.models import ModelSpec, create_model
from flwr_kd.records import pack_models

#: The dataset that ships with scikit-learn (no download).
OFFLINE_DATASET = "digits"
#: The training split, divided: private (partitioned), public (distillation), server validation.
DIVIDE = {"train": {"train": 0.7, "public": 0.25, "val": 0.05}}
#: Pixels in [0, 1] are standardised with these constants everywhere: whoever uses the saved
#: models prepares inputs the same way (`models.json` records them).
MEAN, STD = 0.5, 0.5


@dataclass(frozen=True)
class DataConfig:
    """The run-config values that determine the data (hashable: loads are cached by it)."""

    dataset: str
    alpha: float
    seed: int
    img_size: int
    num_classes: int

    @classmethod
    def from_run_config(cls, run_config) -> DataConfig:
        return cls(
            dataset=str(run_config["dataset"]),
            alpha=float(run_config["alpha"]),
            seed=int(run_config["seed"]),
            img_size=int(run_config["img-size"]),
            num_classes=int(run_config["num-classes"]),
        )


def architectures(run_config) -> list[str]:
    """The timm architectures of the federation (node i runs the (i mod k)-th)."""
    return [a.strip() for a in str(run_config["archs"]).split(",") if a.strip()]


class LocalFederatedDataset:
    """`FederatedDataset`'s two calls over a `DatasetDict` already in memory."""

    def __init__(self, splits: DatasetDict, partitioner: Partitioner) -> None:
        self.splits, self.partitioner = splits, partitioner
        partitioner.dataset = splits["train"]

    def load_partition(self, partition_id: int) -> Dataset:
        return self.partitioner.load_partition(partition_id)

    def load_split(self, split: str) -> Dataset:
        return self.splits[split]


def digits(seed: int) -> DatasetDict:
    """scikit-learn's 1,797 handwritten digits (8x8) as a train/test `DatasetDict`."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    features = Features({"image": Array2D((8, 8), "uint8"), "label": ClassLabel(num_classes=10)})
    dataset = Dataset.from_dict({"image": images, "label": bunch.target}, features=features)
    return dataset.train_test_split(test_size=0.2, seed=seed)


@functools.lru_cache(maxsize=2)
def federated_dataset(cfg: DataConfig, num_partitions: int):
    """The dataset, divided and partitioned (built once per process)."""
    if cfg.alpha > 0:  # label skew: smaller alpha, more skewed
        partitioner = DirichletPartitioner(
            num_partitions, "label", cfg.alpha, min_partition_size=10, seed=cfg.seed
        )
    else:
        partitioner = IidPartitioner(num_partitions)
    if cfg.dataset == OFFLINE_DATASET:
        return LocalFederatedDataset(Divider(DIVIDE)(digits(cfg.seed)), partitioner)
    return FederatedDataset(
        dataset=cfg.dataset,
        partitioners={"train": partitioner},
        preprocessor=Divider(DIVIDE),
        seed=cfg.seed,
    )


def to_arrays(dataset: Dataset, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images as standardised float32 (N, C, img_size, img_size), labels as int64."""
    columns = dataset.with_format("numpy")[:]
    x = np.asarray(columns["image" if "image" in columns else "img"], np.float32) / 255.0
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # NHW or NHWC -> NCHW
    x = torch.nn.functional.interpolate(torch.from_numpy(x), size=img_size, mode="bilinear")
    return ((x.numpy() - MEAN) / STD).astype(np.float32), columns["label"].astype(np.int64)


@functools.lru_cache(maxsize=8)
def _client_data(cfg: DataConfig, partition_id: int, num_partitions: int) -> ClientData:
    partition = federated_dataset(cfg, num_partitions).load_partition(partition_id)
    split = partition.train_test_split(test_size=0.2, seed=cfg.seed)  # as Flower's quickstart
    train_x, train_y = to_arrays(split["train"], cfg.img_size)
    holdout_x, holdout_y = to_arrays(split["test"], cfg.img_size)
    spec = ModelSpec(cfg.num_classes, train_x.shape[1], cfg.img_size)
    return ClientData(train_x, train_y, holdout_x, holdout_y, spec)


def load_client_data(context: Context, config: ConfigRecord) -> ClientData:
    """This node's private data, for `KDClient(load_data=...)`: its partition, 80% to train on
    and 20% held out. Cached: flwr-kd asks for it with every message."""
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    return _client_data(
        DataConfig.from_run_config(context.run_config), partition_id, num_partitions
    )


@dataclass
class ServerData:
    """What the server holds: unlabelled public inputs, a validation set, a test set."""

    public_x: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    model_spec: ModelSpec


def load_server_data(run_config) -> ServerData:
    """The server's splits (they do not depend on the number of partitions)."""
    cfg = DataConfig.from_run_config(run_config)
    fds = federated_dataset(cfg, 2)
    public_x, _ = to_arrays(fds.load_split("public"), cfg.img_size)  # labels stay unused
    val_x, val_y = to_arrays(fds.load_split("val"), cfg.img_size)
    test_x, test_y = to_arrays(fds.load_split("test"), cfg.img_size)
    spec = ModelSpec(cfg.num_classes, test_x.shape[1], cfg.img_size)
    return ServerData(public_x, val_x, val_y, test_x, test_y, spec)


def initial_models(archs: list[str], spec: ModelSpec, seed: int) -> ArrayRecord:
    """One freshly initialised model per architecture, in one `ArrayRecord` keyed
    `"<arch>/<parameter>"`, the layout flwr-kd's strategies carry between rounds."""
    torch.manual_seed(seed)
    states = {}
    for arch in archs:
        states[arch] = {k: v.numpy() for k, v in create_model(arch, spec).state_dict().items()}
    return pack_models(states)
