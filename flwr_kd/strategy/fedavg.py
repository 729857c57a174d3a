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
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from flwr_kd import protocol
from flwr_kd.configs import EvaluateConfig, MessageHeader
from flwr_kd.records import State, pack_models, record_to_state, state_to_record, unpack_models
from flwr_kd.strategy.base import KDStrategy, check_min_replies
from flwr_kd.strategy.nodes import ArchitectureRegistry, count_by_value
from flwr_kd.strategy.replies import (
    ClientReply,
    RoundStats,
    payload_bytes,
    require_replies,
    screen_replies,
)


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


class HeteroFedAvg(KDStrategy):
    """FedAvg per architecture group, for clients of several timm architectures.

    A round goes on with the valid replies it got, as long as there are `min_replies` of them
    (else `TooFewReplies`); an architecture group without a valid reply keeps its model.

    The global `ArrayRecord` holds every architecture's model, keyed `"<arch>/<param>"`
    (see `flwr_kd.records`), so `start()` keeps Flower's signature and `Result`. Client
    training settings travel in `train_config` (see `flwr_kd.configs.TrainConfig`).

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of the connected nodes, of architectures with a global model, sampled for
        training each round; must lie in (0, 1].
    min_train_nodes : int (default: 2)
        Nodes sampled for training at least (as many as there are, if fewer).
    fraction_evaluate : float (default: 0.0)
        Fraction of the nodes sampled for federated evaluation on their held-out data each
        round; 0.0 skips federated evaluation.
    min_evaluate_nodes : int (default: 2)
        Nodes sampled for evaluation at least, when `fraction_evaluate` is above 0.
    min_available_nodes : int (default: 2)
        Connected nodes to wait for before a round samples any.
    min_replies : int (default: 1)
        Valid training replies a round needs, else it raises `TooFewReplies`; at least 1.
    seed : int (default: 0)
        Seeds node sampling (and, in subclasses, public subsets and distillation).
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
        check_min_replies(min_replies)
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
        """Sample, then describe only the sampled nodes not seen yet (a round costs what its
        participants cost); one without a global model's architecture is replaced."""
        self.nodes.collect(grid)  # answers to `_describe_next_sample`'s queries
        rng, pool, size = self._draw(grid, fraction, minimum, round_)
        chosen: list[int] = []
        while len(chosen) < size and pool:
            picked = rng.sample(pool, min(size - len(chosen), len(pool)))
            self.nodes.describe(grid, config, picked)
            chosen += self.nodes.having(picked, self._global, described=True)
            pool = sorted(set(pool) - set(picked))
        return {n: self.node_arch[n] for n in sorted(chosen)}

    def _draw(
        self, grid: Grid, fraction: float, minimum: int, round_: int
    ) -> tuple[random.Random, list[int], int]:
        """The round's generator, the pool to draw from and the sample's size."""
        pool = self.nodes.having(sorted(self.nodes.connected(grid)), self._global)
        size = min(len(pool), max(int(len(pool) * fraction), minimum))
        return random.Random(self.seed * 100003 + round_), pool, size

    def _describe_next_sample(self, grid: Grid, config: ConfigRecord, server_round: int) -> None:
        """Ask the nodes that the next round will draw (if the pool stays the same) for their
        architecture now, while this round's clients train; `_sample` takes the answers."""
        rng, pool, size = self._draw(
            grid, self.fraction_train, self.min_train_nodes, server_round + 1
        )
        if size < len(pool):  # a full draw has every node described by the first round
            self.nodes.prefetch(grid, config, rng.sample(pool, size))

    def _message(
        self,
        node: int,
        header: MessageHeader,
        model: ArrayRecord,
        config: ConfigRecord,
        message_type: str,
        extra: dict[str, ArrayRecord] | None = None,
    ) -> Message:
        """The global model of `header.arch` and the round's config with `header` (plus
        `extra` records) for `node`."""
        content = RecordDict(
            {
                protocol.ARRAYS: model,
                protocol.CONFIG: ConfigRecord({**dict(config), **header.to_config()}),
                **(extra or {}),
            }
        )
        return Message(content, dst_node_id=node, message_type=message_type)

    # -- training --------------------------------------------------------------------------

    def round_payload(
        self, server_round: int, config: ConfigRecord, nodes: dict[int, str]
    ) -> dict[int, dict[str, ArrayRecord]]:
        """Extra records of this round's training message to each of `nodes` (none here)."""
        return {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = unpack_models(arrays)
        stats = self.stats.setdefault(server_round, RoundStats())
        t0 = time.perf_counter()
        nodes = self._sample(grid, config, self.fraction_train, self.min_train_nodes, server_round)
        config["server-round"] = server_round  # describe messages of later rounds carry it too
        payloads = self.round_payload(server_round, config, nodes)
        model_records = {arch: state_to_record(s) for arch, s in self._global.items()}
        messages = []
        for node, arch in nodes.items():
            header = MessageHeader(arch=arch, server_round=server_round)
            extra = payloads.get(node)
            msg = self._message(node, header, model_records[arch], config, protocol.TRAIN, extra)
            stats.bytes_down += payload_bytes(msg.content)
            messages.append(msg)
        log(INFO, "configure_train: %d nodes (%s)", len(nodes), count_by_value(nodes.values()))
        stats.seconds["configure"] = time.perf_counter() - t0
        self._describe_next_sample(grid, config, server_round)
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
        require_replies(server_round, len(accepted), self.min_replies, stats)
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
            self._message(
                node,
                EvaluateConfig(arch=arch, server_round=server_round),
                state_to_record(self._global[arch]),
                config,
                protocol.EVALUATE,
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
