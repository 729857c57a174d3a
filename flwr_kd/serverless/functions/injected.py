"""Injected faults that the client function acts out at its boundary (`flwr_kd.faults` draws
them): a dying instance, 503 and 504 answers, and damage to a stored reply object. Each is
recorded in the call's attempt record before it is acted out (`claims`).

A client can only create objects in its outbox, never replace or delete one, so the damage is
done as the reply is written: `tamper` writes bytes that do not match their recorded SHA-256,
`missing` leaves an object out that the reply lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time

from flwr_kd import faults
from flwr_kd.serverless.arraystore import AlreadyExists, GcsArrayStore, encode_npz
from flwr_kd.serverless.functions.errors import HttpError

#: Faults that damage a stored reply object rather than the reply message.
DAMAGING = ("tamper", "missing")


def act_out(fault: str, plan: faults.FaultPlan) -> None:
    """End the call here for the faults that do: `kill` (the process dies, the call stays
    unfinished), `5xx` (503) and `timeout` (hangs, then 504 as Cloud Run answers a request
    past its time limit). Other faults act later (`run_client_app`, `damaging`)."""
    if fault == "kill":
        os._exit(70)  # no clean-up, no reply: as an instance dies
    if fault == "5xx":
        raise HttpError(503, "injected fault: HTTP 503")
    if fault == "timeout":
        time.sleep(plan.hang_seconds)
        raise HttpError(504, f"injected fault: timeout after {plan.hang_seconds:g}s")


class DamagedWrites:
    """Collects a reply's object writes, then creates them with the first (by name) damaged."""

    def __init__(self, store: GcsArrayStore, fault: str) -> None:
        self.store, self.fault = store, fault
        self.pending: dict[str, bytes] = {}

    def put(self, name: str, arrays: dict) -> int:
        self.pending[self.store.check_name(name)] = data = encode_npz(arrays)
        return len(data)

    def commit(self) -> None:
        for name, data in sorted(self.pending.items()):
            sha256 = hashlib.sha256(data).hexdigest()
            if name == min(self.pending):
                if self.fault == "missing":
                    continue
                data = b"tampered" + data[8:]  # the recorded checksum no longer matches
            with contextlib.suppress(AlreadyExists):  # written by an earlier attempt
                self.store.create(name, data, sha256)


@contextlib.contextmanager
def damaging(store: GcsArrayStore, fault: str | None):
    """The store to write a reply's objects to: `store` itself, or (`tamper`, `missing`) one
    that damages the first object as it writes them, when the block ends."""
    if fault not in DAMAGING:
        yield store
        return
    writes = DamagedWrites(store, fault)
    yield writes
    writes.commit()
