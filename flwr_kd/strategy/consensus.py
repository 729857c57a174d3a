"""FedMD's server half of a round: which logits replies may join the consensus, the consensus
itself, and what the replies report (test accuracy per architecture, where time went, clipped
logits, rejoined clients)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from flwr_kd import protocol
from flwr_kd.distill import average_logits, center_per_class
from flwr_kd.publicset import CLIPPED_KEY
from flwr_kd.records import to_numpy
from flwr_kd.strategy.replies import RoundStats, logits_problem, note_clipped

#: Client step timings (metrics) whose slowest value a round records.
CLIENT_STEPS = ("finetune-seconds", "digest-seconds", "revisit-seconds", "logits-seconds")


@dataclass
class LogitsReply:
    """A valid `train.fedmd` reply."""

    arch: str
    logits: np.ndarray
    metrics: dict
    node: int = 0


def check_logits_reply(
    msg: Message, registered: str | None, subset_round: int, subset: np.ndarray, num_classes: int
) -> LogitsReply | str:
    """The reply of a node registered as `registered`, if its logits are on public `subset`
    (of round `subset_round`); else the reason to leave it out."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    content = msg.content
    arch = str(content[protocol.CONFIG]["arch"]) if protocol.CONFIG in content else None
    if arch != registered:
        return f"architecture '{arch}' but node registered as '{registered}'"
    if protocol.LOGITS not in content or "logits" not in content[protocol.LOGITS]:
        return "reply lacks logits"
    got_round = content[protocol.CONFIG].get("subset-round", -1)
    if not isinstance(got_round, int) or isinstance(got_round, bool):
        return f"'subset-round' must be an integer, got {got_round!r}"
    record = content[protocol.LOGITS]
    indices = to_numpy(record["indices"]) if "indices" in record else None
    if got_round != subset_round or indices is None or not np.array_equal(indices, subset):
        return f"logits for the wrong public subset (round {got_round}, expected {subset_round})"
    logits = to_numpy(record["logits"])
    problem = logits_problem(logits, (len(subset), num_classes))
    if problem:
        return problem
    metrics = dict(content[protocol.METRICS]) if protocol.METRICS in content else {}
    return LogitsReply(arch, logits, metrics, msg.metadata.src_node_id)


def average(
    subset: np.ndarray,
    valid: list[LogitsReply],
    classes: int = 0,
    center: bool = False,
    labels: np.ndarray | None = None,
) -> ArrayRecord:
    """The averaged logits on public `subset`, with its indices: what the next round digests.
    `classes` > 0 keeps the leading outputs only (the private task's, see `FedMD`); `center`
    subtracts each class's mean over the subset, keeping only how the samples differ.
    `labels` (the subset's public labels) go along as "labels", -1 where a label is not one of
    the consensus's classes (none at all if no label is): the digest's anchor (`FedMD`'s
    `digest_label_weight`)."""
    consensus = average_logits([r.logits for r in valid])
    consensus = consensus[:, :classes] if classes else consensus
    if center:
        consensus = center_per_class(consensus)
    record = {"indices": Array(subset), "logits": Array(consensus)}
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        if (labels < consensus.shape[1]).any():
            record["labels"] = Array(np.where(labels < consensus.shape[1], labels, -1))
    return ArrayRecord(record)


def mean_accuracy(valid: list[LogitsReply]) -> dict[str, float]:
    """Mean client-reported test accuracy per architecture (those that reported one)."""
    accuracy: dict[str, float] = {}
    for arch in dict.fromkeys(r.arch for r in valid):
        scores = [
            r.metrics["test-accuracy"]
            for r in valid
            if r.arch == arch and "test-accuracy" in r.metrics
        ]
        if scores:
            accuracy[arch] = round(float(np.mean(scores)), 4)
    return accuracy


def compute_seconds(reply: LogitsReply) -> float:
    """The client's own compute time for this reply (all its steps)."""
    return sum(v for k, v in reply.metrics.items() if k.endswith("-seconds"))


def record_slowest_steps(valid: list[LogitsReply], stats: RoundStats) -> None:
    """The slowest client's time per step, in `stats.seconds`."""
    for key in CLIENT_STEPS:
        values = [r.metrics[key] for r in valid if key in r.metrics]
        if values:
            stats.seconds[f"client-{key[: -len('-seconds')]}-max"] = max(values)


def round_metrics(
    server_round: int, valid: list[LogitsReply], stats: RoundStats, accuracy: dict[str, float]
) -> MetricRecord:
    """The round's metrics (replies, dropped, clipped logits, rejoined clients, accuracy per
    architecture); the slowest steps and clipped logits also go to `stats`."""
    record_slowest_steps(valid, stats)
    note_clipped(server_round, {r.node: int(r.metrics.get(CLIPPED_KEY, 0)) for r in valid}, stats)
    return MetricRecord(
        {
            "replies": len(valid),
            "dropped": len(stats.dropped),
            CLIPPED_KEY: stats.logits_clipped,
            "rejoined": sum(int(r.metrics.get("rejoined", 0)) for r in valid),
            **{f"accuracy/{a}": v for a, v in accuracy.items()},
        }
    )
