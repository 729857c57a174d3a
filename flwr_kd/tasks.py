"""Server-side units of work, one per architecture, run by a fan-out executor.

Each task is a small picklable dataclass and a module-level function, so the same task runs
in-process, in a worker process, or inside an aggregator Cloud Function. A task carries the
run's `device` and `autocast` as plain strings and resolves them where it runs
(`flwr_kd.devices`): a fan-out worker may have a GPU of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from flwr_kd.configs import DeviceConfig
from flwr_kd.distill import DistillConfig, DistillReport, average_logits, distill
from flwr_kd.models import ModelSpec, create_model, load_numpy_state, state_to_numpy
from flwr_kd.records import State
from flwr_kd.training import evaluate, predict_logits, train_supervised


@dataclass(kw_only=True)
class OnDevice:
    """Where a task runs: the run's `DeviceConfig` as two plain strings (picklable, and JSON
    for the cloud fan-out), resolved by whichever process runs the task."""

    device: str = DeviceConfig.device
    autocast: str = DeviceConfig.autocast

    @property
    def device_config(self) -> DeviceConfig:
        return DeviceConfig(self.device, self.autocast)


@dataclass
class DistillTask(OnDevice):
    """Distil one architecture's FedAvg model towards the ensemble on public data.

    The teacher is `teacher_logits` (sent by the clients: flwr-kd's way), or, when that is
    None, the average of `teacher_models`' logits computed here: the seed system's way, where
    every aggregator re-evaluates all client models.
    """

    arch: str
    model_spec: ModelSpec
    state: State
    x: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    config: DistillConfig
    teacher_logits: np.ndarray | None = None
    teacher_models: list[tuple[str, State]] = field(default_factory=list)
    seed: int = 0


@dataclass
class DistillOutcome:
    arch: str
    state: State
    report: DistillReport
    teacher_seconds: float
    distill_seconds: float


def teacher_from_models(
    models: list[tuple[str, State]],
    spec: ModelSpec,
    x: np.ndarray,
    device: DeviceConfig | None = None,
) -> np.ndarray:
    """Average logits of several (architecture, weights) models on x."""
    logits = []
    for arch, state in models:
        model = create_model(arch, spec)
        load_numpy_state(model, state)
        logits.append(predict_logits(model, x, device))
    return average_logits(logits)


def run_distill_task(task: DistillTask) -> DistillOutcome:
    t0 = time.perf_counter()
    device = task.device_config
    teacher = task.teacher_logits
    if teacher is None:
        teacher = teacher_from_models(task.teacher_models, task.model_spec, task.x, device)
    t1 = time.perf_counter()
    model = create_model(task.arch, task.model_spec)
    load_numpy_state(model, task.state)
    report = distill(model, task.x, teacher, task.val_x, task.val_y, task.config, task.seed, device)
    return DistillOutcome(
        task.arch, state_to_numpy(model), report, t1 - t0, time.perf_counter() - t1
    )


@dataclass
class LocalTrainTask(OnDevice):
    """Train one architecture from scratch on one labelled set; evaluate it on the test set.

    Used for the local-only baseline (one client's private data alone) and for transfer
    learning on public data.
    """

    arch: str
    model_spec: ModelSpec
    x: np.ndarray
    y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    epochs: int
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    init_state: State | None = None
    return_state: bool = False
    test_classes: int = 0  # score only the leading outputs (the test task's classes); 0: all


@dataclass
class LocalTrainOutcome:
    arch: str
    accuracy: float
    seconds: float
    state: State | None


def run_local_train_task(task: LocalTrainTask) -> LocalTrainOutcome:
    t0 = time.perf_counter()
    device = task.device_config
    if task.init_state is None:
        torch.manual_seed(task.seed)  # the initial weights, too, are the seed's
    model = create_model(task.arch, task.model_spec)
    if task.init_state is not None:
        load_numpy_state(model, task.init_state)
    train_supervised(
        model,
        task.x,
        task.y,
        epochs=task.epochs,
        batch_size=task.batch_size,
        lr=task.lr,
        seed=task.seed,
        device=device,
    )
    _, acc = evaluate(model, task.test_x, task.test_y, device, task.test_classes)
    state = state_to_numpy(model) if task.return_state else None
    return LocalTrainOutcome(task.arch, acc, time.perf_counter() - t0, state)
