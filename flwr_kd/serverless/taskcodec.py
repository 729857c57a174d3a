"""Fan-out tasks as (arrays, JSON params), so an aggregator function can run them.

Arrays travel as one `.npz` on Cloud Storage (`state/<key>` for weights); everything else as
JSON. Only the task kinds the cloud fan-out supports are encoded; the seed system's
server-side teacher (`teacher_models`) is a local-only comparison.
"""

from __future__ import annotations

from dataclasses import asdict, fields

import numpy as np

from flwr_kd.distill import DistillConfig, DistillReport
from flwr_kd.models import ModelSpec
from flwr_kd.tasks import DistillOutcome, DistillTask, LocalTrainOutcome, LocalTrainTask

KINDS = {"distill": DistillTask, "train": LocalTrainTask}


def kind_of(task) -> str:
    for kind, cls in KINDS.items():
        if isinstance(task, cls):
            return kind
    raise TypeError(f"the cloud fan-out cannot run {type(task).__name__}")


def encode_task(task) -> tuple[dict[str, np.ndarray], dict]:
    if isinstance(task, DistillTask) and task.teacher_models:
        raise ValueError("the cloud fan-out needs teacher logits from clients (teacher='clients')")
    arrays: dict[str, np.ndarray] = {}
    params: dict = {"kind": kind_of(task)}
    for f in fields(task):
        value = getattr(task, f.name)
        if isinstance(value, np.ndarray):
            arrays[f.name] = value
        elif isinstance(value, dict):  # a state dict
            arrays.update({f"{f.name}/{k}": v for k, v in value.items()})
            params[f"{f.name}-is-state"] = True
        elif isinstance(value, (ModelSpec, DistillConfig)):
            params[f.name] = asdict(value)
        elif isinstance(value, list):
            continue  # empty teacher_models
        else:
            params[f.name] = value
    return arrays, params


def decode_task(arrays: dict[str, np.ndarray], params: dict):
    kind = params.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(KINDS)}")
    cls = KINDS[kind]
    values = {}
    for f in fields(cls):
        if params.get(f"{f.name}-is-state"):
            prefix = f"{f.name}/"
            values[f.name] = {
                k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)
            }
        elif f.name in arrays:
            values[f.name] = arrays[f.name]
        elif f.name == "model_spec":
            values[f.name] = ModelSpec(**params[f.name])
        elif f.name == "config" and kind == "distill":
            values[f.name] = DistillConfig(**params[f.name])
        elif f.name in params:
            values[f.name] = params[f.name]
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"incomplete {kind} task: {exc}") from exc


def encode_outcome(outcome) -> tuple[dict[str, np.ndarray], dict]:
    state = outcome.state or {}
    meta = {k: v for k, v in asdict(outcome).items() if k != "state"}
    return dict(state), meta


def decode_outcome(kind: str, state: dict[str, np.ndarray], meta: dict):
    if kind == "distill":
        return DistillOutcome(
            meta["arch"],
            state,
            DistillReport(**meta["report"]),
            meta["teacher_seconds"],
            meta["distill_seconds"],
        )
    return LocalTrainOutcome(meta["arch"], meta["accuracy"], meta["seconds"], state or None)
