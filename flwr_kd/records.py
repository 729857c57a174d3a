"""Several architectures' models in one Flower `ArrayRecord`.

`Strategy.start()` carries a single `ArrayRecord` between rounds. flwr-kd keys it by
architecture (`"<arch>/<state-dict key>"`), so the stock `start()` loop, `Result.arrays` and
`evaluate_fn` all work unchanged for any number of architectures.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

SEP = "/"

State = dict[str, np.ndarray]


def state_to_record(state: State) -> ArrayRecord:
    return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> State:
    return {k: v.numpy() for k, v in record.items()}


def pack_models(models: dict[str, State]) -> ArrayRecord:
    """One ArrayRecord holding every architecture's state, keys prefixed by architecture."""
    record = ArrayRecord()
    for arch, state in models.items():
        if SEP in arch:
            raise ValueError(f"architecture name '{arch}' must not contain '{SEP}'")
        for key, value in state.items():
            record[f"{arch}{SEP}{key}"] = Array(np.require(value, requirements="C"))
    return record


def unpack_models(record: ArrayRecord) -> dict[str, State]:
    """Inverse of `pack_models`, keeping the order of architectures and keys."""
    models: dict[str, State] = {}
    for full_key, value in record.items():
        arch, sep, key = full_key.partition(SEP)
        if not sep:
            raise ValueError(f"array '{full_key}' is not keyed '<architecture>{SEP}<name>'")
        models.setdefault(arch, {})[key] = value.numpy()
    return models
