"""The distillation core: loss, ensemble teacher, and the distillation loop with each way of
picking the weights it hands back (guard, early stopping, plain)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flwr_kd.distill import (
    DistillConfig,
    average_logits,
    center_per_class,
    distill,
    kd_loss,
    regressed,
)
from flwr_kd.models import create_model
from flwr_kd.training import evaluate, train_supervised

# ---------------------------------------------------------------------------- kd_loss


def _reference_kd(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over the batch, by hand."""
    log_p_teacher = torch.log_softmax(teacher / t, dim=1)
    log_p_student = torch.log_softmax(student / t, dim=1)
    kl_per_sample = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl_per_sample.sum() / student.shape[0] * t * t


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 10.0])
def test_kd_loss_equals_hand_computed_kl(temperature):
    g = torch.Generator().manual_seed(int(temperature * 10))
    student = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    got = kd_loss(student, teacher, temperature)
    want = _reference_kd(student, teacher, temperature)
    assert got.shape == ()
    assert got.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_kd_loss_is_zero_for_identical_logits_and_invariant_to_shifts():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    assert kd_loss(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    # softmax ignores a per-row constant: the teacher shifted by 5 is the same distribution
    assert kd_loss(logits, logits + 5.0, 2.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_loss_gradient_flows_to_student_only_and_matches_analytic(temperature):
    g = torch.Generator().manual_seed(2)
    student = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 4, generator=g, dtype=torch.float64)
    kd_loss(student, teacher, temperature).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    # d/ds [T^2 * KL(p_t || softmax(s/T))] / B = T * (softmax(s/T) - p_t) / B
    expected = (
        temperature
        * (
            torch.softmax(student.detach() / temperature, 1)
            - torch.softmax(teacher / temperature, 1)
        )
        / student.shape[0]
    )
    torch.testing.assert_close(student.grad, expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- average_logits


def _logits(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(n)]


def test_average_logits_unweighted_is_the_mean():
    arrays = _logits(4)
    got = average_logits(arrays)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.mean(np.stack(arrays), axis=0), rtol=1e-6, atol=1e-6)


def test_average_logits_weighted_matches_numpy_average():
    arrays = _logits(3, seed=1)
    weights = [1.0, 3.0, 0.0]
    got = average_logits(arrays, weights)
    np.testing.assert_allclose(
        got, np.average(np.stack(arrays), axis=0, weights=weights), rtol=1e-6, atol=1e-6
    )
    # the zero-weight model has no influence
    np.testing.assert_allclose(got, (arrays[0] + 3 * arrays[1]) / 4, rtol=1e-6, atol=1e-6)


def test_average_logits_accepts_float16_and_returns_float32():
    arrays = [a.astype(np.float16) for a in _logits(2, seed=2)]
    got = average_logits(arrays)
    assert got.dtype == np.float32
    want = (arrays[0].astype(np.float32) + arrays[1].astype(np.float32)) / 2
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_average_logits_rejects_empty_list():
    with pytest.raises(ValueError, match="no logits"):
        average_logits([])


@pytest.mark.parametrize(
    "weights",
    [[1.0], [1.0, 2.0, 3.0], [1.0, -1.0], [0.0, 0.0], [[1.0, 1.0]]],
    ids=["too-few", "too-many", "negative", "all-zero", "wrong-shape"],
)
def test_average_logits_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="weights"):
        average_logits(_logits(2), weights)


# ---------------------------------------------------------------------------- distill


def _one_hot_logits(labels: np.ndarray, num_classes: int, scale: float) -> np.ndarray:
    return (np.eye(num_classes, dtype=np.float32)[labels] * scale).astype(np.float32)


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("n_teacher", "config", "match"),
    [
        (9, DistillConfig(steps=1), "10 inputs but 9 teacher logits"),
        (10, DistillConfig(steps=1, selection="first"), "selection must be one of"),
    ],
)
def test_distill_refuses_bad_input(digits, n_teacher, config, match):
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    with pytest.raises(ValueError, match=match):
        teacher = np.zeros((n_teacher, 10), np.float32)
        distill(model, digits.public_x[:10], teacher, digits.val_x, digits.val_y, config)


def _perfect_model(digits):
    """A small model that gets all of its 128 validation samples right, and its weights."""
    x, y = digits.public_x[:128], digits.public_y[:128]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(256, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10)
    )
    for epoch in range(40):
        train_supervised(model, x, y, epochs=1, batch_size=32, lr=1e-2, seed=epoch)
        if evaluate(model, x, y)[1] == 1.0:
            break
    assert evaluate(model, x, y)[1] == 1.0, "precondition: the model fits its validation set"
    return model, x, y, {k: v.clone() for k, v in model.state_dict().items()}


def test_early_stopping_restores_initial_weights_when_teacher_only_hurts(digits):
    """A model already perfect on validation, distilled towards wrong labels: every step makes
    it worse, so early stopping (selection "best") must stop after `patience` steps and hand
    back the very starting weights (BatchNorm buffers included)."""
    model, x, y, initial = _perfect_model(digits)
    wrong_teacher = _one_hot_logits((y + 1) % 10, 10, scale=10.0)
    config = DistillConfig(
        steps=200, batch_size=64, lr=1e-2, selection="best", eval_every=5, patience=20
    )
    report = distill(model, x, wrong_teacher, x, y, config, seed=0)

    assert report.best_step == 0
    assert report.steps_run == 20  # stopped by patience, far before the 200-step budget
    assert report.initial_val_accuracy == report.best_val_accuracy == 1.0
    assert _states_equal(model.state_dict(), initial)
    assert evaluate(model, x, y)[1] == 1.0


def test_distill_towards_good_teacher_improves_validation_accuracy(digits):
    torch.manual_seed(0)
    model = create_model("resnet10t", digits.model_spec)
    teacher = _one_hot_logits(digits.public_y, digits.model_spec.num_classes, scale=5.0)
    config = DistillConfig(
        steps=60, batch_size=64, lr=1e-3, selection="best", eval_every=10, patience=1000
    )
    report = distill(model, digits.public_x, teacher, digits.val_x, digits.val_y, config, seed=0)

    assert report.steps_run == 60
    assert report.best_step > 0
    assert report.initial_val_accuracy < 0.3  # an untrained model guesses
    assert report.best_val_accuracy > report.initial_val_accuracy + 0.3
    # the model handed back is the best one seen
    assert evaluate(model, digits.val_x, digits.val_y)[1] == pytest.approx(report.best_val_accuracy)


def test_guard_refuses_distillation_that_hurts_and_plain_keeps_it(digits):
    """The default guard runs every step, then hands back the starting weights when the
    distilled ones get significantly more validation samples wrong; plain FedDF ("last") keeps
    whatever the steps made, without looking at validation."""
    wrong_teacher = None
    for selection in ("guard", "last"):
        model, x, y, initial = _perfect_model(digits)
        wrong_teacher = _one_hot_logits((y + 1) % 10, 10, scale=10.0)
        config = DistillConfig(steps=40, batch_size=64, lr=1e-2, selection=selection)
        report = distill(model, x, wrong_teacher, x, y, config, seed=0)
        assert report.steps_run == 40
        if selection == "guard":
            assert report.best_step == 0
            assert report.initial_val_accuracy == report.best_val_accuracy == 1.0
            assert report.validation_seconds > 0
            assert _states_equal(model.state_dict(), initial)
        else:
            assert report.best_step == 40 and np.isnan(report.initial_val_accuracy)
            assert report.validation_seconds == 0
            assert evaluate(model, x, y)[1] < 0.5  # the wrong teacher's damage is kept


def test_guard_keeps_distillation_that_helps(digits):
    torch.manual_seed(0)
    model = create_model("resnet10t", digits.model_spec)
    teacher = _one_hot_logits(digits.public_y, digits.model_spec.num_classes, scale=5.0)
    config = DistillConfig(steps=60, batch_size=64, lr=1e-3)  # the default selection: guard
    report = distill(model, digits.public_x, teacher, digits.val_x, digits.val_y, config, seed=0)
    assert (report.steps_run, report.best_step) == (60, 60)
    assert report.best_val_accuracy > report.initial_val_accuracy + 0.3
    assert evaluate(model, digits.val_x, digits.val_y)[1] == pytest.approx(report.best_val_accuracy)


def test_center_per_class_removes_each_class_lean_and_keeps_sample_differences():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4)).astype(np.float32)
    centred = center_per_class(logits + np.array([9.0, -30.0, 0.0, 2.0], np.float32))
    np.testing.assert_allclose(centred.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(centred - centred[0], logits - logits[0], atol=1e-5)
    assert center_per_class(logits.astype(np.float16)).dtype == np.float32  # the wire's dtype


def test_a_centred_teacher_teaches_the_classes_a_leaning_one_hides(digits):
    """A teacher whose every sample leans to class 0 (as an average of label-skewed clients
    leans to the classes most of them hold) teaches class 0; centred per class, it teaches
    the labels its samples differ by."""
    labels = digits.public_y
    leaning = _one_hot_logits(labels, 10, scale=5.0) + np.eye(10, dtype=np.float32)[0] * 8.0
    assert (leaning.argmax(1) == 0).all()
    accuracy = {}
    for center in (False, True):
        torch.manual_seed(0)
        model = create_model("resnet10t", digits.model_spec)
        config = DistillConfig(steps=60, batch_size=64, selection="last", center_teacher=center)
        distill(model, digits.public_x, leaning, digits.val_x, digits.val_y, config, seed=0)
        accuracy[center] = evaluate(model, digits.val_x, digits.val_y)[1]
    assert accuracy[False] < 0.3
    assert accuracy[True] > 0.6


def test_regressed_is_a_one_sided_sign_test_on_disagreements():
    right = np.ones(100, bool)
    assert not regressed(right, right)  # no disagreement: nothing to refuse
    worse = right.copy()
    worse[:2] = False
    assert not regressed(right, worse)  # 2 lost, 0 gained: 2 < 1.645 * sqrt(2)
    worse[:3] = False
    assert regressed(right, worse)  # 3 lost: 3 > 1.645 * sqrt(3)
    before, after = right.copy(), right.copy()
    before[:6], after[6:16] = False, False  # 6 gained, 10 lost: a net 4 of 16 disagreements
    assert not regressed(before, after)  # 4 < 1.645 * sqrt(16): noise, not a regression


def test_a_task_scores_and_digests_only_its_own_leading_outputs(digits):
    """With a public task's classes after the private ones, test accuracy looks only at the
    private task's outputs, and a consensus over those outputs trains only them."""
    from flwr_kd.configs import FedMDRoundConfig
    from flwr_kd.distill import digest

    x, y = digits.test_x[:64], digits.test_y[:64] % 5  # a 5-class task
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    with torch.no_grad():
        model[1].bias[5:] = 100.0  # the public task's outputs win every argmax over all 10
    assert evaluate(model, x, y)[1] == 0.0
    assert evaluate(model, x, y, classes=5)[1] == pytest.approx(
        float((model(torch.from_numpy(x))[:, :5].argmax(1).numpy() == y).mean())
    )
    before = model[1].bias.detach().clone()
    consensus = _one_hot_logits(y, 5, scale=5.0)
    config = FedMDRoundConfig(phase="round", subset_round=1, state_uri="x", digest_epochs=2)
    digest(model, x, consensus, config=config, seed=0)
    after = model[1].bias.detach()
    assert torch.equal(after[5:], before[5:])  # the public task's outputs got no gradient
    assert not torch.equal(after[:5], before[:5])


def test_the_digest_mixes_in_the_public_labels_it_is_given(digits):
    """With `digest_label_weight`, the digest's loss is part cross-entropy on the labelled
    inputs: a wrong consensus is overruled by the labels, and inputs labelled -1 (not among
    the consensus's classes) contribute nothing."""
    from flwr_kd.configs import FedMDRoundConfig
    from flwr_kd.distill import digest

    x, y = digits.public_x[:256], digits.public_y[:256]
    wrong = _one_hot_logits((y + 1) % 10, 10, scale=5.0)  # a consensus that is always wrong

    def digested(weight: float, labels: np.ndarray | None) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
        config = FedMDRoundConfig(
            phase="round", subset_round=1, state_uri="x", digest_epochs=20,
            digest_label_weight=weight,
        )  # fmt: skip
        digest(model, x, wrong, config=config, labels=labels, seed=0)
        return model

    def accuracy(model: nn.Module) -> float:
        return evaluate(model, x, y)[1]

    assert accuracy(digested(0.0, y)) < 0.1  # weight 0: the consensus alone, labels unused
    assert accuracy(digested(0.9, None)) < 0.1  # no labels sent: the consensus alone
    assert accuracy(digested(0.9, y)) > 0.9  # the labels outweigh the wrong consensus

    unknown = np.full(len(y), -1)  # no label among the consensus's classes: the paper's digest
    assert _states_equal(digested(0.9, unknown).state_dict(), digested(0.0, y).state_dict())
    with pytest.raises(ValueError, match="256 inputs but 3 labels"):
        digest(digested(0.0, None), x, wrong, config=FedMDRoundConfig(), labels=y[:3])


@pytest.mark.parametrize("loss", ["kl", "mae"])
def test_digest_loss_mixes_labels_in_only_where_they_are_known(loss):
    from flwr_kd.distill import digest_loss

    torch.manual_seed(0)
    out, target = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, -1, 3, -1, 2, 1])
    plain = digest_loss(out, target, loss, 2.0)
    assert plain == (F.l1_loss(out, target) if loss == "mae" else kd_loss(out, target, 2.0))
    per_sample = torch.stack(
        [digest_loss(out[i : i + 1], target[i : i + 1], loss, 2.0) for i in range(6)]
    )
    hard = F.cross_entropy(out, labels.clamp(min=0), reduction="none")
    share = 0.25 * (labels >= 0).float()
    expected = ((1 - share) * per_sample + share * hard).mean()
    torch.testing.assert_close(digest_loss(out, target, loss, 2.0, labels, 0.25), expected)
    assert digest_loss(out, target, loss, 2.0, torch.full((6,), -1), 0.25) == plain
    assert digest_loss(out, target, loss, 2.0, labels, 0.0) == plain
