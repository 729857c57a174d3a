"""Named sets of arrays kept between calls: client models, pretrained weights.

FedMD clients keep private models across rounds. Flower's `context.state` would be copied with
every message, so state goes to a store named by a URI in the round config: `file://<dir>`
(simulation: one directory per run, one file per node). The serverless runtime registers Cloud
Storage (`gs://`) behind the same two calls. The transfer-learning cache is the same kind of store.
Arrays are stored as `.npz` and loaded without pickle.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import ParseResult, urlparse

import numpy as np

from flwr_kd.records import State, load_npz


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
        return load_npz(path)

    def save(self, key: str, state: State) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **state)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.")
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, self._path(key))


#: URI scheme -> how to open a store of that scheme from the parsed URI. Runtimes add theirs
#: (`register_state_store`), so that this core module imports none of them.
_FACTORIES: dict[str, Callable[[ParseResult], object]] = {
    "file": lambda parsed: LocalStateStore(parsed.path)
}
#: Who registers the schemes flwr-kd knows of, for the error when one is missing.
_PROVIDERS = {"gs": "the serverless runtime: importing its array store (serverless/arraystore.py)"}


def register_state_store(scheme: str, factory: Callable[[ParseResult], object]) -> None:
    """Open `scheme://...` state URIs with `factory(parsed URI)` (a store with load and save)."""
    _FACTORIES[scheme] = factory


def open_state_store(uri: str):
    """The store a `state-uri` config value names: `file://<dir>`, or a registered scheme
    (`gs://<bucket>/<prefix>` once the serverless runtime is imported)."""
    parsed = urlparse(uri)
    factory = _FACTORIES.get(parsed.scheme)
    if factory is None:
        provider = _PROVIDERS.get(parsed.scheme)
        hint = f"; '{parsed.scheme}://' is provided by {provider}" if provider else ""
        raise ValueError(
            f"unsupported client state URI '{uri}': no store registered for scheme "
            f"'{parsed.scheme}' (registered: {', '.join(sorted(_FACTORIES))}){hint}"
        )
    return factory(parsed)
