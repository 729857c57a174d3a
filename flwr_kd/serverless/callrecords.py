"""Call records: what a function writes about each call it serves, and the driver reads back.

Functions hold no Firestore role, so a call is recorded in create-only JSON objects in the
caller's own outbox (`names.client_call_records`, `names.aggregator_call_records`):

- `attempt-<n>.json`, one per request that reached the function, created before it acts:
  `attempt`, `message_id`, `caller`, `started` (UTC, ISO 8601), `action` (`compute`,
  `answered-from-record` or `refused-in-progress`) and `events` (what it is about to do:
  an injected fault, the take-over of an attempt that died);
- `reply.json`, the finished call: `status`, `message_id`, `reply` (what the function
  answered), `caller`, `attempt`, `seconds`, `bytes_in`, `bytes_out`, `objects`, `error`,
  `events`. A retry of the same message is answered from it, computed once.

Nobody else can write into a function's outbox (IAM: objectCreator for its own identity only),
and nothing there can be overwritten; the driver writes the invocation documents in Firestore
from these records (`invocations`). Events are maps, so that readers never parse text.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from flwr_kd.serverless import names
from flwr_kd.serverless.arraystore import GcsArrayStore

RUNNING, DONE, FAILED = "running", "done", "failed"
#: `event` values of a call's events.
FAULT, TOOK_OVER, LEFT_OUT = "fault", "took-over", "left-out"
#: `action` values of an attempt record.
COMPUTE, FROM_RECORD, REFUSED = "compute", "answered-from-record", "refused-in-progress"
#: Injected faults with which an attempt ends by answering an HTTP error itself (503, 504):
#: such an attempt did not die, and a retry does not take it over.
ANSWERING_FAULTS = ("5xx", "timeout")


def fault_event(attempt: int, fault: str) -> dict:
    """The function injected `fault` into this attempt of the call."""
    return {"attempt": attempt, "event": FAULT, "fault": fault}


def took_over_event(attempt: int) -> dict:
    """This attempt took over an earlier one that never finished (its instance died)."""
    return {"attempt": attempt, "event": TOOK_OVER}


def left_out_event(reason: str) -> dict:
    """The driver left the call's reply out of its round, for `reason`."""
    return {"event": LEFT_OUT, "reason": reason}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def age_seconds(record: dict) -> float:
    """Seconds since the attempt `record` started (infinite when it says no time)."""
    try:
        started = datetime.datetime.fromisoformat(record["started"])
    except (KeyError, TypeError, ValueError):
        return float("inf")
    return (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()


@dataclass
class CallHistory:
    """The records of one call, as read back by name."""

    attempts: list[dict]
    reply: dict | None

    def events(self) -> list[dict]:
        """Every attempt's events, then the finished call's, each once, in order."""
        out: list[dict] = []
        for record in [*self.attempts, self.reply or {}]:
            out += [e for e in record.get("events", []) if e not in out]
        return out

    def unfinished_attempt(self) -> dict | None:
        """The last attempt that set out to compute and neither finished (no reply) nor
        answered an error of its own: it is still running, or its instance died."""
        if self.reply is not None:
            return None
        computing = [a for a in self.attempts if a.get("action") == COMPUTE]
        if not computing:
            return None
        last = computing[-1]
        faults = {e.get("fault") for e in last.get("events", []) if e.get("event") == FAULT}
        return None if faults & set(ANSWERING_FAULTS) else last


def read_history(store: GcsArrayStore, records: str) -> CallHistory:
    """The call records under `records` (attempt-1, attempt-2, ... until one is missing)."""
    reply = store.find_json(names.reply_object(records))
    attempts = []
    while True:
        record = store.find_json(names.attempt_object(records, len(attempts) + 1))
        if record is None:
            return CallHistory(attempts, reply)
        attempts.append(record)
