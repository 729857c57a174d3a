"""What a function is configured with: the environment terraform/ sets (the table in
docs/serverless.md), and the store client a warm instance keeps between requests.

A function touches Cloud Storage only (no Firestore: the driver writes every run, round and
invocation record). An isolated client function serves one client (`FLWR_KD_CLIENT_ID`); a
pooled one (`FLWR_KD_POOL`, the architecture pool's slug) serves every client whose message
names it, each under its own root in the pool's folder.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from flwr_kd.serverless import names
from flwr_kd.serverless.arraystore import GcsArrayStore
from flwr_kd.serverless.functions.errors import HttpError

MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class FunctionEnv:
    bucket: str
    arch: str
    client_id: str = ""
    data_prefix: str = ""
    #: The architecture pool's slug of a pooled client function ("" when isolated).
    pool: str = ""
    max_body_bytes: int = MAX_BODY_BYTES
    #: FLWR_KD_ONE_INSTANCE=1: at most one instance with concurrency 1 (Terraform deploys
    #: isolated client functions so), so a request that is being served while an earlier
    #: attempt of its call is unfinished knows that attempt died with its instance, and takes
    #: it over.
    one_instance: bool = False

    @classmethod
    def from_environ(cls, kind: str) -> FunctionEnv:
        required = ["FLWR_KD_BUCKET", "FLWR_KD_ARCH"]
        if kind == "client" and not os.environ.get("FLWR_KD_POOL"):
            required += ["FLWR_KD_CLIENT_ID", "FLWR_KD_DATA_PREFIX"]
        missing = [name for name in required if not os.environ.get(name)]
        if missing:
            raise RuntimeError(
                f"{kind} function misconfigured: environment variable(s) "
                f"{', '.join(missing)} not set"
            )
        return cls(
            bucket=os.environ["FLWR_KD_BUCKET"],
            arch=os.environ["FLWR_KD_ARCH"],
            client_id=os.environ.get("FLWR_KD_CLIENT_ID", ""),
            data_prefix=os.environ.get("FLWR_KD_DATA_PREFIX", ""),
            pool=os.environ.get("FLWR_KD_POOL", ""),
            max_body_bytes=int(os.environ.get("FLWR_KD_MAX_BODY_BYTES", MAX_BODY_BYTES)),
            one_instance=os.environ.get("FLWR_KD_ONE_INSTANCE") == "1",
        )

    def serving(self, client: object) -> ServedClient:
        """The client a message is for: this function's own, or (pooled) the one the
        envelope's `client` field names."""
        if not self.pool:
            if client not in (None, self.client_id):
                raise HttpError(400, f"message for client {client!r}, this is '{self.client_id}'")
            return ServedClient(self.client_id, names.client_root(self.client_id), self.data_prefix)
        if not isinstance(client, str) or not names.is_safe_id(client):
            raise HttpError(400, "a pooled function needs the envelope's 'client' (a client id)")
        root = names.client_root(client, self.pool)
        return ServedClient(client, root, root + "data/")


@dataclass(frozen=True)
class ServedClient:
    """One client a request is served for: its id, root and private data prefix."""

    client_id: str
    root: str
    data_prefix: str


@functools.lru_cache(maxsize=1)
def array_store(bucket: str) -> GcsArrayStore:
    """The array store, created once per instance (it holds a connection pool)."""
    return GcsArrayStore(bucket)
