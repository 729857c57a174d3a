"""`--track mlflow` (flwr_kd.tracking) against a real MLflow tracking server on 127.0.0.1.

The server (full `mlflow`, which would change packages torch and Flower need) lives in its own
venv, `.venv-mlflow`, which `make test` installs; `MLFLOW_SERVER_CLI` names another `mlflow`
executable. The test's client is `mlflow-skinny` in `.venv` (the `track` extra). One server
serves the module; it is stopped, with its uvicorn worker, through its process group.

The run fed to the tracker is a 2-round FedDF result in the schema `flwr_kd.runner` writes,
with `result.json` and `accuracy.png` from `flwr_kd.report` and final models from
`flwr_kd.export`, so that the assertions read what a user finds on the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flwr_kd.tracking import (
    EXTRA_HINT,
    LOCAL_DB,
    MlflowTracker,
    make_tracker,
    round_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("resnet10t", "test_vit")
SERVER_START_TIMEOUT = 240  # seconds; ~15 s of CPU, but the test machine has 2 shared cores


def _mlflow_cli() -> str:
    # not `which mlflow`: .venv's is mlflow-skinny's, which cannot serve
    for candidate in (os.environ.get("MLFLOW_SERVER_CLI"), ROOT / ".venv-mlflow/bin/mlflow"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise AssertionError(
        "MLflow server not found: `make test` installs it into .venv-mlflow "
        "(or set MLFLOW_SERVER_CLI)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` (SQLite backend, artifacts served by the server) in its own
    process group, so that `stop` reaches its uvicorn worker too."""

    def __init__(self, base: Path) -> None:
        port = _free_port()
        self.base, self.uri = base, f"http://127.0.0.1:{port}"
        # PYTHONPATH: earlier tests (Ray) may leave it pointing into .venv
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.pop("MLFLOW_TRACKING_URI", None)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job runner: faster start
        command = [_mlflow_cli(), "server", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--workers", "1", "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}"]
        command += ["--artifacts-destination", str(base / "artifacts")]
        with open(base / "server.log", "wb") as log:
            self.proc = subprocess.Popen(
                command, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_ready(self) -> str:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            assert self.proc.poll() is None, (self.base / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self.uri
            except OSError:
                pass
            assert time.monotonic() < deadline, "MLflow server did not answer /health in time"
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to the process group, then SIGKILL to whatever of it is left."""
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                time.sleep(0.5)
                os.killpg(self.proc.pid, 0)  # raises once no worker is left in the group
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """Started (not awaited) by the local-store test, so that it boots meanwhile."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.fixture
def server_uri(mlflow_server) -> str:
    return mlflow_server.wait_ready()


@pytest.fixture
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def _row(r: int, acc: dict[str, float], dropped: list[dict]) -> dict:
    """One row of `result["rounds"]`, as flwr_kd.runner writes it for FedDF."""
    return {
        "round": r,
        "accuracy": acc,
        "mean_accuracy": round(sum(acc.values()) / len(acc), 4),
        "seconds": 10.0 + r,
        "eval_seconds": 0.5,
        "bytes": {"down": 1000 * r, "up": 900 * r},
        "time": {"configure": 0.1 * r, "clients": 3.0 + r, "fedavg": 0.25, "distill": 6.0 + r},
        "replies": 4 - len(dropped),
        "dropped": dropped,
        "distill": {a: {"steps": 5, "best_step": 5, "seconds": 1.5} for a in acc},
        "client_compute": [1.2, 0.8, 1.1],
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, dict]:
    """An out dir as a 2-round FedDF run leaves it, and its result."""
    from flwr_kd.export import save_models
    from flwr_kd.models import ModelSpec, create_model, state_to_numpy
    from flwr_kd.report import write_result

    out = tmp_path_factory.mktemp("run")
    dropped = [{"node": 1017, "type": "train", "reason": "non-finite logits"}]
    result = {
        "config": {"strategy": "feddf", "dataset": "digits", "num-clients": 4, "alpha": 0.5,
                   "num-server-rounds": 2, "archs": ",".join(ARCHS), "out-dir": str(out)},
        "architectures": {"resnet10t": 2, "test_vit": 2},
        "initial": {"round": 0, "accuracy": {"resnet10t": 0.09, "test_vit": 0.11},
                    "mean_accuracy": 0.1, "seconds": 0.0, "eval_seconds": 1.0},
        "rounds": [
            _row(1, {"resnet10t": 0.41, "test_vit": 0.22}, []),
            _row(2, {"resnet10t": 0.58, "test_vit": 0.31}, dropped),
        ],
        "baselines": {"local_only": {"resnet10t": 0.5, "test_vit": 0.25}},
        "seconds": {"total": 42.0, "local_only_baseline": 3.0},
    }  # fmt: skip
    write_result(out, result)
    spec = ModelSpec(num_classes=10, in_chans=1, img_size=16)
    save_models(
        {a: state_to_numpy(create_model(a, spec)) for a in ARCHS}, spec, out / "final_models"
    )
    return out, result


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id, path)}


def _track(tracker: MlflowTracker, out: Path, result: dict) -> str:
    with tracker:
        tracker.log_config(result["config"])
        for row in result["rounds"]:
            tracker.log_round(row)
        tracker.log_artifacts(out)
    return tracker.run_id


# ---------------------------------------------------------------------------- without MLflow


def test_round_metrics_flatten_a_row():
    row = _row(2, {"resnet10t": 0.5, "test_vit": 0.25}, [{"node": 1, "reason": "nan"}])
    metrics = round_metrics({**row, "mean_accuracy": float("nan"), "note": "text"})
    assert metrics["accuracy/resnet10t"] == 0.5 and metrics["accuracy/test_vit"] == 0.25
    assert metrics["bytes/down"] == 2000 and metrics["bytes/up"] == 1800
    assert metrics["time/distill"] == 8.0 and metrics["distill/test_vit/steps"] == 5
    assert metrics["replies"] == 3 and metrics["dropped"] == 1
    for absent in ("round", "mean_accuracy", "note", "client_compute"):
        assert absent not in metrics


def test_make_tracker_names_the_choices():
    assert make_tracker("", "unused", "run") is None
    with pytest.raises(ValueError, match="unknown tracker 'wandb': choose from mlflow"):
        make_tracker("wandb", "unused", "run")


def test_missing_mlflow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now fails
    with pytest.raises(ImportError, match=EXTRA_HINT.replace("[", r"\[").replace("]", r"\]")):
        MlflowTracker(tmp_path, "run")


# ---------------------------------------------------------------------------- local store


@pytest.mark.usefixtures("mlflow_server")  # boots the server for the next tests meanwhile
def test_default_store_is_local_to_the_out_dir(run_dir, tmp_path, no_tracking_env):
    from mlflow.tracking import MlflowClient

    out, result = run_dir
    store = tmp_path / "out"
    tracker = make_tracker("mlflow", store, "local-run")
    run_id = _track(tracker, out, result)

    assert tracker.tracking_uri == f"sqlite:///{store.resolve() / LOCAL_DB}"
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "local-run"
    assert _history(client, run_id, "accuracy/test_vit") == [(1, 0.22), (2, 0.31)]
    assert {"result.json", "accuracy.png", "final_models"} <= _artifacts(client, run_id)
    assert run.info.artifact_uri.startswith((store.resolve() / "mlartifacts").as_uri())
    assert sorted(p.name for p in store.iterdir()) == ["mlartifacts", "mlflow.db"]


# ---------------------------------------------------------------------------- real server


def test_server_holds_metrics_per_round_and_architecture_params_and_artifacts(
    server_uri, run_dir, no_tracking_env
):
    from mlflow.tracking import MlflowClient

    out, result = run_dir
    tracker = MlflowTracker(out, "feddf-2-rounds", tracking_uri=server_uri)
    with tracker:
        tracker.log_config(result["config"])
        tracker.log_result(result)
        tracker.log_artifacts(out)
    client = MlflowClient(tracking_uri=server_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "feddf-2-rounds"
    assert client.get_experiment(run.info.experiment_id).name == "flwr-kd"
    assert run.data.params == {k: str(v) for k, v in result["config"].items()}

    for arch in ARCHS:
        expected = [(0, result["initial"]["accuracy"][arch])]
        expected += [(row["round"], row["accuracy"][arch]) for row in result["rounds"]]
        assert _history(client, tracker.run_id, f"accuracy/{arch}") == expected, arch
    rounds = result["rounds"]
    for key, values in {
        "mean_accuracy": [r["mean_accuracy"] for r in rounds],
        "seconds": [r["seconds"] for r in rounds],
        "bytes/down": [r["bytes"]["down"] for r in rounds],
        "bytes/up": [r["bytes"]["up"] for r in rounds],
        "time/clients": [r["time"]["clients"] for r in rounds],
        "time/distill": [r["time"]["distill"] for r in rounds],
        "replies": [4, 3],
        "dropped": [0, 1],
    }.items():
        history = [(s, v) for s, v in _history(client, tracker.run_id, key) if s > 0]
        assert history == list(zip([1, 2], values, strict=True)), key
    assert run.data.metrics["baselines/local_only/resnet10t"] == 0.5
    assert run.data.metrics["seconds/total"] == 42.0

    assert _artifacts(client, tracker.run_id) == {"result.json", "accuracy.png", "final_models"}
    models = _artifacts(client, tracker.run_id, "final_models")
    assert {f"final_models/{a}.safetensors" for a in ARCHS} | {"final_models/models.json"} == models
    local = Path(client.download_artifacts(tracker.run_id, "result.json", str(out.parent)))
    assert local.read_bytes() == (out / "result.json").read_bytes()


def test_tracking_uri_env_is_honoured_and_an_explicit_uri_wins(
    server_uri, run_dir, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    out, result = run_dir
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    run_id = _track(make_tracker("mlflow", tmp_path / "unused", "env-run"), out, result)
    client = MlflowClient(tracking_uri=server_uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "from-env"
    assert _history(client, run_id, "accuracy/resnet10t") == [(1, 0.41), (2, 0.58)]
    assert not (tmp_path / "unused").exists()  # nothing local when a store is named

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    tracker = MlflowTracker(tmp_path / "unused", "explicit", tracking_uri=server_uri)
    tracker.close("FAILED")
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert not (tmp_path / "env.db").exists()


def test_a_tracked_two_round_run_lands_on_the_server(
    server_uri, tmp_path, monkeypatch, server_task_identity
):
    """`track = "mlflow"` end to end: a real 2-round run (in-process grid) with
    MLFLOW_TRACKING_URI set leaves its per-round, per-architecture accuracy, its config and its
    files (result.json, accuracy.png, the final models) on the server."""
    from flwr.clientapp import ClientApp
    from inprocess_grid import InProcessGrid
    from mlflow.tracking import MlflowClient

    from flwr_kd.client import KDClient
    from flwr_kd.experiment import ExperimentConfig
    from flwr_kd.runner import run_experiment

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "flwr-kd-end-to-end")
    archs = ("resnet10t", "test_vit")
    cfg = ExperimentConfig.from_run_config(
        {
            "strategy": "fedavg",
            "num-clients": 2,
            "num-server-rounds": 2,
            "archs": ",".join(archs),
            "local-epochs": 1,
            "max-private": 40,
            "max-test": 40,
            "fanout": "serial",
            "local-only-baseline": False,
            "out-dir": str(tmp_path / "tracked"),
            "track": "mlflow",
        }
    )
    result = run_experiment(InProcessGrid(KDClient().register(ClientApp()), 2), cfg)

    client = MlflowClient(tracking_uri=server_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("flwr-kd-end-to-end").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["num-server-rounds"] == "2" and run.data.params["track"] == "mlflow"
    for arch in archs:
        expected = [(0, result["initial"]["accuracy"][arch])]
        expected += [(row["round"], row["accuracy"][arch]) for row in result["rounds"]]
        assert _history(client, run.info.run_id, f"accuracy/{arch}") == expected, arch
    assert [s for s, _ in _history(client, run.info.run_id, "bytes/down")] == [1, 2]
    assert _artifacts(client, run.info.run_id) == {"result.json", "accuracy.png", "final_models"}
    models = _artifacts(client, run.info.run_id, "final_models")
    assert models == {f"final_models/{a}.safetensors" for a in archs} | {"final_models/models.json"}
