"""What determines a federated split, and where each sample of the labelled pool goes.

`DataSpec` is the value that the server and every stateless client rebuild the same split from
(a few `data-*` config values). `split_positions` turns it into the row positions of the public,
validation, test and private pools, so that embedded arrays (`flwr_kd.local_data`) and Hugging
Face datasets (`flwr_kd.hf_data`) are cut in exactly the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DATASETS = ("digits", "fashion-mnist")
#: How the private pool is split over clients (flwr-datasets' partitioners, see DataSpec).
PARTITIONERS = ("dirichlet", "iid", "shard", "pathological")


class DataError(ValueError):
    """The dataset cannot be loaded or split as asked."""


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines the federated split (and nothing else).

    `dataset`: "digits", "fashion-mnist" or "hf:<Hugging Face id or local directory>".
    `partitioner` splits the private pool over the clients (flwr-datasets' partitioners):
    "dirichlet" skews labels with concentration `alpha` (`alpha` None, 0 on the wire, means
    IID, as it always has); "iid" splits evenly; "shard" gives each client at most
    `shards_per_client` label-sorted shards (McMahan et al.; every sample is used);
    "pathological" gives each client `classes_per_client` classes.
    `img_size` is the side of the square images models see: 0 keeps the dataset's own (16 for
    digits, 28 for Fashion-MNIST, the first training image's larger side for hf: datasets).
    `public_dataset` (FedMD's own regime, Li & Wang 2019): "" cuts the public set from
    `dataset`'s pool (`public_fraction` of it); an embedded dataset's name instead makes its
    whole labelled pool the public set, a different task: resized to the private images' size,
    its labels shifted past the private classes, so models get a head over both label sets.
    `public_classes_from` K > 0 splits `dataset` by task instead: its classes K and up are the
    public labelled set (`public_fraction` of them; the paper's CIFAR-10 public for CIFAR-100
    private: one image domain, other labels), classes below K the private pool and test set.
    """

    dataset: str = "digits"
    num_partitions: int = 8
    alpha: float | None = 0.5  # Dirichlet concentration; None means IID
    seed: int = 0
    public_fraction: float = 0.25
    val_fraction: float = 0.05
    test_fraction: float = 0.2  # used only when the dataset ships no test split
    max_private: int = 0  # cap on the private pool (0: no cap), to size CPU runs
    max_test: int = 0  # cap on the test set (0: no cap)
    partitioner: str = "dirichlet"
    shards_per_client: int = 2  # partitioner "shard"
    classes_per_client: int = 2  # partitioner "pathological"
    img_size: int = 0  # 0: the dataset's own size
    public_dataset: str = ""  # "": public set cut from `dataset`; else another task's pool
    public_classes_from: int = 0  # K > 0: classes >= K of `dataset` are the public task

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
        if self.partitioner not in PARTITIONERS:
            raise DataError(
                f"unknown partitioner '{self.partitioner}': choose one of {', '.join(PARTITIONERS)}"
            )
        for name in ("shards_per_client", "classes_per_client"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.public_dataset and self.public_dataset not in DATASETS:
            raise DataError(
                f"unknown public dataset '{self.public_dataset}': choose one of "
                f"{', '.join(DATASETS)} (or none, to cut the public set from the private one)"
            )
        if self.public_classes_from < 0 or (self.public_classes_from and self.public_dataset):
            raise DataError(
                "public_classes_from must be 0, or a class index K > 0 without public_dataset "
                f"(classes >= K of '{self.dataset}' form the public task), got "
                f"{self.public_classes_from}"
            )
        if self.public_classes_from and self.dataset not in DATASETS:
            raise DataError(
                f"public_classes_from splits an embedded dataset ({', '.join(DATASETS)}) by "
                f"task; '{self.dataset}' is not one: give it a public_dataset instead"
            )
        if self.public_dataset == self.dataset:
            raise DataError(
                f"public dataset '{self.public_dataset}' is the private dataset: leave it empty "
                "to cut the public set from the private pool"
            )
        if self.img_size < 0:
            raise DataError(
                f"img_size must be positive (or 0 for the dataset's own), got {self.img_size}"
            )

    def to_config(self) -> dict[str, int | float | str]:
        """Flat config values (Flower ConfigRecord compatible); alpha None becomes 0."""
        values = asdict(self)
        values["alpha"] = self.alpha or 0.0
        return {f"data-{k.replace('_', '-')}": v for k, v in values.items()}

    @classmethod
    def from_config(cls, config: dict) -> DataSpec:
        """The spec `to_config` wrote; keys it lacks (older senders) take their defaults."""
        values = {
            k[len("data-") :].replace("-", "_"): v
            for k, v in config.items()
            if k.startswith("data-")
        }
        values["alpha"] = float(values.get("alpha", 0.5)) or None
        return cls(**values)


@dataclass(frozen=True)
class SplitPositions:
    """Row positions of each pool in the labelled pool; `test`'s are in the dataset's own test
    split when it ships one."""

    public: np.ndarray
    val: np.ndarray
    private: np.ndarray
    test: np.ndarray


def split_positions(spec: DataSpec, pool_size: int, test_size: int | None) -> SplitPositions:
    """Shuffle the labelled pool with `spec.seed` and cut it: test (only when the dataset ships
    none, `test_size` None), public (none when the public set is another task's:
    `public_dataset` or `public_classes_from`), validation, then the private rest; apply the
    caps."""
    order = np.random.default_rng(spec.seed).permutation(pool_size)
    cut = 0
    if test_size is None:
        cut = int(pool_size * spec.test_fraction)
        test = order[:cut]
    else:
        test = np.arange(test_size)  # the shipped test split, in file order
    foreign = spec.public_dataset or spec.public_classes_from
    n_public = 0 if foreign else int(pool_size * spec.public_fraction)
    n_val = max(1, int(pool_size * spec.val_fraction))
    public = order[cut : cut + n_public]
    val = order[cut + n_public : cut + n_public + n_val]
    private = order[cut + n_public + n_val :]
    if spec.max_private:
        private = private[: spec.max_private]
    if spec.max_test:
        test = test[: spec.max_test]
    if spec.num_partitions > len(private):
        raise DataError(
            f"{spec.num_partitions} clients but only {len(private)} private samples in "
            f"'{spec.dataset}': use fewer clients"
        )
    return SplitPositions(public, val, private, test)


@dataclass
class Pools:
    """What a dataset loader hands to `load_federated`: (float32 NCHW images, in [0, 1] for image
    files; int64 labels) of each pool, the private pool's client partitions (indices into it)
    and the class count."""

    public: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    private: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    partitions: list[np.ndarray]
    num_classes: int
    task_classes: int = 0  # the private task's classes, the leading ones (0: all)
