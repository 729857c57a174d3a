"""The runner's seams without training anything: the strategy registry, and the wrappers that
add checkpoints and a resumed run's round numbers to any strategy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Strategy

from flwr_kd.experiment import STRATEGIES, ConfigError, ExperimentConfig
from flwr_kd.registry import STRATEGY_REGISTRY
from flwr_kd.strategy.wrappers import RoundCheckpoint, RoundOffset


class SilentGrid:
    """A grid whose nodes never answer: Flower's loop runs, the strategy sees no replies."""

    def send_and_receive(self, messages, timeout=None):
        return list(messages)


class Counting(Strategy):
    """Each round's arrays hold the round number the strategy was told; `prepare` and `close`
    are recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def prepare(self, grid, initial_arrays, train_config, timeout):
        self.calls.append("prepare")
        return initial_arrays

    def close(self) -> None:
        self.calls.append("close")

    def configure_train(self, server_round, arrays, config, grid):
        return []

    def aggregate_train(self, server_round, replies):
        self.calls.append(f"aggregate {server_round}")
        return ArrayRecord({"round": Array(np.array([server_round]))}), MetricRecord()

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self) -> None:
        pass


def _round_of(arrays: ArrayRecord) -> int:
    return int(arrays["round"].numpy()[0])


def test_checkpoint_sees_every_aggregated_round_and_never_round_0():
    inner, seen, evaluated = Counting(), [], []
    RoundCheckpoint(inner, lambda r, arrays, s: seen.append((r, _round_of(arrays), s))).start(
        SilentGrid(),
        ArrayRecord({"round": Array(np.array([0]))}),
        num_rounds=3,
        evaluate_fn=lambda r, arrays: evaluated.append(r),
    )
    assert seen == [(1, 1, inner), (2, 2, inner), (3, 3, inner)]
    assert evaluated == [0, 1, 2, 3]
    assert inner.calls == ["prepare", "aggregate 1", "aggregate 2", "aggregate 3", "close"]


def test_resumed_run_counts_rounds_of_the_whole_run_and_skips_preparation():
    """`RoundOffset(RoundCheckpoint(...), 2)`: rounds 3-4 of the run, from the restored arrays;
    the restored round 2 is evaluated (round 0 of the loop) but not checkpointed again."""
    inner, seen, evaluated = Counting(), [], []
    runner = RoundOffset(
        RoundCheckpoint(inner, lambda r, arrays, s: seen.append((r, _round_of(arrays)))), 2
    )
    result = runner.start(
        SilentGrid(),
        ArrayRecord({"round": Array(np.array([2]))}),
        num_rounds=2,
        evaluate_fn=lambda r, arrays: evaluated.append((r, _round_of(arrays))),
    )
    assert seen == [(3, 3), (4, 4)]
    assert evaluated == [(2, 2), (3, 3), (4, 4)]
    assert inner.calls == ["aggregate 3", "aggregate 4", "close"]
    assert _round_of(result.arrays) == 4


def test_the_config_accepts_exactly_the_registered_strategies():
    assert list(STRATEGIES) == list(STRATEGY_REGISTRY) == ["feddf", "fedmd", "fedavg"]
    with pytest.raises(ConfigError, match="choose one of feddf, fedmd, fedavg"):
        ExperimentConfig(strategy="fedprox").validate()


def test_run_experiment_checkpoints_rounds_and_writes_the_runtimes_report(
    tmp_path, server_task_identity
):
    """What the serverless driver relies on: `on_round_end` per aggregated round with the
    strategy, and `report`'s sections in the returned and the written result."""
    from flwr.clientapp import ClientApp
    from inprocess_grid import InProcessGrid

    from flwr_kd.client import KDClient
    from flwr_kd.runner import RuntimeHooks, run_experiment

    cfg = ExperimentConfig.from_run_config(
        {
            "strategy": "fedavg",
            "num-clients": 2,
            "num-server-rounds": 2,
            "archs": "test_vit",
            "local-epochs": 1,
            "max-private": 40,
            "max-test": 40,
            "fanout": "serial",
            "local-only-baseline": False,
            "out-dir": str(tmp_path / "out"),
        }
    )
    checkpoints = []
    hooks = RuntimeHooks(
        on_round_end=lambda r, arrays, strategy: checkpoints.append((r, sorted(strategy.stats))),
        report=lambda result: {"runtime": {"rounds": len(result["rounds"])}},
    )
    returned = run_experiment(InProcessGrid(KDClient().register(ClientApp()), 2), cfg, hooks)
    assert checkpoints == [(1, [1]), (2, [1, 2])]
    written = json.loads((tmp_path / "out" / "result.json").read_text())
    assert written == json.loads(json.dumps(returned))
    assert written["runtime"] == {"rounds": 2}
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 0
