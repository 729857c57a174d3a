"""Experiment tracking (`--track mlflow`): a run's config, its per-round metrics and its files,
sent to an MLflow tracking store beside `result.json`.

Optional: MLflow's client (`mlflow-skinny`, the `track` extra) is imported only when a tracker
is made, so a plain install never needs it. The store is, in this order: the `tracking_uri`
given, `MLFLOW_TRACKING_URI`, or a local SQLite store in the run's out dir (`mlflow.db`, files
under `mlartifacts/`), which `mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db` opens.

The tracker speaks to the store through `MlflowClient` and its own run id, never through
mlflow's process-wide "active run", so several experiments in one process cannot mix.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

TRACKERS = ("mlflow",)
EXTRA_HINT = "pip install 'flwr-kd[track]'"
EXPERIMENT_NAME = "flwr-kd"  # MLFLOW_EXPERIMENT_NAME overrides it
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
# what a run leaves in its out dir that belongs in the tracking store (never the local store)
RESULT_FILES = ("result.json", "accuracy.png")
MODELS_DIR = "final_models"  # flwr_kd.export.save_models's directory in the out dir

# MLflow's limits on one log_batch call and on one parameter value
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_LENGTH = 6000
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


def _mlflow():
    """MLflow's client classes, or an ImportError that says which extra to install."""
    try:
        import mlflow  # noqa: F401  (fails first and clearly when the extra is missing)
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise ImportError(f"--track mlflow needs MLflow's client: {EXTRA_HINT}") from err
    return MlflowClient, Metric, Param


def _key(parts: list[str]) -> str:
    """A metric or parameter name MLflow accepts (it rejects e.g. '+', '@' and '=')."""
    return _UNSAFE_KEY_CHARS.sub("_", "/".join(parts))


def _flatten(value, parts: list[str], out: dict) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(v, [*parts, str(k)], out)
    elif parts:
        out[_key(parts)] = value


def config_params(run_config: Mapping) -> dict[str, str]:
    """A run config as MLflow parameters: nested keys joined with '/', values as strings."""
    flat: dict = {}
    _flatten(run_config, [], flat)
    return {k: str(v)[:_MAX_PARAM_LENGTH] for k, v in flat.items()}


def round_metrics(row: Mapping) -> dict[str, float]:
    """One `result["rounds"]` row (or `result["initial"]`) as metrics for step `row["round"]`.

    Every finite number in the row, nested keys joined with '/': `accuracy/<arch>`,
    `mean_accuracy`, `seconds`, `bytes/down`, `bytes/up`, `time/<phase>`, `replies`,
    `distill/<arch>/<stat>`, `client_accuracy/<key>`, ...; `dropped` counts the replies left
    out. Other lists (per-client timings), strings and non-finite values are not metrics.
    """
    flat: dict = {}
    _flatten({k: v for k, v in row.items() if k != "round"}, [], flat)
    metrics = {}
    for key, value in flat.items():
        if key == "dropped" and isinstance(value, list):
            value = len(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            metrics[key] = float(value)
    return metrics


def summary_metrics(result: Mapping) -> dict[str, float]:
    """What a finished run adds beyond its rounds: `baselines/<name>/<arch>` and
    `seconds/<phase>` (total, baselines), as step-less metrics."""
    return round_metrics({k: result[k] for k in ("baselines", "seconds") if k in result})


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def resolve_tracking_uri(out_dir: str | Path | None, tracking_uri: str | None = None) -> str:
    """The store a tracker uses: `tracking_uri`, else `MLFLOW_TRACKING_URI`, else the local
    SQLite store in `out_dir`."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if not out_dir:
        raise ValueError("--track mlflow needs an out dir (--out) or MLFLOW_TRACKING_URI")
    return f"sqlite:///{Path(out_dir).resolve() / LOCAL_DB}"


class MlflowTracker:
    """One MLflow run for one experiment, started when the tracker is made.

    Use it as a context manager (or call `close`): the run ends FINISHED, or FAILED when the
    block raises.
    """

    def __init__(self, out_dir: str | Path, run_name: str, tracking_uri: str | None = None):
        MlflowClient, self._Metric, self._Param = _mlflow()
        self.tracking_uri = resolve_tracking_uri(out_dir, tracking_uri)
        artifacts = None
        if not tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):  # the local store
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            artifacts = (Path(out_dir).resolve() / LOCAL_ARTIFACTS).as_uri()
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment_id = self._experiment_id(
            os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT_NAME, artifacts
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.closed = False

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        """The experiment named `name`, created on first use (with the local store's artifact
        directory; a server chooses its own)."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # another run created it meanwhile
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def log_config(self, run_config: Mapping) -> None:
        """The run config as parameters (logged once: MLflow refuses to change a parameter)."""
        params = [self._Param(k, v) for k, v in config_params(run_config).items()]
        for chunk in _chunks(params, _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk, synchronous=True)

    def _log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        entries = [self._Metric(k, v, now, step) for k, v in metrics.items()]
        for chunk in _chunks(entries, _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def log_round(self, row: Mapping) -> None:
        """One round's row of the result (see `round_metrics`), at step `row["round"]`."""
        self._log_metrics(round_metrics(row), step=int(row["round"]))

    def log_result(self, result: Mapping) -> None:
        """A finished run's rows, the initial one (step 0) included, and its summary."""
        for row in [result.get("initial"), *result.get("rounds", [])]:
            if row:
                self.log_round(row)
        self._log_metrics(summary_metrics(result), step=0)

    def log_artifacts(self, out_dir: str | Path) -> None:
        """`result.json`, `accuracy.png` and the final models (`final_models/`) that the run
        wrote to out_dir; whatever of them is missing is skipped."""
        out = Path(out_dir)
        for name in RESULT_FILES:
            if (out / name).is_file():
                self.client.log_artifact(self.run_id, str(out / name))
        if (out / MODELS_DIR).is_dir():
            self.client.log_artifacts(self.run_id, str(out / MODELS_DIR), MODELS_DIR)

    def close(self, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED, FAILED or KILLED); later calls do nothing."""
        if not self.closed:
            self.client.set_terminated(self.run_id, status)
            self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")


def check_tracker(kind: str) -> None:
    """Raise ValueError for an unknown tracker, ImportError (naming the extra) when its client
    is not installed: before a run starts, not after its rounds."""
    if kind not in TRACKERS:
        raise ValueError(f"unknown tracker '{kind}': choose from {', '.join(TRACKERS)}")
    _mlflow()


def make_tracker(kind: str, out_dir: str | Path, run_name: str) -> MlflowTracker | None:
    """The tracker `--track KIND` asks for: None for "" (no tracking)."""
    if not kind:
        return None
    if kind == "mlflow":
        return MlflowTracker(out_dir, run_name)
    raise ValueError(f"unknown tracker '{kind}': choose from {', '.join(TRACKERS)}")
