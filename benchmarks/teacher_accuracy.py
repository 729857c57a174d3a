"""How good is FedDF's teacher? Its accuracy on the round's public subset, per way of averaging.

    python benchmarks/teacher_accuracy.py --config shards --seeds 0 1 2     # about 1 min a seed

Each client of a study run (`make bench`'s full mode, benchmarks/evidence.py: the same split
and architectures per seed) trains its local epochs from fresh weights, as in round 1, and
scores round 1's public subset. The teacher built from those logits is scored against the
subset's labels (which FedDF never sees):

- `uniform`: the plain average of the clients' logits (the FedDF paper's teacher);
- `centred`: that average less each class's mean over the subset
  (`-c distill-center-teacher=true`, `flwr_kd.distill.center_per_class`);
- `label_weighted`: each class's logit averaged over the clients that hold the class, weighted
  by their label counts (what a server could do if clients disclosed their label histograms).

Writes benchmarks/results/lab/teacher-<config>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import MODES, ROOT, study_clients


def teachers(logits: np.ndarray, label_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each way of averaging clients' logits (clients x samples x classes) into a teacher."""
    from flwr_kd.distill import average_logits, center_per_class

    uniform = average_logits(list(logits))
    held = label_counts / np.maximum(label_counts.sum(axis=0, keepdims=True), 1)
    return {
        "uniform": uniform,
        "centred": center_per_class(uniform),
        "label_weighted": np.einsum("kc,knc->nc", held, logits),
    }


def one_seed(config: str, seed: int) -> dict:
    import torch

    from flwr_kd.client.handlers import train_private
    from flwr_kd.models import create_model
    from flwr_kd.training import predict_logits

    torch.set_num_threads(1)
    cfg, idx, federated, clients = study_clients(MODES["full"], config, seed=seed)
    subset_x, subset_y = federated.public_x[idx], federated.public_y[idx]
    logits, counts = [], []
    for partition, arch, data in clients:
        torch.manual_seed(seed * 1000 + partition)
        model = create_model(arch, data.model_spec)
        train_private(model, data, cfg.local_epochs, cfg.train_config, partition, cfg.device_config)
        logits.append(predict_logits(model, subset_x, cfg.device_config))
        counts.append(np.bincount(data.train_y, minlength=data.model_spec.num_classes))
    stacked = np.stack(logits)
    scores = {
        name: round(float((t.argmax(1) == subset_y).mean()), 4)
        for name, t in teachers(stacked, np.stack(counts).astype(np.float32)).items()
    }
    scores["best_client"] = round(float(max((z.argmax(1) == subset_y).mean() for z in stacked)), 4)
    print(f"{config} seed {seed}: {scores}", flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="shards", choices=sorted(MODES["full"]["study"]))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    per_seed = {str(s): one_seed(args.config, s) for s in args.seeds}
    out = ROOT / "benchmarks" / "results" / "lab" / f"teacher-{args.config}.json"
    out.write_text(json.dumps({"config": args.config, "per_seed": per_seed}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
