"""How a function claims a call before it acts: the next `attempt-<n>.json` (create-only,
n = 1, 2, ... until one is new), then `reply.json` once the call is finished.

A request whose message was answered already gets that answer back (computed once); one that
finds an earlier attempt of the call still unfinished takes it over when that attempt cannot
still be running (one instance with concurrency 1, or past the lease), and is refused with a
409 otherwise. Both sides of that decision are recorded in the attempt record before anything
else happens, as are the faults injected into it (`callrecords`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flwr_kd.serverless import names
from flwr_kd.serverless.arraystore import AlreadyExists, GcsArrayStore
from flwr_kd.serverless.callrecords import (
    COMPUTE,
    FROM_RECORD,
    REFUSED,
    age_seconds,
    fault_event,
    read_history,
    took_over_event,
    utc_now,
)
from flwr_kd.serverless.functions.errors import HttpError

#: A gen2 HTTP function runs at most 60 minutes: an attempt unfinished after that was
#: abandoned by a crashed instance, and a retry takes it over.
INVOCATION_LEASE_SECONDS = 3600


@dataclass
class Claim:
    """This request's attempt at a call: go ahead (with `fault` injected into it), or answer
    with `recorded`, the finished call's record."""

    records: str
    attempt: int
    caller: str | None
    fault: str | None = None
    recorded: dict | None = None
    events: list[dict] = field(default_factory=list)


def claim_call(
    store: GcsArrayStore,
    records: str,
    message_id: str,
    caller: str | None,
    *,
    one_instance: bool,
    draw: Callable[[int], str | None] = lambda attempt: None,
) -> Claim:
    """Create this request's attempt record under `records`; `draw(attempt)` is the fault
    injected into that attempt, if any."""
    while True:
        history = read_history(store, records)
        claim = Claim(records, len(history.attempts) + 1, caller)
        action = COMPUTE
        if history.reply is not None:
            if history.reply.get("message_id") != message_id:
                raise HttpError(409, f"call {records} answered another message already")
            action, claim.recorded = FROM_RECORD, history.reply
        else:
            unfinished = history.unfinished_attempt()
            if unfinished is not None:
                if not (one_instance or age_seconds(unfinished) > INVOCATION_LEASE_SECONDS):
                    action = REFUSED
                else:
                    claim.events.append(took_over_event(claim.attempt))
            if action == COMPUTE:
                claim.fault = draw(claim.attempt)
                if claim.fault is not None:
                    claim.events.append(fault_event(claim.attempt, claim.fault))
        record = {
            "attempt": claim.attempt,
            "message_id": message_id,
            "caller": caller,
            "started": utc_now(),
            "action": action,
            "events": claim.events,
        }
        try:
            store.put_json(names.attempt_object(records, claim.attempt), record)
        except AlreadyExists:
            continue  # another request took this number meanwhile: look again
        if action == REFUSED:
            raise HttpError(409, f"call {records} is in progress")
        return claim


def finish_call(store: GcsArrayStore, claim: Claim, record: dict) -> dict:
    """Record the finished call (`record` plus who, which attempt and its events); when a
    concurrent attempt finished it first, its record stands and is returned instead."""
    record = {
        **record,
        "caller": claim.caller,
        "attempt": claim.attempt,
        "events": claim.events,
        "ended": utc_now(),
    }
    try:
        store.put_json(names.reply_object(claim.records), record)
    except AlreadyExists:
        first = store.find_json(names.reply_object(claim.records))
        return first if first is not None else record
    return record
