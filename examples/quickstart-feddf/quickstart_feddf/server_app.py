"""quickstart-feddf: a Flower ServerApp that runs FedDF and saves one final model per
architecture, the per-round test accuracy (`metrics.json`) and its plot (`accuracy.png`)."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from flwr_kd import FedDF, make_evaluate_fn, save_models
from flwr_kd.distill import DistillConfig
from flwr_kd.fanout import SerialFanOut
from quickstart_feddf.task import MEAN, STD, architectures, initial_models, load_server_data

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedDF for `num-server-rounds`, then write the results under `out-dir`."""
    cfg = context.run_config
    data = load_server_data(cfg)
    archs = architectures(cfg)

    # Flower's quickstart averages one model that every client shares:
    # strategy = FedAvg(fraction_train=float(cfg["fraction-train"]))
    # FedDF averages the models of each architecture, then distils every architecture's model
    # towards the ensemble of all clients' logits on the unlabelled public data.
    strategy = FedDF(
        public_x=data.public_x,
        val_x=data.val_x,
        val_y=data.val_y,
        model_spec=data.model_spec,
        distill_config=DistillConfig(steps=int(cfg["distill-steps"])),
        fraction_train=float(cfg["fraction-train"]),
        fanout=SerialFanOut(),  # one architecture after another, inside this process
        seed=int(cfg["seed"]),
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=initial_models(archs, data.model_spec, int(cfg["seed"])),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord(
            {
                "local-epochs": int(cfg["local-epochs"]),
                "batch-size": int(cfg["batch-size"]),
                "lr": float(cfg["lr"]),
            }
        ),
        evaluate_fn=make_evaluate_fn(data.test_x, data.test_y, data.model_spec),
    )

    out = Path(str(cfg["out-dir"])).resolve()
    history = {r: dict(m) for r, m in sorted(result.evaluate_metrics_serverapp.items())}
    final = history[max(history)]
    save_models(
        result.arrays,
        data.model_spec,
        out / "final_models",
        metadata={
            "input": {
                "scale": 1 / 255,
                "mean": MEAN,
                "std": STD,
                "img_size": data.model_spec.img_size,
            },
            "test_accuracy": {arch: final[f"accuracy/{arch}"] for arch in archs},
        },
    )
    (out / "metrics.json").write_text(json.dumps({"rounds": history}, indent=2))
    plot_accuracy(history, archs, out / "accuracy.png")
    print(f"Final models in {out / 'final_models'}, accuracy plot {out / 'accuracy.png'}")


def plot_accuracy(history: dict[int, dict], archs: list[str], path: Path) -> None:
    """Test accuracy of every architecture's global model, round by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arch in archs:
        ax.plot(list(history), [m[f"accuracy/{arch}"] for m in history.values()], "o-", label=arch)
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="FedDF")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
