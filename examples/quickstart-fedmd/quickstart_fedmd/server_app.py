"""quickstart-fedmd: a Flower ServerApp that runs FedMD, then writes the accuracy the nodes
reported per round (`metrics.json`, `accuracy.png`) and a copy of every node's final model."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from flwr_kd import FedMD, save_models
from flwr_kd.fanout import SerialFanOut
from flwr_kd.pretrain import PretrainConfig
from flwr_kd.state import open_state_store
from quickstart_fedmd.task import MEAN, STD, architectures, initial_models, load_server_data

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedMD for `num-server-rounds`, then write the results under `out-dir`."""
    cfg = context.run_config
    data = load_server_data(cfg)
    archs = architectures(cfg)
    out = Path(str(cfg["out-dir"])).resolve()
    state_uri = "file://" + str(Path(str(cfg["state-dir"]) or out / "client_state").resolve())

    # Flower's quickstart averages one model that every client shares:
    # strategy = FedAvg(fraction_train=1.0)
    # FedMD trains every architecture on the public data once, then each round averages the
    # nodes' logits on a public subset into a consensus that every node learns from.
    strategy = FedMD(
        public_x=data.public_x,
        public_y=data.public_y,
        val_x=data.val_x,
        val_y=data.val_y,
        model_spec=data.model_spec,
        state_uri=state_uri,  # each node keeps its own model here between rounds
        subset_size=int(cfg["subset-size"]) or None,
        digest_epochs=int(cfg["digest-epochs"]),
        revisit_epochs=int(cfg["revisit-epochs"]),
        finetune_epochs=int(cfg["finetune-epochs"]),
        pretrain=PretrainConfig(epochs=int(cfg["pretrain-epochs"]), seed=int(cfg["seed"])),
        cache_dir=Path(str(cfg["cache-dir"])) if cfg["cache-dir"] else None,
        fanout=SerialFanOut(),  # one architecture after another, inside this process
        seed=int(cfg["seed"]),
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=initial_models(archs, data.model_spec, int(cfg["seed"])),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord(),
    )

    # Every node reports its model's accuracy on the test set; FedMD averages it per
    # architecture (`accuracy/<arch>`). Round 0: after transfer learning and fine-tuning, the
    # baseline the rounds must beat. `result.arrays` is the last consensus, not a model.
    history = {0: {f"accuracy/{arch}": acc for arch, acc in strategy.accuracy.get(0, {}).items()}}
    for r, metrics in sorted(result.train_metrics_clientapp.items()):
        history[r] = {k: v for k, v in metrics.items() if k.startswith("accuracy/")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"rounds": history}, indent=2))
    plot_accuracy(history, archs, out / "accuracy.png")

    # The models stay on the nodes. In this simulation their store is a directory of this
    # machine, so copy them out for a plain timm user; flwr-kd keys them `node-<node id>`.
    store = open_state_store(state_uri)
    arch_of = {f"node-{node}": arch for node, arch in strategy.nodes.arch_of.items()}
    states = {name: store.load(name) for name in arch_of}
    save_models(
        {name: state for name, state in states.items() if state is not None},
        data.model_spec,
        out / "client_models",
        architectures=arch_of,
        metadata={"input": {"scale": 1 / 255, "mean": MEAN, "std": STD}},
    )
    print(f"Node models in {out / 'client_models'}, accuracy plot {out / 'accuracy.png'}")


def plot_accuracy(history: dict[int, dict], archs: list[str], path: Path) -> None:
    """The nodes' mean test accuracy per architecture, round by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arch in archs:
        rounds = [r for r, m in history.items() if f"accuracy/{arch}" in m]
        ax.plot(rounds, [history[r][f"accuracy/{arch}"] for r in rounds], "o-", label=arch)
    ax.set(xlabel="round", ylabel="test accuracy (nodes' mean)", ylim=(0, 1), title="FedMD")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
