"""Local simulation on Flower's Simulation Engine (Ray), contained and quiet."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flwr_kd.experiment import ConfigError, ExperimentConfig
from flwr_kd.faults import SERVERLESS_ONLY, parse_kinds
from flwr_kd.runner import run_experiment


def _contain_runtime() -> None:
    """Keep Flower and Ray files out of the user's home and their telemetry off."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    tmp = Path(tempfile.gettempdir())
    os.environ.setdefault("FLWR_HOME", str(tmp / "flwr-kd-home"))
    os.environ.setdefault("RAY_TMPDIR", str(tmp / "flwr-kd-ray"))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)


def simulate(cfg: ExperimentConfig, verbose: bool = False) -> dict:
    """Run `cfg` with one simulated SuperNode per client; returns the result dict."""
    unsupported = (
        [k for k in parse_kinds(cfg.fail_kinds) if k in SERVERLESS_ONLY] if cfg.fail_rate else []
    )
    if unsupported:
        raise ConfigError(
            f"fault kind(s) {', '.join(unsupported)} need the serverless runtime"
            " (flwr-kd cloud emulate)"
        )
    _contain_runtime()
    from flwr.simulation import run_simulation

    from flwr_kd.client.app import app as client_app

    holder: dict = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            holder["result"] = run_experiment(grid, cfg)
        except Exception as exc:  # noqa: BLE001 - re-raised below, outside Flower's runtime
            holder["error"] = exc

    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=cfg.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
        },
    )
    if "error" in holder:
        raise holder["error"]
    if "result" not in holder:
        raise RuntimeError("the simulation ended without a result; rerun with --verbose to see why")
    return holder["result"]
