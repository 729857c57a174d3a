"""Hugging Face datasets (`hf:<id or local directory>`) through flwr-datasets' FederatedDataset.

`FederatedDataset` loads the dataset the way Flower users do: from the hub, from the Hugging
Face cache when offline (`HF_DATASETS_OFFLINE=1`), or from a local directory (one written by
`save_to_disk`, or data files `datasets.load_dataset` reads). Its preprocessor cuts the
pools exactly as for the embedded datasets (`split_positions`, no extra shuffle), and its
partitioner for the private pool is the one `DataSpec.partitioner` names. Images are decoded
once per pool into one channel layout (grayscale stays 1 channel, colour becomes RGB) and one
square size (`DataSpec.img_size`, or the first training image's larger side).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict
from PIL import Image

from flwr_kd.dataspec import DataError, DataSpec, Pools, split_positions
from flwr_kd.local_data import resize
from flwr_kd.partitioning import INDEX_COLUMN, LABEL_COLUMN, SpecPartitioner, client_partitions

IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")
POOLS = ("public", "val", "private", "test")
#: PIL modes decoded as one channel; every other mode (RGB, RGBA, palette, CMYK...) as RGB.
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
OFFLINE_HINT = (
    "if the hub is out of reach (offline, or HF_DATASETS_OFFLINE=1), download it first (load it "
    "once online: it stays in the Hugging Face cache) or pass a local directory: "
    "hf:/path/to/dir (saved with save_to_disk, or data files such as parquet)"
)


def _load_arguments(source: str) -> dict:
    """FederatedDataset's dataset name and load_dataset arguments for a hub id or a directory.

    `load_dataset` refuses `save_to_disk` directories, so their Arrow files load through the
    packaged "arrow" builder, one entry per split."""
    path = Path(source).expanduser()
    if not path.is_dir():
        if source.startswith(("/", ".", "~")):
            raise DataError(f"cannot load Hugging Face dataset '{source}': no such directory")
        return {"dataset": source}
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return {"dataset": "arrow", "data_files": {s: _arrow_files(path / s) for s in splits}}
    if (path / "state.json").exists():
        return {"dataset": "arrow", "data_files": {"train": _arrow_files(path)}}
    return {"dataset": str(path)}


def _arrow_files(split_dir: Path) -> list[str]:
    state = json.loads((split_dir / "state.json").read_text())
    return [str(split_dir / f["filename"]) for f in state["_data_files"]]


def _standard_columns(ds: Dataset) -> Dataset:
    """Only the image and label columns, named `image` and `label`."""
    image = next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
    label = next((c for c in LABEL_COLUMNS if c in ds.column_names), None)
    if image is None or label is None:
        raise DataError(
            f"dataset columns {ds.column_names} lack an image column (one of "
            f"{', '.join(IMAGE_COLUMNS)}) or a label column (one of {', '.join(LABEL_COLUMNS)}): "
            "rename yours with datasets' rename_column, then save_to_disk and pass that directory"
        )
    ds = ds.select_columns([image, label])
    renames = {old: new for old, new in ((image, "image"), (label, LABEL_COLUMN)) if old != new}
    return ds.rename_columns(renames) if renames else ds


class _Resplit:
    """FederatedDataset's preprocessor: the train split (or the only one) becomes the spec's
    public, val and private pools, the test split (or a cut of train) the test pool. It notes
    what decoding needs: the class count and the first training image."""

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec
        self.num_classes = 0
        self.first_image = None

    def __call__(self, loaded: DatasetDict) -> DatasetDict:
        if "train" not in loaded and len(loaded) != 1:
            raise DataError(f"no 'train' split among {list(loaded)}: rename the one to use")
        train_name = "train" if "train" in loaded else next(iter(loaded))
        train = _standard_columns(loaded[train_name])
        has_test = "test" in loaded and train_name != "test"
        test = _standard_columns(loaded["test"]) if has_test else None
        pos = split_positions(self.spec, len(train), None if test is None else len(test))
        pool_position = np.full(len(train), -1, dtype=np.int64)
        pool_position[pos.private] = np.arange(len(pos.private))
        train = train.add_column(INDEX_COLUMN, pool_position)
        labelled = [train] if test is None else [train, test]
        seen = max(int(np.max(np.asarray(ds[LABEL_COLUMN]))) for ds in labelled) + 1
        feature = train.features[LABEL_COLUMN]
        self.num_classes = max(seen, feature.num_classes if isinstance(feature, ClassLabel) else 0)
        self.first_image = train[int(pos.private[0])]["image"]
        return DatasetDict(
            public=train.select(pos.public),
            val=train.select(pos.val),
            private=train.select(pos.private),
            test=(train if test is None else test).select(pos.test),
        )


def _layout(first) -> tuple[str | None, int]:
    """(PIL mode every image is converted to, or None for array images; native side)."""
    if isinstance(first, Image.Image):
        return ("L" if first.mode in GRAYSCALE_MODES else "RGB"), max(first.size)
    return None, max(np.asarray(first).shape[:2])


def _image_array(value, mode: str | None, size: int) -> np.ndarray:
    """One image as float32 CHW at size x size: PIL images scaled to [0, 1], array images
    (HW or HWC) scaled only when they hold integers."""
    if mode is not None:
        img = value if value.mode == mode else value.convert(mode)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        a = np.asarray(img, dtype=np.float32) / 255.0
    else:
        raw = np.asarray(value)
        a = raw.astype(np.float32) / (255.0 if np.issubdtype(raw.dtype, np.integer) else 1.0)
    a = a[None] if a.ndim == 2 else np.transpose(a, (2, 0, 1))
    if a.shape[1:] != (size, size):
        a = resize(np.ascontiguousarray(a[None]), size)[0]
    return a


def _decode(ds: Dataset, mode: str | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    images = [_image_array(v, mode, size) for batch in ds.iter(512) for v in batch["image"]]
    if len({a.shape for a in images}) > 1:
        raise DataError("images with different channel counts; convert them to one first")
    return np.stack(images), np.asarray(ds[LABEL_COLUMN], dtype=np.int64)


def load_hf_pools(spec: DataSpec) -> Pools:
    """Load, re-split, partition and decode `spec.dataset` ("hf:<id or directory>"). The
    `FederatedDataset` stays with the partitions, which it builds when first asked for."""
    from flwr_datasets import FederatedDataset

    source = spec.dataset[len("hf:") :]
    resplit = _Resplit(spec)
    fds = FederatedDataset(
        partitioners={"private": SpecPartitioner(spec)},
        preprocessor=resplit,
        shuffle=False,  # split_positions shuffles with spec.seed, as for embedded datasets
        **_load_arguments(source),
    )
    try:
        splits = {name: fds.load_split(name) for name in POOLS}
    except DataError:
        raise
    except Exception as exc:  # the hub, the cache and local files fail in many ways
        hint = "" if Path(source).expanduser().is_dir() else f"; {OFFLINE_HINT}"
        raise DataError(f"cannot load Hugging Face dataset '{source}': {exc}{hint}") from exc
    partitions = client_partitions(spec, lambda pid: fds.load_partition(pid, "private"))
    mode, native = _layout(resplit.first_image)
    arrays = {name: _decode(ds, mode, spec.img_size or native) for name, ds in splits.items()}
    return Pools(**arrays, partitions=partitions, num_classes=resplit.num_classes)
