"""Datasets and their federated split."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from flwr_kd.data import DataError, DataSpec, load_federated
from flwr_kd.models import ModelSpec


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


def test_data_spec_config_round_trip():
    for spec in (
        DataSpec(num_partitions=3, alpha=0.7, seed=5, max_private=50),
        DataSpec(alpha=None),
    ):
        config = spec.to_config()
        assert all(k.startswith("data-") for k in config)
        assert all(isinstance(v, (int, float, str)) for v in config.values())
        assert DataSpec.from_config({**config, "unrelated": 1}) == spec


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
