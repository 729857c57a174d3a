"""Server-side evaluation of every architecture in the global `ArrayRecord`.

Flower's `strategy.start(..., evaluate_fn=...)` calls `evaluate_fn(server_round, arrays)` with
the global models after every round. flwr-kd's `ArrayRecord` holds one model per architecture,
so scoring it means unpacking, rebuilding and loading each one: `make_evaluate_fn` does that,
and `score_models` is the same scoring for code that wants plain numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from flwr_kd.configs import DeviceConfig
from flwr_kd.export import Models, as_state_dicts
from flwr_kd.models import ModelSpec, create_model, load_numpy_state
from flwr_kd.training import evaluate


def score_models(
    models: Models,
    x: np.ndarray,
    y: np.ndarray,
    model_spec: ModelSpec,
    archs: Sequence[str] | None = None,
    device: DeviceConfig | str = "auto",
    classes: int = 0,
) -> dict[str, tuple[float, float]]:
    """(cross-entropy loss, accuracy) of each architecture's model on `(x, y)`.

    Parameters
    ----------
    models : ArrayRecord | Mapping[str, dict[str, np.ndarray]]
        The global `ArrayRecord` (keyed `"<arch>/<parameter>"`) or state dicts by architecture.
    x, y : np.ndarray
        Inputs (N, C, H, W) float32, prepared as the clients prepare theirs, and int labels.
    model_spec : ModelSpec
        Classes, channels and image size of the models.
    archs : Sequence[str] | None (default: None)
        The architectures to score, in this order; default: every one in `models`.
    device : DeviceConfig | str (default: "auto")
        Where to score: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N", "mps".
    classes : int (default: 0)
        Score only the leading outputs (the test task's own classes); 0: all of them.
    """
    states = as_state_dicts(models)
    scores = {}
    for arch in states if archs is None else archs:
        model = create_model(arch, model_spec)
        load_numpy_state(model, states[arch])
        scores[arch] = evaluate(model, x, y, DeviceConfig.of(device), classes)
    return scores


def make_evaluate_fn(
    x: np.ndarray,
    y: np.ndarray,
    model_spec: ModelSpec,
    archs: Sequence[str] | None = None,
    device: DeviceConfig | str = "auto",
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Flower `evaluate_fn` scoring every architecture of the global models on `(x, y)`.

    Parameters
    ----------
    x, y : np.ndarray
        A labelled set held by the server (e.g. a centralised test set).
    model_spec : ModelSpec
        Classes, channels and image size of the models.
    archs : Sequence[str] | None (default: None)
        The architectures to score; default: every one in the `ArrayRecord`.
    device : DeviceConfig | str (default: "auto")
        Where to score (as `score_models`).

    Returns
    -------
    Callable[[int, ArrayRecord], MetricRecord]
        For `strategy.start(..., evaluate_fn=...)` of `FedDF` or `HeteroFedAvg`. Its
        `MetricRecord` holds `accuracy/<arch>` and `loss/<arch>` per architecture, and
        `accuracy` and `loss`, their means over architectures.
    """

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        scores = score_models(arrays, x, y, model_spec, archs, device)
        metrics = MetricRecord()
        for arch, (loss, accuracy) in scores.items():
            metrics[f"accuracy/{arch}"] = accuracy
            metrics[f"loss/{arch}"] = loss
        metrics["accuracy"] = float(np.mean([acc for _, acc in scores.values()]))
        metrics["loss"] = float(np.mean([loss for loss, _ in scores.values()]))
        return metrics

    return evaluate_fn
