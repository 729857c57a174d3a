"""Local simulation: the experiment as a Flower app, run by `flwr run` on a private SuperLink.

Flower's `run_simulation` is deprecated; what Flower supports going forward is `flwr run`
against a SuperLink started with `--simulation` (its Simulation Engine, on Ray).
`simulate()` writes a one-off app whose components are flwr-kd's own
(`flwr_kd.server_app:simulation_app`, `flwr_kd.client.app:app`) and whose run config is the
experiment, runs it on a `LocalSuperLink` of its own, echoes the ServerApp's report as it is
printed, and returns the result that the ServerApp hands back (`flwr_kd.handoff`): an
exception in the ServerApp is raised here, so the CLI's errors and exit codes are unchanged.

On an existing Ray cluster (`ray_address`, docs/simulation.md): Flower 1.42's federation config
has no field for a Ray address, and its Ray backend calls `ray.init()` without one, which
connects to the cluster that `RAY_ADDRESS` names; the run's processes get that variable, and
the federation config then leaves the cluster's resources to the cluster (Ray refuses
`num_cpus` when it connects to one).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from flwr_kd.experiment import ConfigError, ExperimentConfig
from flwr_kd.faults import SERVERLESS_ONLY, parse_kinds
from flwr_kd.handoff import HANDOFF_KEY, Handoff
from flwr_kd.superlink import LocalSuperLink, SuperLinkError


def simulate(cfg: ExperimentConfig, verbose: bool = False, ray_address: str | None = None) -> dict:
    """Run `cfg` with one simulated SuperNode per client; returns the result dict. `verbose`
    shows Flower's streamed logs of the run instead of the report alone; `ray_address` (a Ray
    cluster's `host:port`, or `auto`) runs the clients on that cluster, which this machine must
    be a node of; without it they run on a Ray instance of the run's own, whatever the
    environment's `RAY_ADDRESS` says (the CLI's `--ray-address` defaults to it)."""
    _check_supported(cfg)
    workdir = Path(tempfile.mkdtemp(prefix="flwr-kd-sim-"))
    keep_logs = False
    try:
        handoff = Handoff(workdir / "handoff")
        handoff.dir.mkdir()
        if not verbose:
            handoff.console.touch()
        app_dir = write_app(workdir / "app", cfg, handoff.dir)
        ray_env = {"RAY_ADDRESS": ray_address or ""}  # empty: not the caller's RAY_ADDRESS
        with LocalSuperLink(workdir, env=ray_env) as link:  # SuperLinkError names its log: kept
            run = link.run(
                app_dir,
                federation_config(cfg, verbose, on_cluster=bool(ray_address)),
                log_path=None if verbose else workdir / "run.log",
            )
            _echo_until_done(run, handoff.console)
        result = handoff.outcome()
        if result is None:
            keep_logs = True
            raise RuntimeError(
                "the simulation ended without a result; see the logs in "
                f"{workdir} or rerun with --verbose"
            )
        return result
    except SuperLinkError:
        keep_logs = True
        raise
    finally:
        if not keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)


def _check_supported(cfg: ExperimentConfig) -> None:
    """What this runtime cannot do (serverless-only faults, a fraction of a CPU per client),
    refused before anything starts."""
    unsupported = (
        [k for k in parse_kinds(cfg.fail_kinds) if k in SERVERLESS_ONLY] if cfg.fail_rate else []
    )
    if unsupported:
        raise ConfigError(
            f"fault kind(s) {', '.join(unsupported)} need the serverless runtime"
            " (flwr-kd cloud emulate)"
        )
    if cfg.client_num_cpus < 1 or not float(cfg.client_num_cpus).is_integer():
        raise ConfigError(
            "client-num-cpus must be a whole number of CPUs (Flower's federation config), "
            f"got {cfg.client_num_cpus}"
        )


def federation_config(cfg: ExperimentConfig, verbose: bool, on_cluster: bool = False) -> dict:
    """Flower's simulation settings for this run: one SuperNode per client, each client's Ray
    resources (`client-num-cpus`, `client-num-gpus`), Ray on every core of this machine unless
    the run joins an existing cluster; clients' own output reaches this process only when
    verbose."""
    config = {
        "num-supernodes": cfg.num_clients,
        "client-resources-num-cpus": int(cfg.client_num_cpus),
        "client-resources-num-gpus": float(cfg.client_num_gpus),
        "init-args-num-cpus": os.cpu_count() or 1,
        "init-args-log-to-driver": verbose,
        "verbose": verbose,
    }
    if on_cluster:  # the cluster's nodes declare their resources; Flower sizes its pool on them
        del config["init-args-num-cpus"]
    return config


def write_app(app_dir: Path, cfg: ExperimentConfig, handoff_dir: Path) -> Path:
    """A Flower app whose run config is this experiment. (`flwr run` overrides only keys that
    an app declares, so the app declares them all, with this run's values.)"""
    app_dir.mkdir(parents=True)
    app = {
        "publisher": "flwr-kd",
        "components": {
            "serverapp": "flwr_kd.server_app:simulation_app",
            "clientapp": "flwr_kd.client.app:app",
        },
        "config": {**cfg.to_run_config(), HANDOFF_KEY: str(handoff_dir)},
    }
    project = {
        "name": "flwr-kd-simulate",
        "version": "1.0.0",
        "description": "One `flwr-kd simulate` run",
        "license": "Apache-2.0",
        "dependencies": ["flwr-kd"],
    }
    document = {"project": project, "tool": {"flwr": {"app": app}}}
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(document))
    return app_dir


def _echo_until_done(run, console: Path, interval: float = 0.2) -> None:
    """Copy what the ServerApp prints to this process's stdout as it comes, until `run`
    (the `flwr run --stream` process) ends with the run."""
    offset = 0
    while True:
        done = run.poll() is not None
        if console.exists():
            with console.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            if not done:  # whole lines only while the ServerApp may still be writing
                chunk = chunk[: chunk.rfind(b"\n") + 1]
            offset += len(chunk)
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        if done:
            return
        time.sleep(interval)
