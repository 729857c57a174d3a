"""FedDF (Lin et al. 2020) as a Flower Message-API strategy.

Each round: clients of each architecture train from that architecture's global model and reply
their weights plus float16 logits on the round's public distillation subset; the server FedAvg-s
every architecture group, averages all clients' logits into the ensemble teacher, and distils
every group model towards it, one fan-out task per architecture, in parallel.

The subset travels as indices to clients that hold the server's public set (their describe
reply carries its fingerprint) and as images to the others (`flwr_kd.publicset`), so a
client's downlink stays within a few KB of FedAvg's.

`teacher="server"` reproduces the seed system instead: clients send no logits and every
distillation task re-evaluates all client models to build the teacher (k x n forward passes).
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log

from flwr_kd import protocol
from flwr_kd.configs import DeviceConfig, DistillConfig, TrainConfig
from flwr_kd.distill import average_logits
from flwr_kd.fanout import FanOut
from flwr_kd.models import ModelSpec
from flwr_kd.publicset import CLIPPED_KEY, FINGERPRINT_KEY, encode_subset, fingerprint
from flwr_kd.records import State, to_numpy
from flwr_kd.strategy.base import check_choice, public_subset
from flwr_kd.strategy.fedavg import HeteroFedAvg
from flwr_kd.strategy.replies import LOGITS_DTYPES, ClientReply, logits_problem, note_clipped
from flwr_kd.tasks import DistillTask, run_distill_task

TEACHERS = ("clients", "server")


class FedDF(HeteroFedAvg):
    """Ensemble distillation across architecture groups.

    Parameters
    ----------
    public_x : np.ndarray
        Unlabelled public inputs (N, C, H, W), float32, to distil on; must not be empty.
    val_x : np.ndarray
        Small labelled server set (inputs) for early stopping of distillation.
    val_y : np.ndarray
        Its labels.
    model_spec : ModelSpec
        Classes, channels and image size of the models.
    distill_config : DistillConfig, optional (default: None)
        Steps, batch size, learning rate, temperature and early stopping of distillation;
        None means `DistillConfig()`.
    subset_size : int, optional (default: None)
        Public samples drawn per round; None means all of `public_x`.
    teacher : str (default: "clients")
        "clients": clients send logits on the round's subset with their weights;
        "server": every distillation task re-evaluates all client models (the seed system).
    logits_dtype : str (default: "float16")
        Dtype of the clients' logits on the wire: "float16" or "float32".
    fanout : FanOut, optional (default: None)
        Executor of the per-architecture distillation tasks; None means a process pool that
        this strategy creates and `close()` shuts down when `start()` returns.
    device : DeviceConfig or str (default: "auto")
        Where distillation runs: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N",
        "mps", or a `DeviceConfig` that also sets autocast. Clients use the run config's.
    **kwargs
        `HeteroFedAvg`'s parameters: `fraction_train`, `min_train_nodes`,
        `fraction_evaluate`, `min_evaluate_nodes`, `min_available_nodes`, `min_replies`,
        `seed`.
    """

    def __init__(
        self,
        *,
        public_x: np.ndarray,
        val_x: np.ndarray,
        val_y: np.ndarray,
        model_spec: ModelSpec,
        distill_config: DistillConfig | None = None,
        subset_size: int | None = None,
        teacher: str = "clients",
        logits_dtype: str = TrainConfig.logits_dtype,
        fanout: FanOut | None = None,
        device: DeviceConfig | str = "auto",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("teacher", teacher, TEACHERS)
        check_choice("logits_dtype", logits_dtype, LOGITS_DTYPES)
        if len(public_x) == 0:
            raise ValueError("FedDF needs public data to distil on")
        self.public_x = np.asarray(public_x, np.float32)
        self.val_x, self.val_y = val_x, val_y
        self.model_spec = model_spec
        self.distill_config = distill_config or DistillConfig()
        self.subset_size = min(subset_size or len(public_x), len(public_x))
        self.teacher = teacher
        self.logits_dtype = logits_dtype
        self.use_fanout(fanout)
        self.device = DeviceConfig.of(device)
        self.public_fingerprint = fingerprint(self.public_x)
        self._subset = self.public_x[:0]

    def round_payload(
        self, server_round: int, config: ConfigRecord, nodes: dict[int, str]
    ) -> dict[int, dict[str, ArrayRecord]]:
        """The round's public subset: its indices to nodes that hold the public set, its
        images to the others."""
        idx = public_subset(len(self.public_x), self.subset_size, self.seed, server_round)
        self._subset = self.public_x[idx]
        if self.teacher == "server":
            return {}
        config["logits-dtype"] = self.logits_dtype
        config[FINGERPRINT_KEY] = self.public_fingerprint
        by_index = {protocol.PUBLIC: encode_subset(idx, len(self.public_x))}
        images = {protocol.PUBLIC: ArrayRecord({"x": Array(self._subset)})}
        holders = self.nodes.public_of
        return {n: by_index if holders.get(n) == self.public_fingerprint else images for n in nodes}

    def check_reply(self, msg: Message) -> ClientReply | str:
        parsed = super().check_reply(msg)
        if isinstance(parsed, str) or self.teacher == "server":
            return parsed
        if protocol.LOGITS not in msg.content or "logits" not in msg.content[protocol.LOGITS]:
            return "reply lacks logits"
        logits = to_numpy(msg.content[protocol.LOGITS]["logits"])
        problem = logits_problem(logits, (len(self._subset), self.model_spec.num_classes))
        if problem:
            return problem
        parsed.logits = logits
        if protocol.METRICS in msg.content:
            parsed.logits_clipped = int(msg.content[protocol.METRICS].get(CLIPPED_KEY, 0))
        return parsed

    def aggregate_train(
        self, server_round: int, replies
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self.teacher == "clients":
            metrics[CLIPPED_KEY] = self.stats[server_round].logits_clipped
        return arrays, metrics

    def after_fedavg(
        self, server_round: int, models: dict[str, State], replies: list[ClientReply]
    ) -> dict[str, State]:
        stats = self.stats[server_round]
        teacher = None
        if self.teacher == "clients":
            teacher = average_logits([r.logits for r in replies])
            note_clipped(server_round, {r.node_id: r.logits_clipped for r in replies}, stats)
        tasks = [
            DistillTask(
                arch=arch,
                model_spec=self.model_spec,
                state=state,
                x=self._subset,
                val_x=self.val_x,
                val_y=self.val_y,
                config=self.distill_config,
                teacher_logits=teacher,
                teacher_models=[] if teacher is not None else [(r.arch, r.state) for r in replies],
                seed=self.seed * 1000 + server_round,
                **self.device.to_config(),
            )
            for arch, state in models.items()
        ]
        label = f"distillation, round {server_round}"
        outcomes = self.fanout.map_with_progress(run_distill_task, tasks, label)
        for o in outcomes:
            stats.distill[o.arch] = {
                "steps": o.report.steps_run,
                "best_step": o.report.best_step,
                "val_accuracy_before": round(o.report.initial_val_accuracy, 4),
                "val_accuracy_after": round(o.report.best_val_accuracy, 4),
                "validation_seconds": round(o.report.validation_seconds, 3),
                "teacher_seconds": round(o.teacher_seconds, 3),
                "seconds": round(o.distill_seconds, 3),
            }
            log(
                INFO,
                "distil %s: val acc %.3f -> %.3f (%d steps, kept step %d)",
                o.arch,
                o.report.initial_val_accuracy,
                o.report.best_val_accuracy,
                o.report.steps_run,
                o.report.best_step,
            )
        return {o.arch: o.state for o in outcomes}

    def summary(self) -> None:
        super().summary()
        log(
            INFO,
            "\tFedDF: teacher=%s, subset=%d, logits=%s, %s",
            self.teacher,
            self.subset_size,
            self.logits_dtype,
            self.distill_config,
        )
