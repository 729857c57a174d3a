"""The driver's invocation documents, written from the functions' call records.

A function records each call in create-only objects of its own outbox (`callrecords`); the
driver knows where (it addressed the call), reads them back by name after the call, and writes
the invocation document in Firestore: `running` when it sends the call, then the outcome the
records show (status, attempts, events, caller, seconds, bytes, objects), or the driver's own
error when the function never answered. Its verdict on a reply it left out goes there too.
"""

from __future__ import annotations

from flwr_kd.serverless.arraystore import ArrayStoreError, GcsArrayStore
from flwr_kd.serverless.callrecords import FAILED, CallHistory, read_history
from flwr_kd.serverless.roundstore import RoundStore

#: Fields of a finished call's record that the invocation document repeats as they are.
COPIED = ("message_id", "caller", "seconds", "bytes_in", "bytes_out", "objects", "error")


def invocation_record(history: CallHistory, driver_error: str | None) -> dict:
    """The invocation document's fields that the call records (and the driver's view) give."""
    reply = history.reply or {}
    record = {k: reply[k] for k in COPIED if k in reply}
    record["attempts"] = len(history.attempts)
    callers = [a.get("caller") for a in history.attempts if a.get("caller")]
    if "caller" not in record and callers:
        record["caller"] = callers[-1]
    if history.reply is not None:
        record["status"] = history.reply.get("status", FAILED)
    else:
        record.update(status=FAILED, error=driver_error or "answered, but left no call record")
    return record


class InvocationLog:
    """Invocation documents of one run, written by the driver."""

    def __init__(self, rounds: RoundStore, store: GcsArrayStore, run: str) -> None:
        self.rounds, self.store, self.run = rounds, store, run

    def history(self, records: str) -> CallHistory:
        """The call records under `records`; none when they cannot be read (a function that
        wrote something else there wrote nothing the driver trusts)."""
        try:
            return read_history(self.store, records)
        except ArrayStoreError:
            return CallHistory([], None)

    def started(self, server_round: int, call: str, message_id: str) -> None:
        self.rounds.start_invocation(self.run, server_round, call, message_id)

    def finished(
        self, server_round: int, call: str, records: str, driver_error: str | None
    ) -> None:
        """After the call: what its records say; `driver_error` when no answer came."""
        history = self.history(records)
        self.rounds.end_invocation(
            self.run, server_round, call, invocation_record(history, driver_error), history.events()
        )

    def left_out(self, server_round: int, call: str, records: str, reason: str) -> None:
        """The driver's verdict on a reply it did not use, beside what the records say."""
        history = self.history(records)
        known = {"attempts": len(history.attempts), "events": history.events()}
        self.rounds.record_verdict(self.run, server_round, call, reason, known)
