"""Arrays and call records on Cloud Storage: create-only, checksummed, never pickled.

Objects are `.npz` archives (several named arrays), or small JSON documents (the functions'
call records, the driver's message envelopes), written with `if_generation_match=0`, so a
retried or repeated write can never replace what is there; each carries its SHA-256 in the
object metadata, checked on every read (and the client library's CRC32C check on download).
A FedMD client's own model is the one thing that changes in place; `save_state` replaces it
only if it is still the generation that was read (optimistic concurrency). Importing this
module registers `gs://` client-state URIs with `flwr_kd.state`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re

import numpy as np
from google.api_core import exceptions as gexc
from google.cloud import storage

from flwr_kd.records import State, load_npz
from flwr_kd.serverless import names
from flwr_kd.state import register_state_store

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._\-/]+$")
# google-cloud-storage (3.x) fetches each bucket's metadata (storage.buckets.get) in the
# background, for its telemetry. No identity of the deployment holds that permission
# (docs/permissions.md): the call could only be denied, in every process, for every bucket.
os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "1")


class ArrayStoreError(RuntimeError):
    """An object is missing, tampered with, or not a plain array archive."""


class AlreadyExists(ArrayStoreError):
    """A create-only write found the object already there."""


class Missing(ArrayStoreError):
    """The object does not exist."""


def encode_npz(arrays: State) -> bytes:
    buf = io.BytesIO()
    try:
        np.savez(buf, allow_pickle=False, **{k: np.asarray(v) for k, v in arrays.items()})
    except ValueError as exc:  # object arrays would need pickle
        raise ArrayStoreError(f"only plain numeric arrays can be stored: {exc}") from exc
    return buf.getvalue()


def decode_npz(data: bytes) -> State:
    try:
        return load_npz(io.BytesIO(data))
    except (ValueError, OSError) as exc:  # object arrays need pickle: refused
        raise ArrayStoreError(f"not a plain .npz archive: {exc}") from exc


class GcsArrayStore:
    def __init__(self, bucket: str, client: storage.Client | None = None) -> None:
        self.client = client or storage.Client()
        self.bucket = self.client.bucket(bucket)
        self.bucket_name = bucket

    @staticmethod
    def check_name(name: str) -> str:
        if not _SAFE_NAME.match(name) or ".." in name or name.startswith("/"):
            raise ArrayStoreError(f"unsafe object name '{name}'")
        return name

    def put(self, name: str, arrays: State, metadata: dict | None = None) -> int:
        """Create `name` holding `arrays`; returns bytes written. Raises AlreadyExists."""
        data = encode_npz(arrays)
        return self.create(name, data, hashlib.sha256(data).hexdigest(), metadata)

    def put_json(self, name: str, document: dict) -> int:
        """Create `name` holding `document` as JSON; returns bytes written. Raises
        AlreadyExists (a call record or envelope is written once)."""
        data = json.dumps(document, sort_keys=True).encode()
        return self.create(name, data, hashlib.sha256(data).hexdigest(), None, "application/json")

    def create(
        self,
        name: str,
        data: bytes,
        sha256: str,
        metadata: dict | None = None,
        content_type: str = "application/octet-stream",
    ) -> int:
        """Create `name` with these bytes and this checksum (only `put`, `put_json` and
        injected faults, which need a checksum that does not match, call it directly)."""
        blob = self.bucket.blob(self.check_name(name))
        blob.metadata = {"sha256": sha256, **(metadata or {})}
        try:
            blob.upload_from_string(data, content_type=content_type, if_generation_match=0)
        except gexc.PreconditionFailed as exc:
            raise AlreadyExists(f"gs://{self.bucket_name}/{name} already exists") from exc
        return len(data)

    def get(self, name: str) -> State:
        """The arrays of `name`, after checking its SHA-256."""
        data, _ = self._get_bytes(name)
        return decode_npz(data)

    def find_json(self, name: str) -> dict | None:
        """The JSON document `name` (checksum checked), or None when there is none."""
        try:
            data, _ = self._get_bytes(name)
        except Missing:
            return None
        try:
            document = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArrayStoreError(f"gs://{self.bucket_name}/{name} is not JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise ArrayStoreError(f"gs://{self.bucket_name}/{name} is not a JSON object")
        return document

    def _get(self, name: str) -> tuple[State, int]:
        data, generation = self._get_bytes(name)
        return decode_npz(data), generation

    def _get_bytes(self, name: str) -> tuple[bytes, int]:
        blob = self.bucket.blob(self.check_name(name))
        try:
            blob.reload()
            data = blob.download_as_bytes(checksum="crc32c", if_generation_match=blob.generation)
        except gexc.NotFound as exc:
            raise Missing(f"gs://{self.bucket_name}/{name} does not exist") from exc
        expected = (blob.metadata or {}).get("sha256")
        if expected != hashlib.sha256(data).hexdigest():
            raise ArrayStoreError(
                f"gs://{self.bucket_name}/{name}: checksum mismatch (tampered or truncated)"
            )
        return data, blob.generation

    def exists(self, name: str) -> bool:
        return self.bucket.blob(self.check_name(name)).exists()

    def list(self, prefix: str) -> list[str]:
        return sorted(b.name for b in self.client.list_blobs(self.bucket_name, prefix=prefix))

    # -- a client's own, changing state -------------------------------------------------------

    def load_state(self, name: str) -> tuple[State | None, int]:
        """(arrays, generation) or (None, 0) when there is no state yet."""
        if not self.exists(name):
            return None, 0
        return self._get(name)

    def save_state(self, name: str, arrays: State, generation: int) -> None:
        """Replace the state only if it is still at `generation` (0: must not exist)."""
        data = encode_npz(arrays)
        blob = self.bucket.blob(self.check_name(name))
        blob.metadata = {"sha256": hashlib.sha256(data).hexdigest()}
        try:
            blob.upload_from_string(data, if_generation_match=generation)
        except gexc.PreconditionFailed as exc:
            raise ArrayStoreError(f"gs://{self.bucket_name}/{name} changed concurrently") from exc


class GcsStateStore:
    """`flwr_kd.state` interface (load/save by key) over a prefix of a `GcsArrayStore`."""

    def __init__(self, store: GcsArrayStore, prefix: str) -> None:
        self.store, self.prefix = store, prefix.rstrip("/") + "/"
        self._generations: dict[str, int] = {}

    def load(self, key: str) -> State | None:
        state, self._generations[key] = self.store.load_state(names.state_object(self.prefix, key))
        return state

    def save(self, key: str, state: State) -> None:
        if key not in self._generations:
            self.load(key)
        self.store.save_state(
            names.state_object(self.prefix, key), state, self._generations.pop(key)
        )


def open_gcs_state_store(parsed) -> GcsStateStore:
    """`gs://<bucket>/<prefix>` state URIs (registered with `flwr_kd.state` on import)."""
    return GcsStateStore(GcsArrayStore(parsed.netloc), parsed.path.lstrip("/"))


register_state_store("gs", open_gcs_state_store)
