"""flwr-kd's `ServerApp`s: what `flwr run` starts for an app that names one.

`app` reads the experiment from the app's run config and hands it to
`flwr_kd.runner.run_experiment`, which does everything else. `simulation_app` does the same for
the app that `flwr-kd simulate` writes, and hands the printed report, the result or the error
back to the process that called `simulate()` (`flwr_kd.handoff`).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flwr_kd.experiment import ExperimentConfig
from flwr_kd.handoff import HANDOFF_KEY, Handoff
from flwr_kd.runner import run_experiment

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run`: the experiment described by the app's run config."""
    run_experiment(grid, ExperimentConfig.from_run_config(dict(context.run_config)))


#: `flwr-kd simulate`'s ServerApp (flwr_kd.simulation): the same experiment, with its printed
#: report, result and any exception handed back to the process that called `simulate()`.
simulation_app = ServerApp()


@simulation_app.main()
def simulation_main(grid: Grid, context: Context) -> None:
    """Entry point of the app `flwr-kd simulate` writes: run config plus a handoff directory."""
    run_config = dict(context.run_config)
    handoff = Handoff(str(run_config.pop(HANDOFF_KEY)))
    with handoff.capture():
        result = run_experiment(grid, ExperimentConfig.from_run_config(run_config))
    handoff.write_result(result)
