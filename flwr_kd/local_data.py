"""Datasets that need no download: scikit-learn's digits and Debian's Fashion-MNIST files.

Each loader returns the whole labelled pool as arrays, (x, y, test or None): images float32
NCHW in [0, 1], labels int64, and the dataset's own test split when it ships one.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from flwr_kd.dataspec import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "sudo apt-get install dataset-fashion-mnist"


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a batch of NCHW images to size x size."""
    import torch

    t = torch.from_numpy(x)
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear").numpy()


def _load_digits() -> tuple[np.ndarray, np.ndarray, None]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]  # 8x8, too small for most stems
    return resize(x, 16), bunch.target.astype(np.int64), None


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
        x = a.astype(np.float32)
        x /= np.float32(255.0)  # in place: one float copy of the 60,000 images, not two
        return x[:, None]

    return (
        images(arr["train_x"]),
        arr["train_y"].astype(np.int64),
        (images(arr["test_x"]), arr["test_y"].astype(np.int64)),
    )


def load_local(dataset: str):
    """(x, y, test_or_None) of an embedded dataset ("digits" or "fashion-mnist")."""
    if dataset == "digits":
        return _load_digits()
    if dataset == "fashion-mnist":
        return _load_fashion_mnist()
    raise DataError(f"unknown dataset '{dataset}'")
