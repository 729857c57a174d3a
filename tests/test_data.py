"""Datasets and their federated split."""

from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from flwr_kd.data import PARTITIONERS, DataError, DataSpec, load_federated
from flwr_kd.models import ModelSpec, create_model
from flwr_kd.training import predict_logits, train_supervised


def _class_skew(data) -> float:
    """Mean over clients of the share of the client's most frequent class."""
    shares = []
    for part in data.partitions:
        counts = np.bincount(data.private_y[part], minlength=data.model_spec.num_classes)
        shares.append(counts.max() / len(part))
    return float(np.mean(shares))


def _assert_disjoint_cover(data) -> None:
    joined = np.concatenate(data.partitions)
    assert len(joined) == len(np.unique(joined)), "partitions overlap"
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(data.private_y)))


# ---------------------------------------------------------------------------- digits split


def test_digits_split_shapes_and_model_spec():
    data = load_federated(DataSpec(num_partitions=3, alpha=0.5))
    assert data.model_spec == ModelSpec(num_classes=10, in_chans=1, img_size=16)
    n = 1797  # scikit-learn's digits
    n_test, n_public, n_val = int(n * 0.2), int(n * 0.25), int(n * 0.05)
    assert data.test_x.shape == (n_test, 1, 16, 16)
    assert data.public_x.shape == (n_public, 1, 16, 16)
    assert data.val_x.shape == (n_val, 1, 16, 16)
    assert len(data.private_x) == len(data.private_y) == n - n_test - n_public - n_val
    for a in (data.public_x, data.val_x, data.test_x, data.private_x):
        assert a.dtype == np.float32
    assert data.private_y.dtype == np.int64
    # standardised with the private pool's statistics
    assert abs(float(data.private_x.mean())) < 1e-3
    assert float(data.private_x.std()) == pytest.approx(1.0, abs=1e-3)
    assert len(data.partitions) == 3
    _assert_disjoint_cover(data)


def test_same_spec_gives_identical_split_and_other_seed_differs(clean_data_cache):
    spec = DataSpec(num_partitions=4, alpha=0.3, seed=3)
    first = load_federated(spec)
    load_federated.cache_clear()  # rebuild from scratch, not from the cache
    second = load_federated(spec)
    assert first is not second
    for name in ("public_x", "public_y", "val_x", "val_y", "test_x", "private_x", "private_y"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert len(first.partitions) == len(second.partitions)
    for a, b in zip(first.partitions, second.partitions):
        np.testing.assert_array_equal(a, b)

    other = load_federated(DataSpec(num_partitions=4, alpha=0.3, seed=4))
    assert not np.array_equal(first.private_y, other.private_y)
    assert not np.array_equal(first.test_y, other.test_y)
    assert any(
        len(a) != len(b) or not np.array_equal(a, b)
        for a, b in zip(first.partitions, other.partitions)
    )


@pytest.mark.parametrize("alpha", [0.1, 1.0, None])
def test_partitions_are_disjoint_and_cover_the_private_pool(alpha):
    data = load_federated(DataSpec(num_partitions=5, alpha=alpha))
    _assert_disjoint_cover(data)
    assert all(len(p) > 0 for p in data.partitions)


def test_small_alpha_is_more_label_skewed_than_large_alpha():
    skewed = _class_skew(load_federated(DataSpec(num_partitions=5, alpha=0.1)))
    balanced = _class_skew(load_federated(DataSpec(num_partitions=5, alpha=100.0)))
    assert skewed > balanced + 0.2, (skewed, balanced)
    assert balanced < 0.2  # 10 classes: close to 1/10 each


def test_iid_split_has_equal_sizes_and_balanced_labels():
    data = load_federated(DataSpec(num_partitions=4, alpha=None))
    sizes = [len(p) for p in data.partitions]
    assert max(sizes) - min(sizes) <= 1
    assert _class_skew(data) < 0.25
    _assert_disjoint_cover(data)


def test_max_private_caps_the_private_pool():
    data = load_federated(DataSpec(num_partitions=4, alpha=None, max_private=100))
    assert len(data.private_x) == len(data.private_y) == 100
    assert sum(len(p) for p in data.partitions) == 100


def test_client_data_holds_out_a_fifth_of_each_partition():
    data = load_federated(DataSpec(num_partitions=4, alpha=None, max_private=200))
    for pid, part in enumerate(data.partitions):
        train_x, train_y, hold_x, hold_y = data.client_data(pid)
        assert len(train_x) + len(hold_x) == len(part)
        assert len(hold_x) == round(len(part) * 0.2)
        assert len(train_x) == len(train_y) and len(hold_x) == len(hold_y)
        # the client sees exactly its own samples
        mine = data.private_x[part].reshape(len(part), -1)
        got = np.concatenate([train_x, hold_x]).reshape(len(part), -1)
        np.testing.assert_array_equal(np.sort(mine, axis=0), np.sort(got, axis=0))


@pytest.mark.parametrize("pid", [-1, 4, 100])
def test_client_data_rejects_partition_id_out_of_range(pid):
    data = load_federated(DataSpec(num_partitions=4, alpha=None, max_private=200))
    with pytest.raises(DataError, match=f"partition id {pid} out of range for 4 clients"):
        data.client_data(pid)


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.asarray(a, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


@pytest.mark.parametrize(
    ("alpha", "partitions_digest"), [(0.5, "e4910d5ba43396ab"), (None, "f19401fbcf9b1553")]
)
def test_default_digits_split_is_unchanged_by_named_partitioners(alpha, partitions_digest):
    """Digests computed with data.py before partitioners had names (commit 8146c41): every
    existing config, Dirichlet by default and alpha None / 0 as IID, keeps its exact split."""
    data = load_federated(DataSpec(alpha=alpha))
    assert data.spec.partitioner == "dirichlet"
    assert _digest(data.partitions) == partitions_digest
    assert _digest([data.public_y, data.val_y, data.test_y, data.private_y]) == "dbf956efdc453024"


def test_data_spec_config_round_trip():
    for spec in (
        DataSpec(num_partitions=3, alpha=0.7, seed=5, max_private=50),
        DataSpec(alpha=None),
        DataSpec(partitioner="shard", shards_per_client=3, img_size=32),
        DataSpec(partitioner="pathological", classes_per_client=4),
    ):
        config = spec.to_config()
        assert all(k.startswith("data-") for k in config)
        assert all(isinstance(v, (int, float, str)) for v in config.values())
        assert DataSpec.from_config({**config, "unrelated": 1}) == spec
    assert DataSpec(partitioner="iid").to_config()["data-partitioner"] == "iid"


def test_data_spec_from_an_older_config_takes_the_new_defaults():
    new = ("data-partitioner", "data-shards-per-client", "data-classes-per-client", "data-img-size")
    older = {k: v for k, v in DataSpec(alpha=0.3).to_config().items() if k not in new}
    assert DataSpec.from_config(older) == DataSpec(alpha=0.3)


# ---------------------------------------------------------------------------- partitioners


def _classes_per_client(data) -> list[int]:
    return [len(np.unique(data.private_y[p])) for p in data.partitions]


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_every_partitioner_covers_the_digits_private_pool(partitioner):
    # 10 clients for 10 classes: the pathological split gives every class to some client
    data = load_federated(DataSpec(num_partitions=10, partitioner=partitioner))
    _assert_disjoint_cover(data)
    assert all(len(p) > 0 for p in data.partitions)


def test_label_shard_partitioners_give_clients_few_classes():
    iid = _classes_per_client(load_federated(DataSpec(num_partitions=10, partitioner="iid")))
    shard = load_federated(DataSpec(num_partitions=10, partitioner="shard"))
    patho = load_federated(DataSpec(num_partitions=10, partitioner="pathological"))
    assert min(iid) == 10
    # a shard may straddle two classes of the label-sorted pool: 2 shards, at most 4 classes
    assert max(_classes_per_client(shard)) <= 4 and np.mean(_classes_per_client(shard)) < 3.5
    assert _classes_per_client(patho) == [2] * 10
    three = load_federated(
        DataSpec(num_partitions=10, partitioner="pathological", classes_per_client=3)
    )
    assert _classes_per_client(three) == [3] * 10


def test_partitioner_that_cannot_split_is_a_data_error():
    spec = DataSpec(num_partitions=4, partitioner="pathological", classes_per_client=11)
    with pytest.raises(DataError, match="with the 'pathological' partitioner"):
        load_federated(spec)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "cifar-1000"}, "unknown dataset 'cifar-1000'"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"alpha": -1.0}, "alpha must be > 0"),
        ({"num_partitions": 1}, "need at least 2 clients, got 1"),
        ({"num_partitions": 0}, "need at least 2 clients, got 0"),
        ({"public_fraction": 1.0}, "public_fraction must lie strictly between 0 and 1"),
        (
            {"partitioner": "label-skew"},
            "unknown partitioner 'label-skew': choose one of dirichlet, iid, shard, pathological",
        ),
        ({"shards_per_client": 0}, "shards_per_client must be at least 1"),
        ({"classes_per_client": 0}, "classes_per_client must be at least 1"),
        ({"img_size": -1}, "img_size must be positive"),
        ({"public_dataset": "mnist"}, "unknown public dataset 'mnist'"),
        ({"public_dataset": "digits"}, "public dataset 'digits' is the private dataset"),
        ({"public_classes_from": -1}, "public_classes_from must be 0, or a class index"),
        (
            {"public_classes_from": 5, "dataset": "fashion-mnist", "public_dataset": "digits"},
            "without public_dataset",
        ),
        (
            {"public_classes_from": 5, "dataset": "hf:some/dataset"},
            "public_classes_from splits an embedded dataset",
        ),
    ],
)
def test_data_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(DataError, match=match):
        DataSpec(**kwargs)


def test_more_clients_than_private_samples_is_a_data_error():
    with pytest.raises(DataError, match="20 clients but only 10 private samples"):
        load_federated(DataSpec(num_partitions=20, alpha=None, max_private=10))


# ---------------------------------------------------------------------------- fashion-mnist


def _write_idx(path, array: np.ndarray) -> None:
    magic = 0x00000800 | array.ndim  # unsigned bytes, then the number of dimensions
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_fashion_mnist(root, n_train: int, n_test: int):
    """Tiny idx.gz files: image i is uniformly 20 * its label, so pairs can be checked."""
    train_y = (np.arange(n_train) % 10).astype(np.uint8)
    test_y = ((np.arange(n_test) * 3) % 10).astype(np.uint8)
    for prefix, labels in (("train", train_y), ("t10k", test_y)):
        images = np.broadcast_to((labels * 20)[:, None, None], (len(labels), 28, 28))
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", np.ascontiguousarray(images))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return train_y, test_y


def test_fashion_mnist_missing_names_the_debian_package(tmp_path, monkeypatch, clean_data_cache):
    monkeypatch.setenv("FLWR_KD_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as info:
        load_federated(DataSpec(dataset="fashion-mnist", num_partitions=2))
    assert str(tmp_path) in str(info.value)


def test_fashion_mnist_loads_idx_files(tmp_path, monkeypatch, clean_data_cache):
    train_y, test_y = _write_fashion_mnist(tmp_path, n_train=60, n_test=12)
    monkeypatch.setenv("FLWR_KD_FASHION_MNIST_DIR", str(tmp_path))
    data = load_federated(DataSpec(dataset="fashion-mnist", num_partitions=2, alpha=None))

    assert data.model_spec == ModelSpec(num_classes=10, in_chans=1, img_size=28)
    # the shipped test split is used as is, in file order
    assert data.test_x.shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(data.test_y, test_y)
    n_public, n_val = int(60 * 0.25), max(1, int(60 * 0.05))
    assert data.public_x.shape == (n_public, 1, 28, 28)
    assert data.val_x.shape == (n_val, 1, 28, 28)
    assert data.private_x.shape == (60 - n_public - n_val, 1, 28, 28)
    assert sorted(np.concatenate([data.public_y, data.val_y, data.private_y])) == sorted(train_y)
    # images stay paired with their labels through shuffling and standardisation
    for x, y in ((data.private_x, data.private_y), (data.test_x, data.test_y)):
        flat = x.reshape(len(x), -1)
        assert np.all(flat == flat[:, :1])  # each image is still uniform
        order = np.argsort(y, kind="stable")
        assert np.all(np.diff(flat[order, 0]) >= 0), "brighter images must have larger labels"
    _assert_disjoint_cover(data)


def test_public_set_from_another_task_gets_its_own_labels(tmp_path, monkeypatch, clean_data_cache):
    """FedMD's paper regime: Fashion-MNIST private, digits public. The whole digits pool is the
    public set, at the private images' size, with labels past the private classes; the private
    pool keeps what would have been the public cut."""
    _write_fashion_mnist(tmp_path, n_train=60, n_test=12)
    monkeypatch.setenv("FLWR_KD_FASHION_MNIST_DIR", str(tmp_path))
    spec = DataSpec(dataset="fashion-mnist", num_partitions=2, alpha=None, public_dataset="digits")
    data = load_federated(spec)
    digits = load_federated(DataSpec(num_partitions=2))

    assert data.model_spec == ModelSpec(num_classes=20, in_chans=1, img_size=28)
    n_digits = len(digits.public_x) + len(digits.val_x) + len(digits.private_x) + len(digits.test_x)
    assert data.public_x.shape == (n_digits, 1, 28, 28)
    assert sorted(set(data.public_y.tolist())) == list(range(10, 20))
    assert set(data.private_y.tolist()) | set(data.test_y.tolist()) <= set(range(10))
    n_val = max(1, int(60 * 0.05))
    assert len(data.private_x) == 60 - n_val  # no public cut from the private pool
    assert DataSpec.from_config(spec.to_config()) == spec
    _assert_disjoint_cover(data)


def test_public_task_of_other_classes_of_the_same_dataset(tmp_path, monkeypatch, clean_data_cache):
    """Classes >= K are the public task (a `public_fraction` of them), classes < K the private
    pool and the test set; the head keeps every class, the private task's leading."""
    _write_fashion_mnist(tmp_path, n_train=200, n_test=30)
    monkeypatch.setenv("FLWR_KD_FASHION_MNIST_DIR", str(tmp_path))
    spec = DataSpec(dataset="fashion-mnist", num_partitions=2, alpha=None, public_classes_from=6)
    data = load_federated(spec)

    assert data.model_spec.num_classes == 10 and data.task_classes == 6
    assert set(data.public_y.tolist()) <= set(range(6, 10))
    assert len(data.public_x) == int(80 * spec.public_fraction)  # 80 of 200 are classes 6-9
    for labels in (data.private_y, data.val_y, data.test_y):
        assert set(labels.tolist()) <= set(range(6))
    assert len(data.private_x) + len(data.val_x) == 120
    with pytest.raises(DataError, match="leaves no class for one of the two tasks"):
        load_federated(DataSpec(dataset="fashion-mnist", num_partitions=2, public_classes_from=10))


# ---------------------------------------------------------------------------- hf:<local dir>


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3)])
def test_hf_local_parquet_directory(tmp_path, monkeypatch, clean_data_cache, mode, channels):
    import datasets
    from PIL import Image

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    shape = (12, 12) if channels == 1 else (12, 12, 3)

    def make(n: int, num_classes: int):
        images = [
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(n)
        ]
        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=num_classes)}
        )
        labels = [i % num_classes for i in range(n)]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    root = tmp_path / "tiny"
    root.mkdir()
    make(40, 3).to_parquet(str(root / "train.parquet"))
    make(10, 3).to_parquet(str(root / "test.parquet"))

    data = load_federated(DataSpec(dataset=f"hf:{root}", num_partitions=2, alpha=None))
    assert data.model_spec == ModelSpec(num_classes=3, in_chans=channels, img_size=12)
    assert data.test_x.shape == (10, channels, 12, 12)
    np.testing.assert_array_equal(data.test_y, [i % 3 for i in range(10)])
    assert data.public_x.shape == (10, channels, 12, 12)
    assert data.val_x.shape == (2, channels, 12, 12)
    assert data.private_x.shape == (28, channels, 12, 12)
    assert [len(p) for p in data.partitions] == [14, 14]


def test_hf_unloadable_directory_is_a_data_error(tmp_path, clean_data_cache):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DataError, match="cannot load Hugging Face dataset"):
        load_federated(DataSpec(dataset=f"hf:{missing}", num_partitions=2))


# ---------------------------------------------------------------------------- hf: FederatedDataset

CIFAR_LIKE_CLASSES = 6


def _cifar_like(labels: list[int]):
    """RGB 32x32 PIL images whose pixels encode their label (channel c is 30 * label + c), under
    CIFAR-100's column names: `img`, `fine_label`, and a `coarse_label` to be ignored."""
    import datasets
    from PIL import Image

    images = [
        Image.fromarray(np.full((32, 32, 3), [30 * y, 30 * y + 1, 30 * y + 2], np.uint8), "RGB")
        for y in labels
    ]
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(num_classes=CIFAR_LIKE_CLASSES),
            "coarse_label": datasets.Value("int64"),
        }
    )
    columns = {"img": images, "fine_label": labels, "coarse_label": [y // 2 for y in labels]}
    return datasets.Dataset.from_dict(columns, features=features)


TRAIN_LABELS = [i % CIFAR_LIKE_CLASSES for i in range(240)]
TEST_LABELS = [(i * 5) % CIFAR_LIKE_CLASSES for i in range(60)]


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    """Offline Hugging Face ground: a cache in a tmp dir, no Flower telemetry, and a CIFAR-100
    shaped DatasetDict (train 240, test 60) written by save_to_disk to `<root>/cifar-like`."""
    import datasets
    from flwr_datasets.common import telemetry

    root = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(root / "cache"))
        mp.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")
        splits = {"train": _cifar_like(TRAIN_LABELS), "test": _cifar_like(TEST_LABELS)}
        datasets.DatasetDict(splits).save_to_disk(str(root / "cifar-like"))
        yield root
    load_federated.cache_clear()


def _hf_spec(root, **kwargs) -> DataSpec:
    return DataSpec(dataset=f"hf:{root / 'cifar-like'}", **kwargs)


def test_hf_saved_dataset_loads_through_federated_dataset(hf_root, monkeypatch, clean_data_cache):
    import flwr_datasets

    partitions_loaded = []

    class RecordingFederatedDataset(flwr_datasets.FederatedDataset):
        def load_partition(self, partition_id, split=None):
            partitions_loaded.append((partition_id, split))
            return super().load_partition(partition_id, split)

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", RecordingFederatedDataset)
    data = load_federated(_hf_spec(hf_root, num_partitions=4))

    assert partitions_loaded == [(0, "private")]  # the others when first asked for
    assert len(list(data.partitions)) == 4
    assert partitions_loaded == [(pid, "private") for pid in range(4)]
    assert data.model_spec == ModelSpec(num_classes=CIFAR_LIKE_CLASSES, in_chans=3, img_size=32)
    n_public, n_val = int(240 * 0.25), int(240 * 0.05)
    assert data.public_x.shape == (n_public, 3, 32, 32)
    assert data.val_x.shape == (n_val, 3, 32, 32)
    assert data.private_x.shape == (240 - n_public - n_val, 3, 32, 32)
    assert data.test_x.shape == (60, 3, 32, 32)
    np.testing.assert_array_equal(data.test_y, TEST_LABELS)  # the shipped test split, in order
    pool = np.concatenate([data.public_y, data.val_y, data.private_y])
    assert sorted(pool) == sorted(TRAIN_LABELS)
    assert abs(float(data.private_x.mean())) < 1e-3
    assert float(data.private_x.std()) == pytest.approx(1.0, abs=1e-3)
    for x, y in ((data.private_x, data.private_y), (data.test_x, data.test_y)):
        # each channel uniform, channels in RGB order, brighter images with larger labels
        assert np.all(x == x[:, :, :1, :1])
        assert np.all(x[:, 0, 0, 0] < x[:, 1, 0, 0]) and np.all(x[:, 1, 0, 0] < x[:, 2, 0, 0])
        order = np.argsort(y, kind="stable")
        assert np.all(np.diff(x[order, 0, 0, 0]) >= 0)
    _assert_disjoint_cover(data)


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_hf_every_partitioner_covers_the_private_pool(hf_root, partitioner):
    spec = _hf_spec(hf_root, num_partitions=CIFAR_LIKE_CLASSES, partitioner=partitioner)
    data = load_federated(spec)
    _assert_disjoint_cover(data)
    assert all(len(p) > 0 for p in data.partitions)
    classes = _classes_per_client(data)
    if partitioner == "shard":
        assert max(classes) <= 4  # 2 shards, each at most across one class boundary
    if partitioner == "pathological":
        assert classes == [2] * CIFAR_LIKE_CLASSES
    if partitioner == "iid":
        assert min(classes) >= 5


def test_hf_images_resize_to_img_size_and_keep_their_channels(hf_root, clean_data_cache):
    import datasets
    from PIL import Image

    data = load_federated(_hf_spec(hf_root, img_size=16, alpha=None))
    assert data.model_spec == ModelSpec(num_classes=CIFAR_LIKE_CLASSES, in_chans=3, img_size=16)
    assert data.test_x.shape == (60, 3, 16, 16)

    # grayscale images of two sizes, plain int labels, one split saved by Dataset.save_to_disk
    sizes = [20 if i % 2 else 28 for i in range(50)]
    images = [Image.new("L", (s, s), color=10 * (i % 4)) for i, s in enumerate(sizes)]
    gray = datasets.Dataset.from_dict({"image": images, "label": [i % 4 for i in range(50)]})
    gray = gray.cast_column("image", datasets.Image())
    gray.save_to_disk(str(hf_root / "gray"))
    data = load_federated(DataSpec(dataset=f"hf:{hf_root / 'gray'}", num_partitions=2, img_size=24))
    assert data.model_spec == ModelSpec(num_classes=4, in_chans=1, img_size=24)
    assert data.test_x.shape == (10, 1, 24, 24)  # no test split: 20% of the pool
    assert data.private_x.shape == (50 - 10 - 12 - 2, 1, 24, 24)


def test_hf_missing_columns_say_what_to_do(hf_root, clean_data_cache):
    import datasets

    other = datasets.Dataset.from_dict({"picture": [[0, 1]] * 8, "target": [0, 1] * 4})
    other.save_to_disk(str(hf_root / "other-columns"))
    spec = DataSpec(dataset=f"hf:{hf_root / 'other-columns'}", num_partitions=2)
    with pytest.raises(DataError, match="lack an image column .*img.* rename_column"):
        load_federated(spec)


def test_hf_hub_id_offline_says_download_first_or_pass_a_directory(
    hf_root, monkeypatch, clean_data_cache
):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="download it first .* or pass a local directory"):
        load_federated(DataSpec(dataset="hf:nobody/not-in-the-cache", num_partitions=2))


def test_timm_model_trains_a_step_on_hf_data(hf_root):
    data = load_federated(_hf_spec(hf_root, num_partitions=4))
    model = create_model("resnet10t", data.model_spec)
    before = [p.detach().clone() for p in model.parameters()]
    train_x, train_y, _, _ = data.client_data(0)
    loss = train_supervised(model, train_x[:16], train_y[:16], epochs=1, batch_size=16)
    assert np.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert predict_logits(model, data.test_x[:8]).shape == (8, CIFAR_LIKE_CLASSES)
