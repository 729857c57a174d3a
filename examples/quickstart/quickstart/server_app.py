"""ServerApp: FedDF (or fedavg) driven by this app's run config."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flwr_kd.experiment import ExperimentConfig
from flwr_kd.runner import run_experiment

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_experiment(grid, ExperimentConfig.from_run_config(dict(context.run_config)))
