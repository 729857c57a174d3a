"""The strategies an experiment can name, and all the runner needs to know about each.

The runner (`flwr_kd.runner`) knows no strategy by name: it looks the run config's `strategy`
up here to build it, to score each round and to add what the strategy reports. A new strategy
is one `register()` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from flwr_kd.fanout import FanOut
from flwr_kd.report import ServerTestScore
from flwr_kd.strategy import FedDF, FedMD, HeteroFedAvg

if TYPE_CHECKING:  # experiment.py imports STRATEGIES from here
    from flwr_kd.data import FederatedData
    from flwr_kd.experiment import ExperimentConfig

RoundScore = Callable[[int, ArrayRecord], dict[str, float]]


def server_test_score(strategy: Strategy, cfg: ExperimentConfig, data: FederatedData) -> RoundScore:
    """Each architecture's global model on the server's test set, on the run's device."""
    test = (data.test_x, data.test_y, cfg.device_config, data.task_classes)
    return ServerTestScore(cfg.arch_list, data.model_spec, *test)


def no_report(strategy: Strategy, initial: dict, resumed: bool) -> dict:
    return {}


@dataclass(frozen=True)
class StrategyEntry:
    """How the runner builds a strategy and scores and reports its rounds.

    build(cfg, data, fanout, state_uri) -> Strategy: `state_uri` is where clients that keep
        their models between rounds keep them.
    score(strategy, cfg, data) -> score(round, arrays) -> {arch: accuracy}.
    report(strategy, initial, resumed) -> top-level result sections; its `baselines`, if any,
        join the local-only baseline. `initial` is the round-0 row (accuracy per architecture
        before round 1, or at the restored round when `resumed`).
    global_models: the arrays `start()` returns are one global model per architecture (saved
        as the run's final models); FedMD's are its last consensus, its models stay on clients.
    """

    build: Callable[[ExperimentConfig, FederatedData, FanOut, str], Strategy]
    score: Callable[[Strategy, ExperimentConfig, FederatedData], RoundScore] = server_test_score
    report: Callable[[Strategy, dict, bool], dict] = no_report
    global_models: bool = True


STRATEGY_REGISTRY: dict[str, StrategyEntry] = {}


def register(name: str, entry: StrategyEntry) -> None:
    """Make `name` a valid run-config `strategy`."""
    STRATEGY_REGISTRY[name] = entry


def _common(cfg: ExperimentConfig) -> dict:
    """`HeteroFedAvg`'s parameters, which `FedDF` shares."""
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_available_nodes": cfg.num_clients,
        "min_replies": cfg.min_replies,
        "seed": cfg.seed,
    }


def _public_data(cfg: ExperimentConfig, data: FederatedData, fanout: FanOut) -> dict:
    """What FedDF and FedMD both take: public and validation data, the models' shape, the
    public subset per round, the logits' type on the wire, the executor of server tasks and
    their device."""
    return {
        "public_x": data.public_x,
        "val_x": data.val_x,
        "val_y": data.val_y,
        "model_spec": data.model_spec,
        "subset_size": cfg.subset_size or None,
        "logits_dtype": cfg.logits_dtype,
        "fanout": fanout,
        "device": cfg.device_config,
    }


def build_feddf(
    cfg: ExperimentConfig, data: FederatedData, fanout: FanOut, state_uri: str
) -> FedDF:
    return FedDF(
        distill_config=cfg.distill_config,
        teacher=cfg.teacher,
        **_public_data(cfg, data, fanout),
        **_common(cfg),
    )


def build_fedavg(
    cfg: ExperimentConfig, data: FederatedData, fanout: FanOut, state_uri: str
) -> HeteroFedAvg:
    return HeteroFedAvg(**_common(cfg))


def build_fedmd(
    cfg: ExperimentConfig, data: FederatedData, fanout: FanOut, state_uri: str
) -> FedMD:
    # the clients' hyper-parameters, by phase
    digest = {
        "digest_loss": cfg.digest_loss,
        "temperature": cfg.digest_temperature,
        "digest_epochs": cfg.digest_epochs,
        "digest_batch_size": cfg.digest_batch_size,
        "digest_label_weight": cfg.digest_label_weight,
    }
    private_training = {
        "finetune_epochs": cfg.finetune_epochs,
        "revisit_epochs": cfg.revisit_epochs,
        "revisit_lr": cfg.revisit_lr,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
    }
    return FedMD(
        public_y=data.public_y,
        state_uri=state_uri,
        pretrain=cfg.pretrain_config,
        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
        min_replies=cfg.min_replies,
        min_available_nodes=cfg.num_clients,
        measure_pretrain_per_client=cfg.measure_pretrain_per_client,
        seed=cfg.seed,
        consensus_classes=data.task_classes,
        # the public set is another task's when the head has outputs beyond the private task
        center_consensus=data.task_classes < data.model_spec.num_classes,
        **digest,
        **private_training,
        **_public_data(cfg, data, fanout),
    )


def fedmd_client_score(strategy: FedMD, cfg: ExperimentConfig, data: FederatedData) -> RoundScore:
    """Client models stay on the clients: each round's accuracy is what they reported."""
    return lambda server_round, arrays: strategy.accuracy.get(server_round, {})


def fedmd_report(strategy: FedMD, initial: dict, resumed: bool) -> dict:
    """The transfer-only baseline (accuracy before round 1) and transfer learning's report."""
    sections: dict = {} if resumed else {"baselines": {"transfer_only": initial["accuracy"]}}
    if strategy.transfer is not None:
        sections["transfer_learning"] = strategy.transfer.to_dict()
    return sections


register("feddf", StrategyEntry(build=build_feddf))
register(
    "fedmd",
    StrategyEntry(
        build=build_fedmd, score=fedmd_client_score, report=fedmd_report, global_models=False
    ),
)
register("fedavg", StrategyEntry(build=build_fedavg))

STRATEGIES = STRATEGY_REGISTRY.keys()  # a live view: names registered later count too
