"""Injected faults that the client function acts out at its boundary (`flwr_kd.faults` draws
them): a dying instance, 503 and 504 answers, and damage to a stored reply object. Each is
recorded in the call's invocation document first, as a structured event."""

from __future__ import annotations

import os
import time

from flwr_kd import faults
from flwr_kd.serverless.arraystore import GcsArrayStore
from flwr_kd.serverless.functions.errors import HttpError
from flwr_kd.serverless.roundstore import FAILED, RoundStore, fault_event


def inject_call_fault(
    fault: str, plan: faults.FaultPlan, rounds: RoundStore, call: tuple[str, int, str], attempt: int
) -> None:
    """Record an injected fault in the call's invocation document, then act out the ones that
    end the call here: `kill` (the process dies, the document stays "running"), `5xx` (503)
    and `timeout` (hangs, then 504 as Cloud Run answers a request past its time limit)."""
    rounds.note_invocation(*call, fault_event(attempt, fault))
    if fault == "kill":
        os._exit(70)  # no clean-up, no reply: as an instance dies
    if fault in ("5xx", "timeout"):
        if fault == "timeout":
            time.sleep(plan.hang_seconds)
        status, reason = (
            (503, "injected fault: HTTP 503")
            if fault == "5xx"
            else (504, f"injected fault: timeout after {plan.hang_seconds:g}s")
        )
        rounds.end_invocation(*call, {"status": FAILED, "error": reason})
        raise HttpError(status, reason)


def damage_object(store: GcsArrayStore, name: str, fault: str) -> None:
    """Injected `tamper` (overwrite out of band: bytes no longer match their SHA-256) or
    `missing` (delete) on a reply object, as a hostile or broken storage path would."""
    blob = store.bucket.blob(name)
    if fault == "missing":
        blob.delete()
    else:
        blob.upload_from_string(b"tampered" + blob.download_as_bytes()[8:])
