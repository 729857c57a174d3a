"""What a function is configured with: the environment terraform/ sets (the table in
docs/serverless.md), and the store clients a warm instance keeps between requests."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from flwr_kd.serverless.arraystore import GcsArrayStore
from flwr_kd.serverless.roundstore import RoundStore

MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class FunctionEnv:
    bucket: str
    arch: str
    database: str
    client_id: str = ""
    data_prefix: str = ""
    max_body_bytes: int = MAX_BODY_BYTES
    #: FLWR_KD_ONE_INSTANCE=1: at most one instance with concurrency 1 (Terraform deploys client
    #: functions so), so a request that is being served while its call's record says
    #: "running" knows that earlier attempt died with its instance, and takes it over.
    one_instance: bool = False

    @classmethod
    def from_environ(cls, kind: str) -> FunctionEnv:
        required = ["FLWR_KD_BUCKET", "FLWR_KD_ARCH"]
        if kind == "client":
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
            database=firestore_database(),
            client_id=os.environ.get("FLWR_KD_CLIENT_ID", ""),
            data_prefix=os.environ.get("FLWR_KD_DATA_PREFIX", ""),
            max_body_bytes=int(os.environ.get("FLWR_KD_MAX_BODY_BYTES", MAX_BODY_BYTES)),
            one_instance=os.environ.get("FLWR_KD_ONE_INSTANCE") == "1",
        )


def firestore_database() -> str:
    """The Firestore database of the run records."""
    return os.environ.get("FLWR_KD_FIRESTORE_DATABASE", "(default)")


@functools.lru_cache(maxsize=1)
def stores(bucket: str, database: str) -> tuple[GcsArrayStore, RoundStore]:
    """The array and round stores, created once per instance (clients hold connection pools)."""
    return GcsArrayStore(bucket), RoundStore(database=database)
