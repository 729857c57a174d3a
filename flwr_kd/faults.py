"""Fault injection: client failures and invalid replies at a configured rate, off by default.

Run-config keys (they travel to clients in every training message's config):

- `fail-rate`: probability that one call of a training message (`train`, `train.fedmd`, from
  round 1 on) fails; 0 (the default) turns injection off.
- `fail-kinds`: comma-separated kinds to draw from; empty means every *failure* kind the
  runtime can produce (simulation: exception, timeout; serverless: those plus 5xx and kill).
- `fail-hang-seconds`: how long a `timeout` fault hangs before failing as a timed-out call.

Failure kinds: `exception` (the handler raises: an error reply, as Flower sends), `timeout`
(hangs, then fails like a call past its time limit; the serverless function answers 504 as
Cloud Run does), `5xx` (HTTP 503 from the function), `kill` (the function's process dies
mid-call). Invalid-reply kinds, which the server must detect and exclude: `nan`, `shape`,
`dtype` (the reply's logits, or weights where there are no logits, are corrupted), `subset`
(FedMD: the reply claims the next round's public subset; FedDF: logits for a subset one sample
short) and, on the serverless runtime, `tamper` and `missing` (the stored reply object is
overwritten out of band or deleted).

A draw is a pure function of (seed, round, client, message type, attempt), so that a run is
reproducible, tests know what was injected, and a retried call (the next attempt) draws anew.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message
from flwr.common.constant import ErrorCode

from flwr_kd import protocol
from flwr_kd.records import to_numpy

FAILURES = ("exception", "timeout", "5xx", "kill")
INVALID_REPLIES = ("nan", "shape", "dtype", "subset", "tamper", "missing")
KINDS = FAILURES + INVALID_REPLIES
#: Invalid replies made by changing the reply message itself (the others damage stored objects).
CORRUPTING = ("nan", "shape", "dtype", "subset")
SERVERLESS_ONLY = ("5xx", "kill", "tamper", "missing")
#: Message types whose calls may fail: the ones a round's aggregation depends on.
FAULTABLE = (protocol.TRAIN, protocol.FEDMD_ROUND)


class InjectedFault(RuntimeError):
    """Raised by an injected `exception` or `timeout` fault."""


def parse_kinds(text: str) -> tuple[str, ...]:
    """The kinds named in `text` (comma-separated); raises ValueError naming unknown ones."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown fault kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    return kinds


@dataclass(frozen=True)
class FaultPlan:
    """What to inject, read from a message's config."""

    rate: float = 0.0
    kinds: tuple[str, ...] = ()
    hang_seconds: float = 10.0
    seed: int = 0

    @classmethod
    def from_config(cls, config, serverless: bool) -> FaultPlan:
        rate = float(config.get("fail-rate", 0.0))
        kinds = parse_kinds(str(config.get("fail-kinds", "")))
        if not kinds:
            kinds = (
                FAILURES if serverless else tuple(k for k in FAILURES if k not in SERVERLESS_ONLY)
            )
        return cls(
            rate,
            kinds,
            float(config.get("fail-hang-seconds", 10.0)),
            int(config.get("data-seed", 0)),
        )

    def draw(
        self, server_round: int, client: str, message_type: str, attempt: int = 1
    ) -> str | None:
        """The fault for this call, or None."""
        if self.rate <= 0 or server_round < 1 or message_type not in FAULTABLE:
            return None
        digest = hashlib.sha256(
            f"{self.seed}|{server_round}|{client}|{message_type}|{attempt}".encode()
        ).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 >= self.rate:
            return None
        return self.kinds[int.from_bytes(digest[8:16], "big") % len(self.kinds)]


def plan_for(message: Message, serverless: bool) -> tuple[FaultPlan, int]:
    """(plan, server round) of a message; an empty plan when it carries no config."""
    if not message.has_content() or protocol.CONFIG not in message.content:
        return FaultPlan(), 0
    config = message.content[protocol.CONFIG]
    return FaultPlan.from_config(config, serverless), int(config.get("server-round", 0))


def fail(kind: str, hang_seconds: float) -> None:
    """Act out an `exception` or `timeout` fault: raise InjectedFault (after hanging)."""
    if kind == "timeout":
        time.sleep(hang_seconds)
        raise InjectedFault(f"injected fault: timeout (hung {hang_seconds:g}s, then gave up)")
    raise InjectedFault(f"injected fault: {kind}")


def corrupt_reply(reply: Message, kind: str) -> None:
    """Corrupt a reply's logits (or its weights when it has none) in place: `nan`, `shape`
    (one row or element short), `dtype` (integers) or `subset` (see the module's docstring)."""
    if reply.has_error():
        return
    config = reply.content.get(protocol.CONFIG)
    if kind == "subset" and config is not None and "subset-round" in config:
        config["subset-round"] = int(config["subset-round"]) + 1
        return
    name = protocol.LOGITS if protocol.LOGITS in reply.content else protocol.ARRAYS
    record = reply.content[name]
    key = next(iter(record.keys()))
    value = to_numpy(record[key])
    if kind == "nan":
        value = value.astype(value.dtype if value.dtype.kind == "f" else np.float32).copy()
        value.reshape(-1)[0] = np.nan
    elif kind in ("shape", "subset"):
        value = (
            value[:-1]
            if value.ndim > 0 and len(value) > 1
            else np.zeros((2,) * (value.ndim + 1), value.dtype)
        )
    elif kind == "dtype":
        value = value.astype(np.int32)
    else:
        raise ValueError(f"'{kind}' does not corrupt a reply's arrays")
    record = ArrayRecord(
        {**{k: record[k] for k in record}, key: Array(np.ascontiguousarray(value))}
    )
    reply.content[name] = record


def fault_injection_mod(message: Message, context, call_next) -> Message:
    """A Flower ClientApp mod injecting the faults a message's config asks for (simulation)."""
    plan, server_round = plan_for(message, serverless=False)
    client = str(context.node_config.get("partition-id", context.node_id))
    kind = plan.draw(server_round, client, message.metadata.message_type)
    if kind is None:
        return call_next(message, context)
    if kind in SERVERLESS_ONLY:
        raise ValueError(f"fault kind '{kind}' needs the serverless runtime")
    if kind in ("exception", "timeout"):
        try:
            fail(kind, plan.hang_seconds)
        except (
            InjectedFault
        ) as exc:  # the error reply Flower sends for a raising ClientApp, minus its log noise
            return Message(
                Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"InjectedFault: {exc}"),
                reply_to=message,
            )
    reply = call_next(message, context)
    corrupt_reply(reply, kind)
    return reply
