"""FedMD's transfer learning: each unique architecture trained on the public labelled data
once (not once per client), the architectures in parallel on the fan-out executor, and cached
by (architecture, initial weights, public data, hyper-parameters) so a second run skips it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from logging import INFO
from pathlib import Path
from typing import NamedTuple

import numpy as np
from flwr.common.logger import log

from flwr_kd.configs import DeviceConfig, PretrainConfig
from flwr_kd.fanout import FanOut
from flwr_kd.models import ModelSpec
from flwr_kd.records import State
from flwr_kd.state import LocalStateStore
from flwr_kd.tasks import LocalTrainTask, run_local_train_task


class TransferData(NamedTuple):
    """What transfer learning trains on: the public labelled set, scored on the server's
    labelled validation set, for models of `spec`."""

    spec: ModelSpec
    public_x: np.ndarray
    public_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray


@dataclass
class TransferReport:
    seconds: float
    trained: list[str]
    cached: list[str]
    val_accuracy: dict[str, float] = field(default_factory=dict)
    per_client_seconds: float | None = None

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["seconds"] = round(self.seconds, 2)
        if self.per_client_seconds is not None:
            out["per_client_seconds"] = round(self.per_client_seconds, 2)
            out["speedup"] = round(self.per_client_seconds / max(self.seconds, 1e-9), 2)
        return out


def default_cache_dir() -> Path:
    root = os.environ.get("FLWR_KD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flwr-kd"
    )
    return Path(root) / "pretrained"


def cache_key(
    arch: str, init_state: State, x: np.ndarray, y: np.ndarray, config: PretrainConfig
) -> str:
    h = hashlib.sha256()
    h.update(arch.encode())
    h.update(json.dumps(asdict(config), sort_keys=True).encode())
    for name in sorted(init_state):
        h.update(name.encode())
        h.update(np.ascontiguousarray(init_state[name]).tobytes())
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).tobytes())
    return f"{arch}-{h.hexdigest()[:24]}"


def _task(arch, init, data: TransferData, config, seed, device) -> LocalTrainTask:
    """Train `arch` from `init` on the public set, scored on validation, returning its weights."""
    hyper = {**asdict(config), "seed": seed}  # epochs, batch_size, lr: the task's own fields
    where = DeviceConfig.of(device).to_config()  # device, autocast: the task's own fields too
    return LocalTrainTask(arch, *data, init_state=init, return_state=True, **hyper, **where)


def transfer_learning(
    initial: dict[str, State],
    data: TransferData,
    config: PretrainConfig,
    fanout: FanOut,
    cache_dir: Path | None = None,
    device: DeviceConfig | str = "auto",
) -> tuple[dict[str, State], TransferReport]:
    """Pretrained weights per architecture (from the cache where possible) and a report.
    The cache ignores `device`: weights trained anywhere serve everywhere."""
    t0 = time.perf_counter()
    store = LocalStateStore(cache_dir or default_cache_dir())
    keys = {
        arch: cache_key(arch, init, data.public_x, data.public_y, config)
        for arch, init in initial.items()
    }
    weights: dict[str, State] = {}
    for arch, key in keys.items():
        cached = store.load(key)
        if cached is not None:
            weights[arch] = cached
    missing = [arch for arch in initial if arch not in weights]
    # one seed for all: the cache key must determine the weights, whatever else is cached
    tasks = [_task(arch, initial[arch], data, config, config.seed, device) for arch in missing]
    report = TransferReport(
        seconds=0.0, trained=missing, cached=[a for a in initial if a not in missing]
    )
    for outcome in fanout.map_with_progress(run_local_train_task, tasks, "transfer learning"):
        weights[outcome.arch] = outcome.state
        store.save(keys[outcome.arch], outcome.state)
        report.val_accuracy[outcome.arch] = round(outcome.accuracy, 4)
    report.seconds = time.perf_counter() - t0
    return {arch: weights[arch] for arch in initial}, report


def per_client_seconds(
    client_archs: list[str],
    initial: dict[str, State],
    data: TransferData,
    config: PretrainConfig,
    fanout: FanOut,
    device: DeviceConfig | str = "auto",
) -> float:
    """Wall time of the seed system's way, for the record: transfer learning once per client
    (uncached), on the same executor."""
    t0 = time.perf_counter()
    tasks = [
        _task(arch, initial[arch], data, config, config.seed + i, device)
        for i, arch in enumerate(client_archs)
    ]
    fanout.map_with_progress(run_local_train_task, tasks, "transfer learning, once per client")
    return time.perf_counter() - t0


def pretrain_architectures(
    initial: dict[str, State],
    client_archs: list[str],
    data: TransferData,
    config: PretrainConfig,
    fanout: FanOut,
    cache_dir: Path | None = None,
    measure_per_client: bool = False,
    device: DeviceConfig | str = "auto",
) -> tuple[dict[str, State], TransferReport]:
    """`transfer_learning` as FedMD runs it before round 1, logged. `measure_per_client` also
    times the seed system's way (`per_client_seconds`) into the report."""
    weights, report = transfer_learning(initial, data, config, fanout, cache_dir, device)
    log(
        INFO,
        "Transfer learning: %.1fs, trained %s, cached %s",
        report.seconds,
        report.trained,
        report.cached,
    )
    if measure_per_client:
        report.per_client_seconds = per_client_seconds(
            client_archs, initial, data, config, fanout, device
        )
        log(
            INFO,
            "Transfer learning once per client (for the record): %.1fs",
            report.per_client_seconds,
        )
    return weights, report
