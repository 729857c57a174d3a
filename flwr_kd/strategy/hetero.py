"""FedAvg inside each architecture group: the common half of every flwr-kd strategy.

Nodes tell the server their timm architecture once (`query.architecture`); each round every
sampled node receives its architecture's global model, and the replies of each architecture
group are FedAvg-ed. Replies that are errors, of the wrong architecture, of the wrong shapes or
not finite are dropped with a log line naming the node and the reason; the round goes on with
the rest. Without distillation this class is the `fedavg` baseline; `FedDF` adds the rest.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flwr_kd import protocol
from flwr_kd.records import State, pack_models, record_to_state, state_to_record, unpack_models
from flwr_kd.strategy.nodes import ArchitectureRegistry, count_by_value


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


@dataclass
class RoundStats:
    """What a round cost: bytes each way, dropped replies, and where the time went."""

    bytes_down: int = 0
    bytes_up: int = 0
    replies: int = 0
    dropped: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    distill: dict[str, dict] = field(default_factory=dict)
    client_compute: list[float] = field(default_factory=list)  # seconds, one per valid reply

    def to_dict(self) -> dict:
        return {
            "bytes": {"down": self.bytes_down, "up": self.bytes_up},
            "replies": self.replies,
            "dropped": self.dropped,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "distill": self.distill,
            "client_compute": [round(c, 3) for c in self.client_compute],
        }


def fedavg(states: list[State], weights: list[float]) -> State:
    """Weighted average of state dicts; integer buffers (BatchNorm counters) stay integers."""
    w = np.asarray(weights, np.float64) / float(np.sum(weights))
    out: State = {}
    for key, ref in states[0].items():
        acc = sum(wi * s[key].astype(np.float64) for wi, s in zip(w, states))
        out[key] = (
            np.rint(acc).astype(ref.dtype) if ref.dtype.kind in "iu" else acc.astype(ref.dtype)
        )
    return out


LOGITS_DTYPES = ("float16", "float32")


def logits_problem(logits: np.ndarray, expected_shape: tuple[int, int]) -> str | None:
    """Why these logits cannot join a teacher or consensus, or None if they can."""
    if logits.shape != expected_shape:
        return f"logits have shape {logits.shape}, expected {expected_shape}"
    if logits.dtype.name not in LOGITS_DTYPES:
        return f"logits have dtype {logits.dtype}, expected one of {LOGITS_DTYPES}"
    if not np.isfinite(logits).all():
        return "logits have non-finite values"
    return None


def screen_replies(
    server_round,
    replies,
    check,
    stats: RoundStats,
    template="round %d: dropped reply of node %s: %s",
) -> list:
    """The parsed replies that `check` accepts; each other one is logged (node and reason) and
    recorded in `stats.dropped`. Counts the bytes received and the valid replies."""
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


def payload_bytes(content: RecordDict) -> int:
    return sum(record.count_bytes() for record in content.array_records.values())


class HeteroFedAvg(Strategy):
    """FedAvg per architecture group, for clients of several timm architectures.

    A round goes on with the valid replies it got, as long as there are `min_replies` of them
    (else `TooFewReplies`); an architecture group without a valid reply keeps its model.

    The global `ArrayRecord` holds every architecture's model, keyed `"<arch>/<param>"`
    (see `flwr_kd.records`), so `start()` keeps Flower's signature and `Result`.
    """

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        min_replies: int = 1,
        seed: int = 0,
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must lie in (0, 1], got {fraction_train}")
        if min_replies < 1:
            raise ValueError(f"min_replies must be at least 1, got {min_replies}")
        self.min_replies = min_replies
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.seed = seed
        self.nodes = ArchitectureRegistry(min_available_nodes)
        self.stats: dict[int, RoundStats] = {}
        self._global: dict[str, State] = {}
        self._sent_at = 0.0

    # -- nodes -----------------------------------------------------------------------------

    @property
    def node_arch(self) -> dict[int, str]:
        return self.nodes.arch_of

    def discover_architectures(self, grid: Grid, config: ConfigRecord) -> dict[int, str]:
        return self.nodes.refresh(grid, config)

    def _sample(
        self, grid: Grid, config: ConfigRecord, fraction: float, minimum: int, round_: int
    ) -> dict[int, str]:
        archs = self.discover_architectures(grid, config)
        eligible = sorted(n for n, a in archs.items() if a in self._global)
        for n in sorted(set(archs) - set(eligible)):
            log(
                WARNING,
                "node %s has architecture '%s', which has no global model: skipped",
                n,
                archs[n],
            )
        size = min(len(eligible), max(int(len(eligible) * fraction), minimum))
        chosen = random.Random(self.seed * 100003 + round_).sample(eligible, size)
        return {n: archs[n] for n in sorted(chosen)}

    # -- training --------------------------------------------------------------------------

    def round_payload(self, server_round: int, config: ConfigRecord) -> dict[str, ArrayRecord]:
        """Extra records every training message of this round carries (none here)."""
        return {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = unpack_models(arrays)
        stats = self.stats.setdefault(server_round, RoundStats())
        t0 = time.perf_counter()
        nodes = self._sample(grid, config, self.fraction_train, self.min_train_nodes, server_round)
        config["server-round"] = server_round
        payload = self.round_payload(server_round, config)
        model_records = {arch: state_to_record(s) for arch, s in self._global.items()}
        messages = []
        for node, arch in nodes.items():
            content = RecordDict(
                {
                    protocol.ARRAYS: model_records[arch],
                    protocol.CONFIG: ConfigRecord({**dict(config), "arch": arch}),
                    **payload,
                }
            )
            stats.bytes_down += payload_bytes(content)
            messages.append(Message(content, dst_node_id=node, message_type=protocol.TRAIN))
        log(INFO, "configure_train: %d nodes (%s)", len(nodes), count_by_value(nodes.values()))
        stats.seconds["configure"] = time.perf_counter() - t0
        self._sent_at = time.perf_counter()
        return messages

    def check_reply(self, msg: Message) -> ClientReply | str:
        """The parsed reply, or the reason to drop it."""
        if msg.has_error():
            return f"client error: {msg.error.reason}"
        content = msg.content
        node = msg.metadata.src_node_id
        expected = self.node_arch.get(node)
        arch = str(content[protocol.CONFIG]["arch"]) if protocol.CONFIG in content else None
        if arch != expected:
            return f"architecture '{arch}' but node registered as '{expected}'"
        if protocol.ARRAYS not in content or protocol.METRICS not in content:
            return "reply lacks weights or metrics"
        state = record_to_state(content[protocol.ARRAYS])
        reference = self._global[arch]
        if state.keys() != reference.keys():
            return f"weights do not match '{arch}' ({len(state)} arrays, expected {len(reference)})"
        for key, value in state.items():
            if value.shape != reference[key].shape:
                return f"'{key}' has shape {value.shape}, expected {reference[key].shape}"
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                return f"'{key}' has non-finite values"
        metrics = content[protocol.METRICS]
        num_examples = int(metrics.get("num-examples", 0))
        if num_examples <= 0:
            return "num-examples missing or not positive"
        compute = float(metrics.get("train-seconds", 0.0)) + float(
            metrics.get("logits-seconds", 0.0)
        )
        return ClientReply(
            node, arch, state, num_examples, float(metrics.get("train-loss", float("nan"))), compute
        )

    def after_fedavg(
        self, server_round: int, models: dict[str, State], replies: list[ClientReply]
    ) -> dict[str, State]:
        """Hook after the per-group FedAvg (FedDF distils here)."""
        return models

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.seconds["clients"] = time.perf_counter() - self._sent_at
        t0 = time.perf_counter()
        accepted: list[ClientReply] = screen_replies(server_round, replies, self.check_reply, stats)
        stats.client_compute = [r.compute_seconds for r in accepted]
        if len(accepted) < self.min_replies:
            raise TooFewReplies(
                f"round {server_round}: {len(accepted)} valid replies, fewer than min_replies={self.min_replies}; "
                f"dropped: {stats.dropped}",
                stats.dropped,
            )
        models = dict(self._global)
        for arch in models:
            group = [r for r in accepted if r.arch == arch]
            if group:
                models[arch] = fedavg([r.state for r in group], [r.num_examples for r in group])
        stats.seconds["fedavg"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        models = self.after_fedavg(server_round, models, accepted)
        stats.seconds["distill"] = time.perf_counter() - t1
        total = sum(r.num_examples for r in accepted)
        loss = sum(r.train_loss * r.num_examples for r in accepted) / total
        metrics = MetricRecord(
            {"train-loss": loss, "replies": len(accepted), "dropped": len(stats.dropped)}
        )
        return pack_models(models), metrics

    # -- evaluation on clients ---------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        self._global = unpack_models(arrays)
        nodes = self._sample(
            grid, config, self.fraction_evaluate, self.min_evaluate_nodes, -server_round
        )
        config["server-round"] = server_round
        return [
            Message(
                RecordDict(
                    {
                        protocol.ARRAYS: state_to_record(self._global[arch]),
                        protocol.CONFIG: ConfigRecord({**dict(config), "arch": arch}),
                    }
                ),
                dst_node_id=node,
                message_type=protocol.EVALUATE,
            )
            for node, arch in nodes.items()
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Accuracy on the clients' held-out data, per architecture and overall."""
        correct: dict[str, float] = {}
        counts: dict[str, int] = {}
        for msg in replies:
            if msg.has_error():
                log(
                    WARNING,
                    "evaluate: node %s failed: %s",
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
                continue
            arch = str(msg.content[protocol.CONFIG]["arch"])
            metrics = msg.content[protocol.METRICS]
            n = int(metrics["num-examples"])
            if n > 0:
                correct[arch] = correct.get(arch, 0.0) + float(metrics["accuracy"]) * n
                counts[arch] = counts.get(arch, 0) + n
        if not counts:
            return None
        result = MetricRecord({f"accuracy/{a}": correct[a] / counts[a] for a in counts})
        result["accuracy"] = sum(correct.values()) / sum(counts.values())
        return result

    def summary(self) -> None:
        log(
            INFO,
            "\t%s: fraction_train=%s, fraction_evaluate=%s, min_available_nodes=%d",
            type(self).__name__,
            self.fraction_train,
            self.fraction_evaluate,
            self.min_available_nodes,
        )
