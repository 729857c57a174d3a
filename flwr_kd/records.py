"""Several architectures' models in one Flower `ArrayRecord`.

`Strategy.start()` carries a single `ArrayRecord` between rounds. flwr-kd keys it by
architecture (`"<arch>/<state-dict key>"`), so the stock `start()` loop, `Result.arrays` and
`evaluate_fn` all work unchanged for any number of architectures.

Every `.npy` header flwr-kd reads goes through `to_numpy` or `load_npz`, under one lock: numpy
parses each header with `ast.literal_eval`, and CPython before 3.11.8 keeps the AST builder's
recursion counter per interpreter, not per thread. Two threads parsing at once (the serverless
driver decodes replies on a thread pool) can then fail with "SystemError: AST constructor
recursion depth mismatch" (python/cpython#106905, fixed in 3.11.8 and 3.12.2; the pinned
interpreter here is 3.11.7). Decoding is mostly a copy made under the GIL anyway, so the lock
costs little parallelism.
"""

from __future__ import annotations

import threading
from os import PathLike
from typing import BinaryIO

import numpy as np
from flwr.app import Array, ArrayRecord

SEP = "/"

State = dict[str, np.ndarray]

#: Held while numpy parses `.npy` headers (see the module docstring).
NPY_HEADER_LOCK = threading.Lock()


def to_numpy(array: Array) -> np.ndarray:
    """`array.numpy()`, safe to call from any thread."""
    with NPY_HEADER_LOCK:
        return array.numpy()


def load_npz(file: str | PathLike | BinaryIO) -> State:
    """Every array of an `.npz` archive (never unpickled), safe to call from any thread;
    raises numpy's ValueError or OSError for what is not a plain archive."""
    with NPY_HEADER_LOCK, np.load(file, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def state_to_record(state: State) -> ArrayRecord:
    return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> State:
    return {k: to_numpy(v) for k, v in record.items()}


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
        models.setdefault(arch, {})[key] = to_numpy(value)
    return models
