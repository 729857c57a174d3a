"""FedMD (Li & Wang 2019) as a Flower Message-API strategy, one client call per round.

Before round 1, each unique architecture is trained on the public labelled data once (in
parallel, cached; `flwr_kd.pretrain`), and every client fine-tunes its architecture's weights on
its private data and replies logits on round 1's public subset (the `init` phase, "round 0").
Each round r then sends every client the consensus on subset r; the client digests it, revisits
its private data, and replies logits on subset r+1, which the server averages into the next
consensus. Clients keep their own models in a state store, outside the message. The
transfer-learned weights are published there too: a client without a saved model (its init
failed, it joined late, its state was lost) rejoins from its architecture's.

The `ArrayRecord` that Flower's `start()` carries between rounds is the consensus:
`{"indices": public indices, "logits": averaged logits}`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from flwr_kd import protocol
from flwr_kd.configs import DeviceConfig, FedMDRoundConfig, PretrainConfig
from flwr_kd.distill import DIGEST_LOSSES
from flwr_kd.fanout import FanOut
from flwr_kd.models import ModelSpec
from flwr_kd.pretrain import TransferData, TransferReport, pretrain_architectures
from flwr_kd.records import State, state_to_record, unpack_models
from flwr_kd.state import open_state_store
from flwr_kd.strategy import consensus
from flwr_kd.strategy.base import KDStrategy, check_choice, check_min_replies, public_subset
from flwr_kd.strategy.fedmd_messages import round_messages
from flwr_kd.strategy.nodes import ArchitectureRegistry
from flwr_kd.strategy.replies import (
    LOGITS_DTYPES,
    RoundStats,
    TooFewReplies,
    payload_bytes,
    require_replies,
    screen_replies,
)


class FedMDError(TooFewReplies):
    """A FedMD round cannot go on (e.g. too few valid replies)."""


class FedMD(KDStrategy):
    """Model-agnostic FL by consensus on public data.

    Parameters
    ----------
    public_x : np.ndarray
        Public labelled inputs (N, C, H, W), float32: transfer learning and round subsets.
    public_y : np.ndarray
        Their labels.
    val_x, val_y : np.ndarray
        Labelled server data to report transfer-learning accuracy on.
    model_spec : ModelSpec
        Classes, channels and image size of the models.
    state_uri : str
        Where clients keep their models between rounds (`file://<dir>`, `gs://...`).
    subset_size : int, optional (default: None)
        Public samples per round (paper: 5000); None means all of `public_x`.
    digest_loss : str (default: "kl")
        "kl" (at `temperature`) or "mae" (the paper's code, L1 on logits).
    digest_epochs : int (default: 4)
        Epochs over the round's public subset towards the consensus.
    digest_batch_size : int (default: 32)
        Batch size of the digest step.
    revisit_epochs : int (default: 1)
        Epochs on private data after digesting.
    revisit_lr : float (default: 1e-4)
        Adam learning rate of the revisit (a tenth of `lr`: see `FedMDRoundConfig`).
    batch_size : int (default: 16)
        Batch size of private-data training (fine-tuning and revisit).
    lr : float (default: 0.001)
        Adam learning rate of every client step.
    temperature : float (default: 3.0)
        Softmax temperature of the "kl" digest loss.
    digest_label_weight : float (default: 0.5)
        Share of cross-entropy on the public labels in the digest loss (0: the paper's digest,
        the consensus alone; why 0.5: `FedMDRoundConfig`). The consensus then carries its
        subset's labels, -1 where a label is not among the consensus's classes (a public set
        of another task has none there, and gets the paper's digest).
    finetune_epochs : int (default: 20)
        Most epochs of private fine-tuning after transfer learning (the init phase).
    finetune_patience : int (default: 3)
        Epochs without a held-out improvement that end fine-tuning.
    pretrain : PretrainConfig, optional (default: None)
        Transfer-learning hyper-parameters; None means `PretrainConfig(seed=seed)`.
    cache_dir : str or Path, optional (default: None)
        Cache of pretrained weights; None means `flwr_kd.pretrain.default_cache_dir()`.
    pretrained_uri : str, optional (default: None)
        State store where transfer learning publishes each architecture's weights for clients
        without a saved model to rejoin from (every client must be able to read it); None
        means `state_uri`.
    min_replies : int (default: 2)
        Valid replies a round (the init phase included) needs, else `FedMDError`.
    min_available_nodes : int (default: 2)
        Connected nodes to wait for before each round.
    consensus_classes : int (default: 0)
        The leading outputs the consensus covers (0: all): the private task's classes when the
        public set is another task's, whose own outputs, digested, pull private images to it.
    center_consensus : bool (default: False)
        Subtract each class's mean over the round's subset from the consensus. For a public set
        of another task: the ensemble's average leaning among the private classes on those
        images says nothing about private images, yet digested for epochs it taught every
        model to answer one class (docs/evidence-lab.md). What is left is how the public
        samples differ, which is what the collaboration shares.
    logits_dtype : str (default: "float16")
        Dtype of the clients' logits on the wire: "float16" or "float32".
    fanout : FanOut, optional (default: None)
        Executor of transfer learning; None means a process pool closed by `close()`.
    measure_pretrain_per_client : bool (default: False)
        Also time transfer learning once per client (the seed system's way), for the record.
    seed : int (default: 0)
        Seeds the public subsets and, by default, transfer learning.
    device : DeviceConfig or str (default: "auto")
        Where transfer learning runs (as FedDF's `device`); clients use the run config's.
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
        digest_loss: str = FedMDRoundConfig.digest_loss,
        digest_epochs: int = FedMDRoundConfig.digest_epochs,
        digest_batch_size: int = FedMDRoundConfig.digest_batch_size,
        revisit_epochs: int = FedMDRoundConfig.revisit_epochs,
        revisit_lr: float = FedMDRoundConfig.revisit_lr,
        batch_size: int = FedMDRoundConfig.batch_size,
        lr: float = FedMDRoundConfig.lr,
        temperature: float = FedMDRoundConfig.temperature,
        digest_label_weight: float = FedMDRoundConfig.digest_label_weight,
        finetune_epochs: int = FedMDRoundConfig.finetune_epochs,
        finetune_patience: int = FedMDRoundConfig.finetune_patience,
        pretrain: PretrainConfig | None = None,
        cache_dir=None,
        pretrained_uri: str | None = None,
        min_replies: int = 2,
        min_available_nodes: int = 2,
        consensus_classes: int = 0,
        center_consensus: bool = False,
        logits_dtype: str = FedMDRoundConfig.logits_dtype,
        fanout: FanOut | None = None,
        measure_pretrain_per_client: bool = False,
        seed: int = 0,
        device: DeviceConfig | str = "auto",
    ) -> None:
        check_choice("digest_loss", digest_loss, DIGEST_LOSSES)
        check_choice("logits_dtype", logits_dtype, LOGITS_DTYPES)
        check_min_replies(min_replies)
        if not 0 <= digest_label_weight <= 1:
            raise ValueError(f"digest_label_weight must lie in [0, 1], got {digest_label_weight}")
        self.public_x, self.public_y, self.val_x, self.val_y = public_x, public_y, val_x, val_y
        self.model_spec = model_spec
        self.state_uri = state_uri
        self.subset_size = min(subset_size or len(public_x), len(public_x))
        #: The client-side settings every `train.fedmd` message carries (plus its header).
        self.round_config = FedMDRoundConfig(
            state_uri=state_uri,
            digest_loss=digest_loss,
            digest_epochs=digest_epochs,
            digest_batch_size=digest_batch_size,
            temperature=temperature,
            digest_label_weight=digest_label_weight,
            revisit_epochs=revisit_epochs,
            revisit_lr=revisit_lr,
            finetune_epochs=finetune_epochs,
            finetune_patience=finetune_patience,
            batch_size=batch_size,
            lr=lr,
            logits_dtype=logits_dtype,
            pretrained_uri=pretrained_uri or state_uri,
        )
        self.pretrain, self.cache_dir = pretrain or PretrainConfig(seed=seed), cache_dir
        self.min_replies = min_replies
        self.consensus_classes = consensus_classes
        self.center_consensus = center_consensus
        self.nodes = ArchitectureRegistry(min_available_nodes)
        self.use_fanout(fanout)
        self.device = DeviceConfig.of(device)
        self.measure_pretrain_per_client = measure_pretrain_per_client
        self.seed = seed
        self.stats: dict[int, RoundStats] = {}
        self.accuracy: dict[int, dict[str, float]] = {}  # round -> arch -> mean client test acc
        self.transfer: TransferReport | None = None
        self._participants: dict[int, str] = {}
        self._sent_at = 0.0

    def subset(self, server_round: int) -> np.ndarray:
        """Public indices of round `server_round`'s subset (deterministic per seed)."""
        return public_subset(len(self.public_x), self.subset_size, self.seed, server_round)

    def prepare(
        self, grid: Grid, initial_arrays: ArrayRecord, train_config: ConfigRecord, timeout: float
    ) -> ArrayRecord:
        """Transfer learning and the init phase; returns the first consensus. `initial_arrays`
        holds each architecture's initial weights (`"<arch>/<name>"`); `start()`'s
        `Result.arrays` is the last consensus."""
        archs = self.nodes.refresh(grid, train_config)
        initial = unpack_models(initial_arrays)
        missing = sorted(set(archs.values()) - set(initial))
        if missing:
            raise FedMDError(f"no initial weights for architectures {missing} of connected nodes")
        used = {a: initial[a] for a in initial if a in set(archs.values())}
        pretrained = self.transfer_learning(used, list(archs.values()))
        return self.init_phase(grid, pretrained, train_config, timeout)

    def transfer_learning(
        self, initial: dict[str, State], client_archs: list[str]
    ) -> dict[str, State]:
        """Pretrained weights per architecture (cached), also published in the clients' state
        store for clients that rejoin; the report goes to `self.transfer`."""
        weights, self.transfer = pretrain_architectures(
            initial,
            client_archs,
            TransferData(self.model_spec, self.public_x, self.public_y, self.val_x, self.val_y),
            self.pretrain,
            self.fanout,
            self.cache_dir,
            self.measure_pretrain_per_client,
            self.device,
        )
        store = open_state_store(self.round_config.pretrained_uri)
        for arch, state in weights.items():
            store.save(FedMDRoundConfig.pretrained_key(arch), state)
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
        first, _ = self.aggregate_train(0, replies)
        return first

    def _messages(
        self, grid: Grid, server_round: int, config: ConfigRecord, records_for, phase: str
    ) -> list[Message]:
        """One `train.fedmd` message per connected node, with `records_for(arch)`."""
        stats = self.stats.setdefault(server_round, RoundStats())
        self._participants = self.nodes.refresh(grid, config)
        messages = round_messages(
            self._participants,
            self.round_config,
            config,
            server_round,
            self.subset(server_round + 1),
            records_for,
            phase,
        )
        stats.bytes_down += sum(payload_bytes(m.content) for m in messages)
        self._sent_at = time.perf_counter()
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(
            grid, server_round, config, lambda arch: {protocol.CONSENSUS: arrays}, phase="round"
        )

    def check_reply(self, msg: Message, subset_round: int) -> consensus.LogitsReply | str:
        """The valid reply, or the reason to leave it out of the consensus."""
        registered, subset = self._participants.get(msg.metadata.src_node_id), self.subset
        classes = self.model_spec.num_classes
        return consensus.check_logits_reply(
            msg, registered, subset_round, subset(subset_round), classes
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord, MetricRecord]:
        """The next consensus from the valid replies, and the round's metrics."""
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.seconds["clients"] = time.perf_counter() - self._sent_at
        valid: list[consensus.LogitsReply] = screen_replies(
            server_round,
            replies,
            lambda msg: self.check_reply(msg, server_round + 1),
            stats,
            template="round %d: left node %s out of the consensus: %s",
        )
        stats.client_compute = [consensus.compute_seconds(r) for r in valid]
        require_replies(server_round, len(valid), self.min_replies, stats, FedMDError)
        subset = self.subset(server_round + 1)
        labels = self.public_y[subset] if self.round_config.digest_label_weight else None
        record = consensus.average(
            subset, valid, self.consensus_classes, self.center_consensus, labels
        )
        accuracy = self.accuracy[server_round] = consensus.mean_accuracy(valid)
        return record, consensus.round_metrics(server_round, valid, stats, accuracy)

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # each reply of the fused round already carries the client's test accuracy

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        settings = (self.subset_size, self.min_replies, self.round_config.settings())
        log(INFO, "\tFedMD: subset=%d, min_replies=%d, %s, %s", *settings, self.pretrain)
