"""The flwr-kd `ServerApp`: one experiment from run config to `result.json`.

`flwr run` (examples/quickstart) and `flwr-kd simulate` both end up in `run_experiment`, which
builds the strategy named by the run config, runs it with Flower's own `start()`, measures the
local-only baseline, and writes the report.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from flwr_kd.data import FederatedData, load_federated
from flwr_kd.experiment import ExperimentConfig
from flwr_kd.fanout import FanOut, make_fanout
from flwr_kd.models import ModelSpec, create_model, state_to_numpy
from flwr_kd.pretrain import PretrainConfig
from flwr_kd.records import pack_models
from flwr_kd.report import RoundRecorder, ServerTestScore, print_summary, write_result
from flwr_kd.strategy import FedDF, FedMD, HeteroFedAvg
from flwr_kd.strategy.resume import RoundOffset
from flwr_kd.tasks import LocalTrainTask, run_local_train_task


def initial_arrays(archs: list[str], spec: ModelSpec, seed: int):
    """Freshly initialised global models, one per architecture, seeded."""
    models = {}
    for i, arch in enumerate(archs):
        torch.manual_seed(seed * 7919 + i)
        models[arch] = state_to_numpy(create_model(arch, spec))
    return pack_models(models)


def build_strategy(
    cfg: ExperimentConfig, data: FederatedData, fanout: FanOut, state_uri: str
) -> Strategy:
    """The strategy the run config names; `state_uri` is where FedMD clients keep models."""
    if cfg.strategy == "fedmd":
        return FedMD(
            public_x=data.public_x,
            public_y=data.public_y,
            val_x=data.val_x,
            val_y=data.val_y,
            model_spec=data.model_spec,
            state_uri=state_uri,
            subset_size=cfg.subset_size or None,
            digest_loss=cfg.digest_loss,
            digest_epochs=cfg.digest_epochs,
            digest_batch_size=cfg.digest_batch_size,
            revisit_epochs=cfg.revisit_epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            temperature=cfg.digest_temperature,
            finetune_epochs=cfg.finetune_epochs,
            pretrain=PretrainConfig(epochs=cfg.pretrain_epochs, lr=cfg.lr, seed=cfg.seed),
            cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
            min_replies=cfg.min_replies,
            min_available_nodes=cfg.num_clients,
            logits_dtype=cfg.logits_dtype,
            fanout=fanout,
            measure_pretrain_per_client=cfg.measure_pretrain_per_client,
            seed=cfg.seed,
        )
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_available_nodes=cfg.num_clients,
        min_replies=cfg.min_replies,
        seed=cfg.seed,
    )
    if cfg.strategy == "fedavg":
        return HeteroFedAvg(**common)
    return FedDF(
        public_x=data.public_x,
        val_x=data.val_x,
        val_y=data.val_y,
        model_spec=data.model_spec,
        distill_config=cfg.distill_config,
        subset_size=cfg.subset_size or None,
        teacher=cfg.teacher,
        logits_dtype=cfg.logits_dtype,
        fanout=fanout,
        **common,
    )


def local_only_baseline(
    cfg: ExperimentConfig, data: FederatedData, fanout: FanOut
) -> dict[str, float]:
    """Each architecture trained on one client's private data alone, with the private-data
    epochs a client gets in the federated run, on the same test set; the mean over that
    architecture's clients."""
    tasks = []
    for pid in range(cfg.num_clients):
        x, y, _, _ = data.client_data(pid)
        tasks.append(
            LocalTrainTask(
                arch=cfg.arch_of_partition(pid),
                model_spec=data.model_spec,
                x=x,
                y=y,
                test_x=data.test_x,
                test_y=data.test_y,
                epochs=cfg.local_budget_epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                seed=cfg.seed * 1000 + pid,
            )
        )
    outcomes = fanout.map(run_local_train_task, tasks)
    return {
        arch: round(float(np.mean([o.accuracy for o in outcomes if o.arch == arch])), 4)
        for arch in cfg.arch_list
        if any(o.arch == arch for o in outcomes)
    }


@dataclass
class RuntimeHooks:
    """What a runtime adds to an experiment; the serverless driver brings its own fan-out,
    client-state location, per-round records, and, on resume, the restored arrays."""

    fanout: FanOut | None = None
    state_uri: str | None = None
    resume_arrays: ArrayRecord | None = None
    rounds_done: int = 0
    on_round_end: Callable[[int, ArrayRecord, Strategy], None] | None = None


def run_experiment(grid: Grid, cfg: ExperimentConfig, hooks: RuntimeHooks | None = None) -> dict:
    """Run one experiment on `grid`; returns (and writes, if out-dir is set) the result."""
    hooks = hooks or RuntimeHooks()
    t0 = time.perf_counter()
    data = load_federated(cfg.data_spec)
    client_config = ConfigRecord(cfg.client_config())
    with contextlib.ExitStack() as stack:
        fanout = hooks.fanout or stack.enter_context(make_fanout(cfg.fanout))
        state_uri = hooks.state_uri or "file://" + stack.enter_context(
            tempfile.TemporaryDirectory(prefix="flwr-kd-clients-")
        )
        strategy = build_strategy(cfg, data, fanout, state_uri=state_uri)
        if isinstance(strategy, FedMD):  # client models stay on clients: they report accuracy
            score = lambda server_round, arrays: strategy.accuracy.get(server_round, {})
        else:
            score = ServerTestScore(cfg.arch_list, data.model_spec, data.test_x, data.test_y)
        recorder = RoundRecorder(
            cfg.arch_list,
            score,
            on_round_end=hooks.on_round_end and (lambda r, a: hooks.on_round_end(r, a, strategy)),
        )
        recorder.header(f"{cfg.strategy} on {cfg.dataset}: test accuracy per architecture")
        runner, start_arrays = strategy, initial_arrays(cfg.arch_list, data.model_spec, cfg.seed)
        if hooks.rounds_done:
            runner, start_arrays = RoundOffset(strategy, hooks.rounds_done), hooks.resume_arrays
        flower_result = runner.start(
            grid=grid,
            initial_arrays=start_arrays,
            num_rounds=cfg.num_server_rounds - hooks.rounds_done,
            train_config=client_config,
            evaluate_config=ConfigRecord(cfg.client_config()),
            evaluate_fn=recorder,
            **({"timeout": cfg.round_timeout} if cfg.round_timeout else {}),
        )
        baselines = {}
        if isinstance(strategy, FedMD) and not hooks.rounds_done:
            baselines["transfer_only"] = recorder.rounds[0]["accuracy"]
        if cfg.local_only_baseline:
            log(INFO, "Local-only baseline")
            t_base = time.perf_counter()
            baselines["local_only"] = local_only_baseline(cfg, data, fanout)
            baseline_seconds = time.perf_counter() - t_base
    rounds = []
    for row in recorder.rounds[1:]:
        r = row["round"]
        stats = strategy.stats[r].to_dict() if r in strategy.stats else {}
        client_eval = flower_result.evaluate_metrics_clientapp.get(r - hooks.rounds_done)
        rounds.append(
            {
                **row,
                "bytes": stats.get("bytes", {}),
                "time": stats.get("seconds", {}),
                "replies": stats.get("replies", 0),
                "dropped": stats.get("dropped", []),
                "distill": stats.get("distill", {}),
                "client_compute": stats.get("client_compute", []),
                **({"client_accuracy": dict(client_eval)} if client_eval else {}),
            }
        )
    result = {
        "config": cfg.to_run_config(),
        "architectures": {
            a: sum(cfg.arch_of_partition(p) == a for p in range(cfg.num_clients))
            for a in cfg.arch_list
        },
        "initial": {
            **recorder.rounds[0],
            **({"phase": strategy.stats[0].to_dict()} if 0 in strategy.stats else {}),
        },
        "rounds": rounds,
        "baselines": baselines,
        "seconds": {"total": round(time.perf_counter() - t0, 2)},
    }
    if isinstance(strategy, FedMD) and strategy.transfer is not None:
        result["transfer_learning"] = strategy.transfer.to_dict()
    if cfg.local_only_baseline:
        result["seconds"]["local_only_baseline"] = round(baseline_seconds, 2)
    print_summary(result)
    if cfg.out_dir:
        path = write_result(cfg.out_dir, result)
        print(f"\nwrote {path} and {path.parent / 'accuracy.png'}")
    return result


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run`: the experiment described by the app's run config."""
    run_experiment(grid, ExperimentConfig.from_run_config(dict(context.run_config)))
