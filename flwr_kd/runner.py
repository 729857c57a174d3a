"""One experiment, from its config to `result.json`, on any Flower grid.

Both runtimes end here: `flwr run` and `flwr-kd simulate` through the ServerApp
(`flwr_kd.server_app`), the serverless driver with its `RuntimeHooks`. The runner knows no
strategy by name: `flwr_kd.registry` says how the one the config names is built, scored and
reported. It runs the strategy with Flower's own `start()`, measures the local-only baseline
and writes the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flwr_kd.data import FederatedData, load_federated
from flwr_kd.experiment import ExperimentConfig
from flwr_kd.export import save_models
from flwr_kd.fanout import FanOut, make_fanout
from flwr_kd.models import ModelSpec, create_model, state_to_numpy
from flwr_kd.records import pack_models
from flwr_kd.registry import STRATEGY_REGISTRY
from flwr_kd.report import RoundRecorder, publish_result
from flwr_kd.simulation_poll import install_poll_index
from flwr_kd.strategy.wrappers import RoundCheckpoint, RoundOffset
from flwr_kd.tasks import LocalTrainTask, run_local_train_task
from flwr_kd.tracking import MODELS_DIR, make_tracker


def initial_arrays(archs: list[str], spec: ModelSpec, seed: int) -> ArrayRecord:
    """Freshly initialised global models, one per architecture, seeded."""
    models = {}
    for i, arch in enumerate(archs):
        torch.manual_seed(seed * 7919 + i)
        models[arch] = state_to_numpy(create_model(arch, spec))
    return pack_models(models)


def cap_validation(data: FederatedData, max_fraction: float) -> FederatedData:
    """`data` with the server's validation set cut to at most `max_fraction` of the private
    pool's size (at least 1 sample): FedDF's early stopping must not see more labels than the
    clients hold. The split's other parts are unchanged."""
    n = max(1, int(max_fraction * len(data.private_x)))
    if n >= len(data.val_x):
        return data
    return dataclasses.replace(data, val_x=data.val_x[:n], val_y=data.val_y[:n])


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
                test_classes=data.task_classes,
                epochs=cfg.local_budget_epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                seed=cfg.seed * 1000 + pid,
                **cfg.device_config.to_config(),
            )
        )
    outcomes = fanout.map_with_progress(run_local_train_task, tasks, "local-only baseline")
    return {
        arch: round(float(np.mean([o.accuracy for o in outcomes if o.arch == arch])), 4)
        for arch in cfg.arch_list
        if any(o.arch == arch for o in outcomes)
    }


@dataclass
class RuntimeHooks:
    """What a runtime adds to an experiment; the serverless driver brings its own fan-out,
    client-state location, per-round records, report section and, on resume, the restored
    arrays.

    on_round_end(round, arrays, strategy): once per aggregated round (never round 0, never a
        restored round), with the round number of the whole run and the new global arrays.
    on_round_scored(row): after each evaluation, with the report's score row of that round.
    report(result) -> extra top-level sections of the result, merged in before it is printed
        and written.
    """

    fanout: FanOut | None = None
    state_uri: str | None = None
    resume_arrays: ArrayRecord | None = None
    rounds_done: int = 0
    on_round_end: Callable[[int, ArrayRecord, Strategy], None] | None = None
    on_round_scored: Callable[[dict], None] | None = None
    report: Callable[[dict], dict] | None = None


def with_runtime(strategy: Strategy, hooks: RuntimeHooks) -> Strategy:
    """The strategy wrapped for checkpoints and a resumed run's round numbers, as needed."""
    if hooks.on_round_end is not None:
        strategy = RoundCheckpoint(strategy, hooks.on_round_end)
    if hooks.rounds_done:
        strategy = RoundOffset(strategy, hooks.rounds_done)
    return strategy


def run_experiment(grid: Grid, cfg: ExperimentConfig, hooks: RuntimeHooks | None = None) -> dict:
    """Run one experiment on `grid`; returns the result, also written to cfg.out_dir if set
    (with the final models, when the strategy has global ones) and sent to the tracker that
    `cfg.track` names."""
    hooks = hooks or RuntimeHooks()
    if cfg.poll_index:
        install_poll_index(grid)  # a no-op outside Flower's simulation
    entry = STRATEGY_REGISTRY[cfg.strategy]
    run_name = Path(cfg.out_dir).name if cfg.out_dir else cfg.strategy
    tracker = make_tracker(cfg.track, cfg.out_dir, run_name)  # before any work: fails fast
    with tracker or contextlib.nullcontext():  # the tracked run ends FAILED if this raises
        if tracker is not None:
            tracker.log_config(cfg.to_run_config())
        data = cap_validation(load_federated(cfg.data_spec), cfg.max_val_fraction)
        result, final_arrays = _run(grid, cfg, hooks, entry, data)
        publish_result(result, cfg.out_dir)
        if cfg.out_dir and entry.global_models and result["rounds"]:
            save_models(
                final_arrays,
                data.model_spec,
                Path(cfg.out_dir) / MODELS_DIR,
                metadata={"test_accuracy": result["rounds"][-1]["accuracy"]},
            )
        if tracker is not None:
            tracker.log_result(result)
            if cfg.out_dir:
                tracker.log_artifacts(cfg.out_dir)
    return result


def _run(
    grid: Grid, cfg: ExperimentConfig, hooks: RuntimeHooks, entry, data: FederatedData
) -> tuple[dict, ArrayRecord]:
    """The strategy's rounds and the baselines: the result dict and the final global arrays."""
    t0 = time.perf_counter()
    seconds = {}
    with contextlib.ExitStack() as stack:
        fanout = hooks.fanout or stack.enter_context(make_fanout(cfg.fanout))
        state_uri = hooks.state_uri or "file://" + stack.enter_context(
            tempfile.TemporaryDirectory(prefix="flwr-kd-clients-")
        )
        strategy = entry.build(cfg, data, fanout, state_uri)
        recorder = RoundRecorder(cfg.arch_list, entry.score(strategy, cfg, data))
        recorder.header(f"{cfg.strategy} on {cfg.dataset}: test accuracy per architecture")
        if hooks.rounds_done:
            start_arrays = hooks.resume_arrays
        else:
            start_arrays = initial_arrays(cfg.arch_list, data.model_spec, cfg.seed)
        flower_result = with_runtime(strategy, hooks).start(
            grid=grid,
            initial_arrays=start_arrays,
            num_rounds=cfg.num_server_rounds - hooks.rounds_done,
            train_config=ConfigRecord(cfg.client_config()),
            evaluate_config=ConfigRecord(cfg.client_config()),
            evaluate_fn=scored(recorder, hooks.on_round_scored),
            **({"timeout": cfg.round_timeout} if cfg.round_timeout else {}),
        )
        sections = entry.report(strategy, recorder.rounds[0], bool(hooks.rounds_done))
        baselines = sections.pop("baselines", {})
        if cfg.local_only_baseline:
            log(INFO, "Local-only baseline")
            t_base = time.perf_counter()
            baselines["local_only"] = local_only_baseline(cfg, data, fanout)
            seconds["local_only_baseline"] = round(time.perf_counter() - t_base, 2)
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
        "rounds": round_rows(recorder.rounds[1:], strategy, flower_result, hooks.rounds_done),
        "baselines": baselines,
        "server_validation": {"samples": len(data.val_x), "private_pool": len(data.private_x)},
        "seconds": {"total": round(time.perf_counter() - t0, 2), **seconds},
        **sections,
    }
    if hooks.report is not None:
        result.update(hooks.report(result))
    return result, flower_result.arrays


def scored(recorder: RoundRecorder, on_round_scored: Callable[[dict], None] | None):
    """The recorder as evaluate_fn, handing each new score row to `on_round_scored`."""
    if on_round_scored is None:
        return recorder

    def evaluate(server_round: int, arrays: ArrayRecord):
        metrics = recorder(server_round, arrays)
        on_round_scored(recorder.rounds[-1])
        return metrics

    return evaluate


def round_rows(
    recorded: list[dict], strategy: Strategy, flower_result: Result, rounds_done: int
) -> list[dict]:
    """The report's row per round: the recorder's scores and timing, the strategy's round
    statistics and, if clients evaluated, their accuracy."""
    rows = []
    for row in recorded:
        r = row["round"]
        stats = strategy.stats[r].to_dict() if r in strategy.stats else {}
        client_eval = flower_result.evaluate_metrics_clientapp.get(r - rounds_done)
        rows.append(
            {
                **row,
                "bytes": stats.get("bytes", {}),
                "time": stats.get("seconds", {}),
                "replies": stats.get("replies", 0),
                "dropped": stats.get("dropped", []),
                "distill": stats.get("distill", {}),
                "client_compute": stats.get("client_compute", []),
                "logits_clipped": stats.get("logits_clipped", 0),
                **({"client_accuracy": dict(client_eval)} if client_eval else {}),
            }
        )
    return rows
