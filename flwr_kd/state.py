"""Named sets of arrays kept between calls: client models, pretrained weights.

FedMD clients keep private models across rounds. Flower's `context.state` would be copied with
every message, so state goes to a store named by a URI in the round config: `file://<dir>`
(simulation: one directory per run, one file per node). The serverless runtime adds Cloud
Storage behind the same two calls. The transfer-learning cache is the same kind of store.
Arrays are stored as `.npz` and loaded without pickle.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from flwr_kd.records import State


class LocalStateStore:
    """One `.npz` file per key under a directory; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"invalid state key '{key}'")
        return self.root / f"{key}.npz"

    def load(self, key: str) -> State | None:
        path = self._path(key)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}

    def save(self, key: str, state: State) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **state)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.")
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, self._path(key))


def open_state_store(uri: str):
    """The store a `state-uri` config value names: `file://<dir>` or `gs://<bucket>/<prefix>`."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return LocalStateStore(parsed.path)
    if parsed.scheme == "gs":
        from flwr_kd.serverless.arraystore import GcsArrayStore, GcsStateStore

        return GcsStateStore(GcsArrayStore(parsed.netloc), parsed.path.lstrip("/"))
    raise ValueError(
        f"unsupported client state URI '{uri}' (expected file://<dir> or gs://<bucket>/<prefix>)"
    )
