"""Knowledge-distillation core: the loss, the teacher ensemble and the distillation loop.

FedDF distils every architecture's FedAvg model towards the averaged logits of all clients on
unlabelled public data (Lin et al. 2020): KL divergence at temperature T, Adam with a cosine
schedule and a step budget. A small labelled validation set guards the result: by default the
distilled weights are refused only when they are significantly worse than the starting ones
(`DistillConfig.selection`; the paper's early stopping is "best").
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from flwr_kd.configs import SELECTIONS, DeviceConfig, DistillConfig, FedMDRoundConfig
from flwr_kd.devices import record_phase, run_on
from flwr_kd.training import batches, predict_logits


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    per_sample: bool = False,
) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened distributions, scaled by T^2 so that
    gradients keep their magnitude across temperatures (Hinton et al. 2015): the batch's mean,
    or with `per_sample` one value per row."""
    t = temperature
    divergence = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="none" if per_sample else "batchmean",
        log_target=True,
    )
    return (divergence.sum(dim=1) if per_sample else divergence) * t * t


def average_logits(logits: list[np.ndarray], weights: list[float] | None = None) -> np.ndarray:
    """The ensemble teacher: the (weighted) mean of several models' logits, in float32."""
    if not logits:
        raise ValueError("no logits to average")
    stacked = np.stack([np.asarray(a, dtype=np.float32) for a in logits])
    w = np.ones(len(logits), np.float32) if weights is None else np.asarray(weights, np.float32)
    if w.shape != (len(logits),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be one non-negative value per logits array, not all 0")
    return np.tensordot(w / w.sum(), stacked, axes=1).astype(np.float32)


def digest_loss(
    out: torch.Tensor,
    target: torch.Tensor,
    loss: str,
    temperature: float,
    labels: torch.Tensor | None = None,
    label_weight: float = 0.0,
) -> torch.Tensor:
    """FedMD's digest loss on one batch: `mae` (L1 on logits) or `kl` (`kd_loss`) towards the
    consensus. On the samples whose label is known (`labels` >= 0) it is, with `label_weight`
    w, (1 - w) of that plus w of cross-entropy on the label; elsewhere the consensus alone."""
    known = labels >= 0 if labels is not None and label_weight else None
    if known is None or not bool(known.any()):
        return F.l1_loss(out, target) if loss == "mae" else kd_loss(out, target, temperature)
    if loss == "mae":
        per_sample = (out - target).abs().mean(dim=1)
    else:
        per_sample = kd_loss(out, target, temperature, per_sample=True)
    hard = F.cross_entropy(out, labels.clamp(min=0), reduction="none")
    share = label_weight * known.to(out.dtype)
    return ((1 - share) * per_sample + share * hard).mean()


def center_per_class(logits: np.ndarray) -> np.ndarray:
    """`logits` (samples x classes) less each class's mean over the samples: how the samples
    differ stays, a class's constant lean across all of them goes."""
    logits = np.asarray(logits, np.float32)
    return logits - logits.mean(axis=0, keepdims=True)


#: One-sided z of the guard's test (5%): distillation's result is refused only when it got
#: significantly more validation samples wrong than the starting model.
GUARD_Z = 1.645


@dataclass(frozen=True)
class DistillReport:
    steps_run: int
    best_step: int  # the step whose weights were handed back (0: the starting weights)
    initial_val_accuracy: float
    best_val_accuracy: float  # of the weights handed back (nan with selection "last")
    validation_seconds: float = 0.0  # of the distillation's time, spent on validation


def regressed(correct_before: np.ndarray, correct_after: np.ndarray, z: float = GUARD_Z) -> bool:
    """Whether the model got significantly worse on the same samples: a one-sided McNemar
    (sign) test on the samples only one of the two models gets right."""
    lost = int(np.sum(correct_before & ~correct_after))
    gained = int(np.sum(~correct_before & correct_after))
    return lost - gained > z * float(np.sqrt(lost + gained))


class _Validator:
    """Scores the model on the validation set and keeps the time it took."""

    def __init__(self, model, val_x, val_y, device) -> None:
        self.model, self.x, self.y, self.device, self.seconds = model, val_x, val_y, device, 0.0

    def correct(self) -> np.ndarray:
        t = time.perf_counter()
        logits = predict_logits(self.model, self.x, self.device, phase="evaluation")
        self.seconds += time.perf_counter() - t
        return logits.argmax(1) == self.y


def distill(
    model: torch.nn.Module,
    x: np.ndarray,
    teacher_logits: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    config: DistillConfig,
    seed: int = 0,
    device: DeviceConfig | None = None,
) -> DistillReport:
    """Distil `model` in place towards `teacher_logits` on `x`, then hand back the weights
    `config.selection` picks. `device`: where (`flwr_kd.devices`); None: where the model is."""
    if len(x) != len(teacher_logits):
        raise ValueError(f"{len(x)} inputs but {len(teacher_logits)} teacher logits")
    if config.selection not in SELECTIONS:
        raise ValueError(f"distill selection must be one of {SELECTIONS}, got '{config.selection}'")
    on, started = run_on(model, device), time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = on.adam(model, config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config.steps))
    update = on.stepper(opt)
    if config.center_teacher:
        teacher_logits = center_per_class(teacher_logits)
    xt, tt = torch.from_numpy(x), torch.from_numpy(np.asarray(teacher_logits, np.float32))
    validate = _Validator(model, val_x, val_y, device)
    validating = config.selection != "last" and len(val_x) > 0
    start_correct = validate.correct() if validating else np.zeros(0, bool)
    initial_acc = float(start_correct.mean()) if validating else float("nan")
    best = {"acc": initial_acc, "step": 0, "state": copy.deepcopy(model.state_dict())}
    bs = min(config.batch_size, len(x))
    step = 0
    while step < config.steps:
        model.train()
        idx = torch.from_numpy(rng.choice(len(x), size=bs, replace=False))
        with on.autocast():
            loss = kd_loss(model(on.put(xt[idx])), on.put(tt[idx]), config.temperature)
        update(loss)
        sched.step()
        step += 1
        if (
            validating
            and config.selection == "best"
            and (step % config.eval_every == 0 or step == config.steps)
        ):
            acc = float(validate.correct().mean())
            if acc > best["acc"]:
                best.update(acc=acc, step=step, state=copy.deepcopy(model.state_dict()))
            elif step - best["step"] >= config.patience:
                break
    if config.selection == "last" or not validating:
        best.update(step=step, acc=float("nan") if not validating else best["acc"])
    elif config.selection == "guard":
        after = validate.correct()
        if not regressed(start_correct, after):
            best.update(acc=float(after.mean()), step=step, state=None)
    if best["state"] is not None and best["step"] != step:
        model.load_state_dict(best["state"])
    record_phase("distillation", model, step * bs, started)
    return DistillReport(step, best["step"], initial_acc, best["acc"], validate.seconds)


DIGEST_LOSSES = ("mae", "kl")


def digest(
    model: torch.nn.Module,
    x: np.ndarray,
    consensus: np.ndarray,
    *,
    config: FedMDRoundConfig,
    labels: np.ndarray | None = None,
    seed: int = 0,
    device: DeviceConfig | None = None,
) -> float:
    """FedMD's digest step: train `model` towards the consensus logits on public inputs, as
    the round's config says (`digest_loss`, `digest_epochs`, `digest_batch_size`, `lr`,
    `temperature`). Loss `mae` is the paper code's L1 loss on raw logits; `kl` is `kd_loss`
    at `temperature`. A consensus narrower than the model's head covers its leading outputs
    (`FedMD`'s `consensus_classes`).

    `labels` (one per input, -1 where unknown) anchor the digest to the truth: on a labelled
    input the loss is `(1 - w) * consensus loss + w * cross-entropy`, with
    `w = config.digest_label_weight` (Hinton et al. 2015's mix of soft and hard targets;
    `digest_loss`). Returns the mean loss of the last epoch."""
    loss, temperature = config.digest_loss, config.temperature
    if loss not in DIGEST_LOSSES:
        raise ValueError(f"digest loss must be one of {DIGEST_LOSSES}, got '{loss}'")
    if len(x) != len(consensus):
        raise ValueError(f"{len(x)} inputs but {len(consensus)} consensus logits")
    if labels is not None and len(labels) != len(x):
        raise ValueError(f"{len(x)} inputs but {len(labels)} labels")
    weight = config.digest_label_weight if labels is not None else 0.0
    on, started, seen = run_on(model, device), time.perf_counter(), 0
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    update = on.stepper(on.adam(model, config.lr))
    xt, ct = torch.from_numpy(x), torch.from_numpy(np.asarray(consensus, np.float32))
    yt = torch.from_numpy(np.asarray(labels, np.int64)) if weight else None
    last = float("nan")
    for _ in range(config.digest_epochs):
        model.train()
        total, count = 0.0, 0
        for idx in batches(len(x), config.digest_batch_size, rng):
            target = on.put(ct[idx])
            with on.autocast():
                out = model(on.put(xt[idx]))[:, : ct.shape[1]]  # the outputs the consensus has
                known = None if yt is None else on.put(yt[idx])
                value = digest_loss(out, target, loss, temperature, known, weight)
            update(value)
            total, count = total + float(value.detach()) * len(idx), count + len(idx)
        last, seen = total / max(count, 1), seen + count
    record_phase("digest", model, seen, started)
    return last
