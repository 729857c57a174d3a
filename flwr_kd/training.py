"""Supervised training, evaluation and logits of one model on numpy arrays (CPU-friendly)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

EVAL_BATCH = 512


def batches(n: int, batch_size: int, rng: np.random.Generator | None):
    """Index batches over n samples (shuffled when rng is given); no batch of one sample,
    which BatchNorm cannot train on."""
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
) -> float:
    """Cross-entropy training with Adam; returns the mean loss of the last epoch."""
    if len(x) == 0 or epochs <= 0:
        return float("nan")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    last = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in batches(len(x), batch_size, rng):
            if len(idx) < 2:  # a lone sample cannot pass BatchNorm in train mode
                continue
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        last = total / count if count else float("nan")
    return last


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """float32 logits of `model` on x, in eval mode."""
    model.eval()
    xt = torch.from_numpy(x)
    outs = [model(xt[idx]).float() for idx in batches(len(x), EVAL_BATCH, None)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


def evaluate(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) on labelled data."""
    if len(x) == 0:
        return float("nan"), float("nan")
    logits = torch.from_numpy(predict_logits(model, x))
    yt = torch.from_numpy(y)
    return float(F.cross_entropy(logits, yt)), float((logits.argmax(1) == yt).float().mean())
