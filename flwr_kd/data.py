"""Datasets and their federated split.

One labelled pool becomes: a public distillation set (unlabelled for FedDF, labelled for FedMD's
transfer learning), a small labelled server validation set (early stopping of distillation), a
test set, and one private partition per client, split non-IID with flwr-datasets'
`DirichletPartitioner(alpha)` (or `IidPartitioner`). The same `DataSpec` always gives the same
split, so clients and server can each rebuild it from a few config values.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flwr_kd.models import ModelSpec

DATASETS = ("digits", "fashion-mnist")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "sudo apt-get install dataset-fashion-mnist"
#: Share of each client's private partition held out for its own evaluation and early stopping.
CLIENT_HOLDOUT_FRACTION = 0.2


class DataError(ValueError):
    """The dataset cannot be loaded or split as asked."""


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines the federated split (and nothing else)."""

    dataset: str = "digits"
    num_partitions: int = 8
    alpha: float | None = 0.5  # Dirichlet concentration; None means IID
    seed: int = 0
    public_fraction: float = 0.25
    val_fraction: float = 0.05
    test_fraction: float = 0.2  # used only when the dataset ships no test split
    max_private: int = 0  # cap on the private pool (0: no cap), to size CPU runs
    max_test: int = 0  # cap on the test set (0: no cap)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS and not self.dataset.startswith("hf:"):
            raise DataError(
                f"unknown dataset '{self.dataset}': choose one of {', '.join(DATASETS)} "
                "or hf:<Hugging Face dataset or local path>"
            )
        if self.num_partitions < 2:
            raise DataError(f"need at least 2 clients, got {self.num_partitions}")
        if self.alpha is not None and not self.alpha > 0:
            raise DataError(f"alpha must be > 0 (smaller is more skewed), got {self.alpha}")
        for name in ("public_fraction", "val_fraction", "test_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise DataError(f"{name} must lie strictly between 0 and 1")

    def to_config(self) -> dict[str, int | float | str]:
        """Flat config values (Flower ConfigRecord compatible); alpha None becomes 0."""
        values = asdict(self)
        values["alpha"] = self.alpha or 0.0
        return {f"data-{k.replace('_', '-')}": v for k, v in values.items()}

    @classmethod
    def from_config(cls, config: dict) -> DataSpec:
        values = {
            k[len("data-") :].replace("-", "_"): v
            for k, v in config.items()
            if k.startswith("data-")
        }
        values["alpha"] = float(values.get("alpha", 0.5)) or None
        return cls(**values)


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
    partitions: list[np.ndarray]  # indices into private_x, one array per client

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
        n_hold = int(round(len(idx) * CLIENT_HOLDOUT_FRACTION)) if len(idx) >= 5 else 0
        hold, train = idx[:n_hold], idx[n_hold:]
        return (
            self.private_x[train],
            self.private_y[train],
            self.private_x[hold],
            self.private_y[hold],
        )


# ---------------------------------------------------------------------------- raw loading


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    import torch

    t = torch.from_numpy(x)
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear").numpy()


def _load_digits() -> tuple[np.ndarray, np.ndarray, None]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]  # 8x8, too small for most stems
    return _resize(x, 16), bunch.target.astype(np.int64), None


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    root = Path(os.environ.get("FLWR_KD_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    files = {
        "train_x": "train-images-idx3-ubyte.gz",
        "train_y": "train-labels-idx1-ubyte.gz",
        "test_x": "t10k-images-idx3-ubyte.gz",
        "test_y": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [name for name in files.values() if not (root / name).exists()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {root} (missing {missing[0]}); "
            f"install it with: {FASHION_MNIST_INSTALL}"
        )
    arr = {k: _read_idx(root / v) for k, v in files.items()}

    def images(a: np.ndarray) -> np.ndarray:
        return (a.astype(np.float32) / 255.0)[:, None]

    return (
        images(arr["train_x"]),
        arr["train_y"].astype(np.int64),
        (images(arr["test_x"]), arr["test_y"].astype(np.int64)),
    )


def _hf_to_numpy(ds) -> tuple[np.ndarray, np.ndarray]:
    image_col = next((c for c in ("image", "img", "pixel_values") if c in ds.column_names), None)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in ds.column_names), None)
    if image_col is None or label_col is None:
        raise DataError(
            f"dataset columns {ds.column_names} lack an image ('image'/'img') or label "
            "('label'/'labels') column"
        )
    images = [np.asarray(img, dtype=np.float32) for img in ds[image_col]]
    if len({im.shape for im in images}) != 1:
        raise DataError("images of different sizes; resize the dataset first")
    x = np.stack(images)
    x = x[:, None] if x.ndim == 3 else np.transpose(x, (0, 3, 1, 2))  # NHW or NHWC -> NCHW
    if x.max() > 1.0:
        x = x / 255.0
    return x.astype(np.float32), np.asarray(ds[label_col], dtype=np.int64)


def _load_hf(name: str) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """A Hugging Face dataset (hub id when online, or a local directory of data files)."""
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:
        raise DataError(f"cannot load Hugging Face dataset '{name}': {exc}") from exc
    train = _hf_to_numpy(loaded["train"])
    test = _hf_to_numpy(loaded["test"]) if "test" in loaded else None
    return train[0], train[1], test


def load_raw(dataset: str):
    """(x, y, test_or_None) for a dataset name; see `DataSpec.dataset`."""
    if dataset == "digits":
        return _load_digits()
    if dataset == "fashion-mnist":
        return _load_fashion_mnist()
    if dataset.startswith("hf:"):
        return _load_hf(dataset[3:])
    raise DataError(f"unknown dataset '{dataset}'")


# ---------------------------------------------------------------------------- the split


def _partition(labels: np.ndarray, spec: DataSpec) -> list[np.ndarray]:
    """Client index arrays from flwr-datasets' partitioners (Dirichlet over labels, or IID)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    n = spec.num_partitions
    if spec.alpha is None:
        partitioner = IidPartitioner(num_partitions=n)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=n,
            partition_by="label",
            alpha=spec.alpha,
            # every client needs a few samples to train on; tiny pools cannot ask for more
            min_partition_size=max(1, min(10, len(labels) // (4 * n))),
            self_balancing=False,
            seed=spec.seed,
        )
    partitioner.dataset = Dataset.from_dict({"label": labels, "index": np.arange(len(labels))})
    return [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(n)]


@functools.lru_cache(maxsize=4)
def load_federated(spec: DataSpec) -> FederatedData:
    """Load and split `spec`'s dataset (cached per process: clients call it per message)."""
    x, y, test = load_raw(spec.dataset)
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    n = len(x)
    cut = 0
    if test is None:
        n_test = int(n * spec.test_fraction)
        test = (x[:n_test], y[:n_test])
        cut = n_test
    n_public, n_val = int(n * spec.public_fraction), max(1, int(n * spec.val_fraction))
    public = (x[cut : cut + n_public], y[cut : cut + n_public])
    val = (x[cut + n_public : cut + n_public + n_val], y[cut + n_public : cut + n_public + n_val])
    private = (x[cut + n_public + n_val :], y[cut + n_public + n_val :])
    if spec.max_private:
        private = (private[0][: spec.max_private], private[1][: spec.max_private])
    if spec.max_test:
        test = (test[0][: spec.max_test], test[1][: spec.max_test])
    if spec.num_partitions > len(private[0]):
        raise DataError(
            f"{spec.num_partitions} clients but only {len(private[0])} private samples in "
            f"'{spec.dataset}': use fewer clients"
        )
    # Standardise with the statistics of the training pool only.
    mean, std = float(private[0].mean()), float(private[0].std()) or 1.0

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a - mean) / std).astype(np.float32)

    channels, size = x.shape[1], x.shape[2]
    num_classes = int(max(y.max(), test[1].max())) + 1
    return FederatedData(
        spec=spec,
        model_spec=ModelSpec(num_classes=num_classes, in_chans=channels, img_size=size),
        public_x=norm(public[0]),
        public_y=public[1],
        val_x=norm(val[0]),
        val_y=val[1],
        test_x=norm(test[0]),
        test_y=test[1],
        private_x=norm(private[0]),
        private_y=private[1],
        partitions=_partition(private[1], spec),
    )
