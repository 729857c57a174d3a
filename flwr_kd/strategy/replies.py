"""Screening client replies and counting what a round cost, for every flwr-kd strategy.

A round goes on with the replies that pass a strategy's checks: each other reply is dropped with
a log line naming the node and the reason, and recorded in the round's `RoundStats`. Fewer valid
replies than the strategy's minimum end the round with `TooFewReplies`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.logger import log

from flwr_kd.records import State

#: The dtypes logits may travel in (client replies, the strategies' `logits_dtype`).
LOGITS_DTYPES = ("float16", "float32")


class TooFewReplies(RuntimeError):
    """A round got fewer valid replies than the strategy's `min_replies`: it cannot complete.
    (The serverless driver records the round as failed; `--resume` runs it again.)"""

    def __init__(self, message: str, dropped: list[dict] | None = None) -> None:
        super().__init__(message)
        self.dropped = dropped or []
        self.run_id: str | None = None  # the serverless run to resume, set by its driver


@dataclass
class ClientReply:
    """A validated training reply."""

    node_id: int
    arch: str
    state: State
    num_examples: int
    train_loss: float
    compute_seconds: float = 0.0  # the client's own training and logits time
    logits: np.ndarray | None = None
    logits_clipped: int = 0  # logits the client clipped to the wire dtype's finite range


@dataclass
class RoundStats:
    """What a round cost: bytes each way, dropped replies, and where the time went; and how
    many logits the clients clipped to the wire dtype's finite range (overflows)."""

    bytes_down: int = 0
    bytes_up: int = 0
    replies: int = 0
    dropped: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    distill: dict[str, dict] = field(default_factory=dict)
    client_compute: list[float] = field(default_factory=list)  # seconds, one per valid reply
    logits_clipped: int = 0

    def to_dict(self) -> dict:
        return {
            "bytes": {"down": self.bytes_down, "up": self.bytes_up},
            "replies": self.replies,
            "dropped": self.dropped,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "distill": self.distill,
            "client_compute": [round(c, 3) for c in self.client_compute],
            "logits_clipped": self.logits_clipped,
        }


def logits_problem(logits: np.ndarray, expected_shape: tuple[int, int]) -> str | None:
    """Why these logits cannot join a teacher or consensus, or None if they can."""
    if logits.shape != expected_shape:
        return f"logits have shape {logits.shape}, expected {expected_shape}"
    if logits.dtype.name not in LOGITS_DTYPES:
        return f"logits have dtype {logits.dtype}, expected one of {LOGITS_DTYPES}"
    if not np.isfinite(logits).all():
        return "logits have non-finite values"
    return None


def note_clipped(server_round: int, clipped_by_node: dict, stats: RoundStats) -> None:
    """Count the logits the clients clipped to the wire dtype's range (their reply metrics) in
    `stats`, with a log line naming the nodes: the replies stay in the round."""
    stats.logits_clipped = sum(clipped_by_node.values())
    if stats.logits_clipped:
        clipping = {node: n for node, n in clipped_by_node.items() if n}
        log(
            WARNING,
            "round %d: logits clipped to the wire dtype's range: %s",
            server_round,
            clipping,
        )


def screen_replies(
    server_round: int,
    replies: Iterable[Message],
    check: Callable[[Message], object],
    stats: RoundStats,
    template: str = "round %d: dropped reply of node %s: %s",
) -> list:
    """The parsed replies that `check` accepts (it returns a reason string to refuse one); each
    other one is logged (node and reason) and recorded in `stats.dropped`. Counts the bytes
    received and the valid replies."""
    valid = []
    for msg in replies:
        if not msg.has_error():
            stats.bytes_up += payload_bytes(msg.content)
        parsed = check(msg)
        if isinstance(parsed, str):
            node = msg.metadata.src_node_id
            log(WARNING, template, server_round, node, parsed)
            stats.dropped.append(
                {"node": node, "type": msg.metadata.message_type, "reason": parsed}
            )
        else:
            valid.append(parsed)
    stats.replies = len(valid)
    return valid


def require_replies(
    server_round: int,
    valid: int,
    min_replies: int,
    stats: RoundStats,
    error: type[TooFewReplies] = TooFewReplies,
) -> None:
    """Raise `error` when a round has fewer than `min_replies` valid replies."""
    if valid < min_replies:
        raise error(
            f"round {server_round}: {valid} valid replies, fewer than "
            f"min_replies={min_replies}; dropped: {stats.dropped}",
            stats.dropped,
        )


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's arrays (what the wire cost is counted in)."""
    return sum(record.count_bytes() for record in content.array_records.values())
