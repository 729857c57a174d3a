"""Supervised training, evaluation and logits of one model on numpy arrays.

Each function takes an optional `device` (`flwr_kd.configs.DeviceConfig`): the model moves
there and batches follow one at a time (`flwr_kd.devices`); without one, the call runs where
the model already is. Inputs and results stay numpy on the host.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from flwr_kd.configs import DeviceConfig
from flwr_kd.devices import record_phase, run_on

EVAL_BATCH = 512


def batches(n: int, batch_size: int, rng: np.random.Generator | None):
    """Index batches over n samples, shuffled when rng is given. Training skips a trailing
    batch of one sample, which BatchNorm cannot train on."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) == 1 and n > 1 and rng is not None:
            continue
        yield idx


def train_supervised(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    on_epoch_end: Callable[[int], bool] | None = None,
    device: DeviceConfig | None = None,
) -> float:
    """Cross-entropy training with Adam; returns the mean loss of the last epoch.
    `on_epoch_end(epoch)` may return True to stop early."""
    if len(x) < 2 or epochs <= 0:
        return float("nan")
    on, started, seen = run_on(model, device), time.perf_counter(), 0
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    step = on.stepper(on.adam(model, lr))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    last = float("nan")
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        for idx in batches(len(x), batch_size, rng):
            with on.autocast():
                loss = F.cross_entropy(model(on.put(xt[idx])), on.put(yt[idx]))
            step(loss)
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        last, seen = (total / count if count else float("nan")), seen + count
        if on_epoch_end is not None and on_epoch_end(epoch):
            break
    record_phase("training", model, seen, started)
    return last


def train_with_early_stopping(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    holdout_x: np.ndarray,
    holdout_y: np.ndarray,
    *,
    max_epochs: int,
    patience: int = 3,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: DeviceConfig | None = None,
) -> tuple[int, float]:
    """Train up to `max_epochs`, keeping the weights with the best held-out accuracy (the
    starting weights included); stop after `patience` epochs without improvement.
    Returns (best epoch, best held-out accuracy). Without held-out data it trains all epochs."""
    train = {"batch_size": batch_size, "lr": lr, "seed": seed, "device": device}
    if len(holdout_x) == 0:
        train_supervised(model, x, y, epochs=max_epochs, **train)
        return max_epochs, float("nan")
    best = {
        "epoch": 0,
        "acc": evaluate(model, holdout_x, holdout_y, device)[1],
        "state": copy.deepcopy(model.state_dict()),
    }

    def check(epoch: int) -> bool:
        acc = evaluate(model, holdout_x, holdout_y, device)[1]
        if acc > best["acc"]:
            best.update(epoch=epoch, acc=acc, state=copy.deepcopy(model.state_dict()))
        return epoch - best["epoch"] >= patience

    train_supervised(model, x, y, epochs=max_epochs, on_epoch_end=check, **train)
    model.load_state_dict(best["state"])
    return best["epoch"], best["acc"]


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    x: np.ndarray,
    device: DeviceConfig | None = None,
    phase: str = "logits",
) -> np.ndarray:
    """float32 logits of `model` on x, in eval mode, as numpy on the host. `phase` names the
    call in the phase log (`flwr_kd.devices.record_phase`)."""
    on, started = run_on(model, device), time.perf_counter()
    model.eval()
    xt = torch.from_numpy(x)
    outs = []
    for idx in batches(len(x), EVAL_BATCH, None):
        with on.autocast():
            outs.append(model(on.put(xt[idx])).float())
    if not outs:
        return np.zeros((0, 0), np.float32)
    logits = torch.cat(outs).cpu().numpy()
    record_phase(phase, model, len(x), started)
    return logits


def evaluate(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    device: DeviceConfig | None = None,
    classes: int = 0,
) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) on labelled data; `classes` > 0 scores only the leading
    outputs (a task's own label set, when the head also covers a public task's)."""
    if len(x) == 0:
        return float("nan"), float("nan")
    logits = torch.from_numpy(predict_logits(model, x, device, phase="evaluation"))
    if classes:
        logits = logits[:, :classes]
    yt = torch.from_numpy(y)
    return float(F.cross_entropy(logits, yt)), float((logits.argmax(1) == yt).float().mean())
