"""FedMD (Li & Wang 2019) as a Flower Message-API strategy, one client call per round.

Before round 1, each unique architecture is trained on the public labelled data once (in
parallel, cached; `flwr_kd.pretrain`), and every client fine-tunes its architecture's weights on
its private data and replies logits on round 1's public subset (the `init` phase, "round 0").
Each round r then sends every client the consensus on subset r; the client digests it, revisits
its private data, and replies logits on subset r+1, which the server averages into the next
consensus. Clients keep their own models in a state store, outside the message.

The `ArrayRecord` that Flower's `start()` carries between rounds is the consensus:
`{"indices": public indices, "logits": averaged logits}`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flwr_kd import protocol
from flwr_kd.distill import DIGEST_LOSSES, average_logits
from flwr_kd.fanout import FanOut, ProcessFanOut
from flwr_kd.models import ModelSpec
from flwr_kd.pretrain import PretrainConfig, TransferReport, per_client_seconds, transfer_learning
from flwr_kd.records import State, state_to_record, unpack_models
from flwr_kd.strategy.hetero import (
    LOGITS_DTYPES,
    RoundStats,
    TooFewReplies,
    logits_problem,
    payload_bytes,
    screen_replies,
)
from flwr_kd.strategy.nodes import ArchitectureRegistry


class FedMDError(TooFewReplies):
    """A FedMD round cannot go on (e.g. too few valid replies)."""


class FedMD(Strategy):
    """Model-agnostic FL by consensus on public data.

    Parameters
    ----------
    public_x, public_y : the public labelled set (transfer learning; subsets by index).
    val_x, val_y : labelled server data to report transfer-learning accuracy.
    model_spec : classes, channels and image size.
    state_uri : where clients keep their models between rounds (`file://<dir>`).
    subset_size : public samples per round (paper: 5000; default: all).
    digest_loss : "kl" (with `temperature`) or "mae" (the paper's code, L1 on logits).
    digest_epochs, digest_batch_size, revisit_epochs, batch_size, lr : client training.
    finetune_epochs, finetune_patience : private fine-tuning after transfer learning.
    pretrain : transfer-learning hyper-parameters; cache_dir: its cache.
    min_replies : valid replies a round needs, else `FedMDError`.
    measure_pretrain_per_client : also time transfer learning once per client, for the record.
    """

    def __init__(
        self,
        *,
        public_x: np.ndarray,
        public_y: np.ndarray,
        val_x: np.ndarray,
        val_y: np.ndarray,
        model_spec: ModelSpec,
        state_uri: str,
        subset_size: int | None = None,
        digest_loss: str = "kl",
        digest_epochs: int = 4,
        digest_batch_size: int = 32,
        revisit_epochs: int = 1,
        batch_size: int = 16,
        lr: float = 1e-3,
        temperature: float = 3.0,
        finetune_epochs: int = 20,
        finetune_patience: int = 3,
        pretrain: PretrainConfig | None = None,
        cache_dir=None,
        min_replies: int = 2,
        min_available_nodes: int = 2,
        logits_dtype: str = "float16",
        fanout: FanOut | None = None,
        measure_pretrain_per_client: bool = False,
        seed: int = 0,
    ) -> None:
        if digest_loss not in DIGEST_LOSSES:
            raise ValueError(f"digest_loss must be one of {DIGEST_LOSSES}, got '{digest_loss}'")
        if logits_dtype not in LOGITS_DTYPES:
            raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got '{logits_dtype}'")
        if min_replies < 1:
            raise ValueError("min_replies must be at least 1")
        self.public_x, self.public_y = public_x, public_y
        self.val_x, self.val_y = val_x, val_y
        self.model_spec = model_spec
        self.state_uri = state_uri
        self.subset_size = min(subset_size or len(public_x), len(public_x))
        self.client_config = {
            "digest-loss": digest_loss,
            "digest-epochs": digest_epochs,
            "digest-batch-size": digest_batch_size,
            "revisit-epochs": revisit_epochs,
            "batch-size": batch_size,
            "lr": lr,
            "temperature": temperature,
            "finetune-epochs": finetune_epochs,
            "finetune-patience": finetune_patience,
            "logits-dtype": logits_dtype,
            "state-uri": state_uri,
        }
        self.pretrain = pretrain or PretrainConfig(seed=seed)
        self.cache_dir = cache_dir
        self.min_replies = min_replies
        self.nodes = ArchitectureRegistry(min_available_nodes)
        self._owns_fanout = fanout is None
        self.fanout = fanout or ProcessFanOut()
        self.measure_pretrain_per_client = measure_pretrain_per_client
        self.seed = seed
        self.stats: dict[int, RoundStats] = {}
        self.accuracy: dict[int, dict[str, float]] = {}  # round -> arch -> mean client test acc
        self.transfer: TransferReport | None = None
        self._participants: dict[int, str] = {}
        self._sent_at = 0.0

    # -- public subsets ---------------------------------------------------------------------

    def subset(self, server_round: int) -> np.ndarray:
        """Public indices of round `server_round`'s subset (deterministic per seed)."""
        rng = np.random.default_rng((self.seed, server_round))
        return np.sort(rng.choice(len(self.public_x), self.subset_size, replace=False))

    # -- the run ------------------------------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
    ):
        """Flower's `start()`, preceded by transfer learning and the init phase.

        `initial_arrays` holds each architecture's initial weights (keyed `"<arch>/<name>"`);
        the returned `Result.arrays` is the last consensus.
        """
        train_config = ConfigRecord() if train_config is None else train_config
        try:
            archs = self.nodes.refresh(grid, train_config)
            initial = unpack_models(initial_arrays)
            missing = sorted(set(archs.values()) - set(initial))
            if missing:
                raise FedMDError(
                    f"no initial weights for architectures {missing} of connected nodes"
                )
            used = {a: initial[a] for a in initial if a in set(archs.values())}
            pretrained = self.transfer_learning(used, list(archs.values()))
            consensus = self.init_phase(grid, pretrained, train_config, timeout)
            return super().start(
                grid, consensus, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
            )
        finally:
            if self._owns_fanout:
                self.fanout.close()

    def transfer_learning(
        self, initial: dict[str, State], client_archs: list[str]
    ) -> dict[str, State]:
        args = (
            self.model_spec,
            self.public_x,
            self.public_y,
            self.val_x,
            self.val_y,
            self.pretrain,
        )
        weights, self.transfer = transfer_learning(initial, *args, self.fanout, self.cache_dir)
        log(
            INFO,
            "Transfer learning: %.1fs, trained %s, cached %s",
            self.transfer.seconds,
            self.transfer.trained,
            self.transfer.cached,
        )
        if self.measure_pretrain_per_client:
            self.transfer.per_client_seconds = per_client_seconds(
                client_archs, initial, *args, self.fanout
            )
            log(
                INFO,
                "Transfer learning once per client (for the record): %.1fs",
                self.transfer.per_client_seconds,
            )
        return weights

    def init_phase(
        self, grid: Grid, pretrained: dict[str, State], config: ConfigRecord, timeout: float
    ) -> ArrayRecord:
        """Round 0: clients fine-tune the pretrained weights privately, reply logits on
        round 1's subset; returns the first consensus."""
        records = {arch: state_to_record(state) for arch, state in pretrained.items()}
        messages = self._messages(
            grid, 0, config, lambda arch: {protocol.ARRAYS: records[arch]}, phase="init"
        )
        replies = grid.send_and_receive(messages, timeout=timeout)
        consensus, _ = self._aggregate(0, replies)
        return consensus

    # -- Flower's round hooks ---------------------------------------------------------------------

    def _messages(
        self, grid: Grid, server_round: int, config: ConfigRecord, records_for, phase: str
    ) -> list[Message]:
        stats = self.stats.setdefault(server_round, RoundStats())
        self._participants = self.nodes.refresh(grid, config)
        next_subset = ArrayRecord({"indices": Array(self.subset(server_round + 1))})
        messages = []
        for node, arch in self._participants.items():
            content = RecordDict(
                {
                    protocol.CONFIG: ConfigRecord(
                        {
                            **dict(config),
                            **self.client_config,
                            "arch": arch,
                            "phase": phase,
                            "server-round": server_round,
                            "subset-round": server_round + 1,
                        }
                    ),
                    protocol.PUBLIC: next_subset,
                    **records_for(arch),
                }
            )
            stats.bytes_down += payload_bytes(content)
            messages.append(Message(content, dst_node_id=node, message_type=protocol.FEDMD_ROUND))
        self._sent_at = time.perf_counter()
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(
            grid, server_round, config, lambda arch: {protocol.CONSENSUS: arrays}, phase="round"
        )

    def check_reply(self, msg: Message, subset_round: int) -> tuple[str, np.ndarray, dict] | str:
        """(arch, logits, metrics) of a valid reply, or the reason to leave it out."""
        if msg.has_error():
            return f"client error: {msg.error.reason}"
        content, node = msg.content, msg.metadata.src_node_id
        arch = str(content[protocol.CONFIG]["arch"]) if protocol.CONFIG in content else None
        if arch != self._participants.get(node):
            return f"architecture '{arch}' but node registered as '{self._participants.get(node)}'"
        if protocol.LOGITS not in content or "logits" not in content[protocol.LOGITS]:
            return "reply lacks logits"
        got_round = content[protocol.CONFIG].get("subset-round", -1)
        if not isinstance(got_round, int) or isinstance(got_round, bool):
            return f"'subset-round' must be an integer, got {got_round!r}"
        indices = (
            content[protocol.LOGITS]["indices"].numpy()
            if "indices" in content[protocol.LOGITS]
            else None
        )
        if (
            got_round != subset_round
            or indices is None
            or not np.array_equal(indices, self.subset(subset_round))
        ):
            return (
                f"logits for the wrong public subset (round {got_round}, expected {subset_round})"
            )
        logits = content[protocol.LOGITS]["logits"].numpy()
        problem = logits_problem(logits, (self.subset_size, self.model_spec.num_classes))
        if problem:
            return problem
        metrics = dict(content[protocol.METRICS]) if protocol.METRICS in content else {}
        return arch, logits, metrics

    def _aggregate(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord, MetricRecord]:
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.seconds["clients"] = time.perf_counter() - self._sent_at
        valid: list[tuple[str, np.ndarray, dict]] = screen_replies(
            server_round,
            replies,
            lambda msg: self.check_reply(msg, server_round + 1),
            stats,
            template="round %d: left node %s out of the consensus: %s",
        )
        stats.client_compute = [
            sum(v for k, v in m.items() if k.endswith("-seconds")) for _, _, m in valid
        ]
        if len(valid) < self.min_replies:
            raise FedMDError(
                f"round {server_round}: {len(valid)} valid replies, fewer than min_replies={self.min_replies}; "
                f"dropped: {stats.dropped}",
                stats.dropped,
            )
        consensus = average_logits([logits for _, logits, _ in valid])
        accuracy: dict[str, float] = {}
        for arch in dict.fromkeys(a for a, _, _ in valid):
            scores = [m["test-accuracy"] for a, _, m in valid if a == arch and "test-accuracy" in m]
            if scores:
                accuracy[arch] = round(float(np.mean(scores)), 4)
        self.accuracy[server_round] = accuracy
        for key in ("finetune-seconds", "digest-seconds", "revisit-seconds", "logits-seconds"):
            values = [m[key] for _, _, m in valid if key in m]
            if values:
                stats.seconds[f"client-{key[:-8]}-max"] = max(values)
        record = ArrayRecord(
            {"indices": Array(self.subset(server_round + 1)), "logits": Array(consensus)}
        )
        metrics = MetricRecord(
            {
                "replies": len(valid),
                "dropped": len(stats.dropped),
                **{f"accuracy/{a}": v for a, v in accuracy.items()},
            }
        )
        return record, metrics

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self._aggregate(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # each reply of the fused round already carries the client's test accuracy

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(
            INFO,
            "\tFedMD: subset=%d, min_replies=%d, %s, %s",
            self.subset_size,
            self.min_replies,
            self.client_config,
            self.pretrain,
        )
