"""The runner's seams without training anything: the strategy registry, and the wrappers that
add checkpoints and a resumed run's round numbers to any strategy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Strategy

from flwr_kd.configs import FedMDRoundConfig
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
    # the server's validation set: at most 10% of the 40 private samples
    assert written["server_validation"] == {"samples": 4, "private_pool": 40}
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 0


def test_the_server_validation_set_is_capped_to_a_share_of_the_private_pool():
    from flwr_kd.data import DataSpec, load_federated
    from flwr_kd.runner import cap_validation

    data = load_federated(DataSpec(dataset="digits", num_partitions=2, max_private=200))
    assert len(data.val_x) == 89  # 5% of the whole pool, taken before the private cap
    capped = cap_validation(data, ExperimentConfig().max_val_fraction)
    assert len(capped.val_x) == len(capped.val_y) == 20
    np.testing.assert_array_equal(capped.val_x, data.val_x[:20])
    np.testing.assert_array_equal(capped.val_y, data.val_y[:20])
    assert capped.public_x is data.public_x and capped.partitions is data.partitions
    assert len(cap_validation(data, 0.3).val_x) == 60
    assert cap_validation(data, 1.0) is data  # a cap above the set's size changes nothing
    cfg = ExperimentConfig.from_run_config({"max-val-fraction": 0.25})
    assert cfg.max_val_fraction == 0.25
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="max-val-fraction must lie in"):
            ExperimentConfig.from_run_config({"max-val-fraction": bad})


def test_digest_label_weight_is_a_share_between_0_and_1():
    assert ExperimentConfig().digest_label_weight == FedMDRoundConfig.digest_label_weight
    assert ExperimentConfig.from_run_config({"digest-label-weight": 1}).digest_label_weight == 1
    for bad in (-0.5, 2):
        with pytest.raises(ConfigError, match="digest-label-weight must lie in"):
            ExperimentConfig.from_run_config({"digest-label-weight": bad})


@pytest.mark.parametrize("value, centred", [(True, True), ("true", True), ("false", False)])
def test_distill_center_teacher_reaches_the_distillation_config(value, centred):
    assert ExperimentConfig().distill_config.center_teacher is False  # the paper's teacher
    cfg = ExperimentConfig.from_run_config({"distill-center-teacher": value})
    assert cfg.distill_config.center_teacher is centred


def test_a_bad_distill_center_teacher_is_refused_by_name():
    with pytest.raises(ConfigError, match="distill-center-teacher"):
        ExperimentConfig.from_run_config({"distill-center-teacher": "maybe"})


def test_the_local_only_task_is_reproducible_whatever_torch_was_seeded_with():
    import torch

    from flwr_kd.data import DataSpec, load_federated
    from flwr_kd.tasks import LocalTrainTask, run_local_train_task

    data = load_federated(DataSpec(dataset="digits", num_partitions=2, max_private=40))
    x, y, _, _ = data.client_data(0)
    task = LocalTrainTask(
        arch="test_vit",
        model_spec=data.model_spec,
        x=x,
        y=y,
        test_x=data.test_x[:20],
        test_y=data.test_y[:20],
        epochs=1,
        seed=5,
        return_state=True,
        device="cpu",
    )
    outcomes = []
    for global_seed in (1, 2):  # whatever ran before in the process
        torch.manual_seed(global_seed)
        outcomes.append(run_local_train_task(task))
    first, second = (o.state for o in outcomes)
    assert list(first) == list(second)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    assert outcomes[0].accuracy == outcomes[1].accuracy
