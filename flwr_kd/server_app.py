"""The flwr-kd `ServerApp` (`app`): what `flwr run` starts for an app that names it.

Its main reads the experiment from the app's run config and hands it to
`flwr_kd.runner.run_experiment`, which does everything else.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flwr_kd.experiment import ExperimentConfig
from flwr_kd.runner import run_experiment

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run`: the experiment described by the app's run config."""
    run_experiment(grid, ExperimentConfig.from_run_config(dict(context.run_config)))
