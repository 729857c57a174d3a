"""What users see: a live per-round table, the final summary, `result.json` and `accuracy.png`."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from flwr_kd.configs import DeviceConfig
from flwr_kd.evaluation import score_models
from flwr_kd.models import ModelSpec


class ServerTestScore:
    """Test accuracy of every architecture's global model on the server's test set."""

    def __init__(
        self,
        archs: list[str],
        model_spec: ModelSpec,
        test_x: np.ndarray,
        test_y: np.ndarray,
        device: DeviceConfig | None = None,
        classes: int = 0,
    ):
        self.archs, self.model_spec, self.classes = archs, model_spec, classes
        self.test_x, self.test_y = test_x, test_y
        self.device = device or DeviceConfig()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        test = (self.test_x, self.test_y, self.model_spec, self.archs, self.device, self.classes)
        scores = score_models(arrays, *test)
        return {arch: round(accuracy, 4) for arch, (_, accuracy) in scores.items()}


class RoundRecorder:
    """Flower `evaluate_fn` that scores every architecture with `score(round, arrays)`, times
    each round (the span between two calls) and prints one table row per round."""

    def __init__(
        self,
        archs: list[str],
        score: Callable[[int, ArrayRecord], dict[str, float]],
        out=None,
    ):
        self.archs, self.score, self.out = archs, score, out
        self.rounds: list[dict] = []
        self._last = time.perf_counter()

    def header(self, title: str) -> None:
        cols = "".join(f"{a[:22]:>24}" for a in self.archs)
        print(
            f"\n{title}\n{'round':>5}{cols}{'mean':>8}{'seconds':>9}",
            file=self.out or sys.stdout,
            flush=True,
        )

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        t_eval = time.perf_counter()
        seconds = t_eval - self._last
        acc = self.score(server_round, arrays)
        eval_seconds = time.perf_counter() - t_eval
        mean = float(np.mean(list(acc.values()))) if acc else float("nan")
        seconds = seconds if server_round else 0.0
        self.rounds.append(
            {
                "round": server_round,
                "accuracy": acc,
                "mean_accuracy": round(mean, 4),
                "seconds": round(seconds, 3),
                "eval_seconds": round(eval_seconds, 3),
            }
        )
        cols = "".join(f"{acc.get(a, float('nan')):>24.3f}" for a in self.archs)
        print(
            f"{server_round:>5}{cols}{mean:>8.3f}{seconds:>9.1f}",
            file=self.out or sys.stdout,
            flush=True,
        )
        self._last = time.perf_counter()
        return MetricRecord({"accuracy": mean, **{f"accuracy/{a}": v for a, v in acc.items()}})


def publish_result(result: dict, out_dir: str | Path) -> None:
    """Print the final summary and, with an out_dir, write `result.json` and `accuracy.png`:
    the one place both runtimes report a run."""
    print_summary(result)
    if out_dir:
        path = write_result(out_dir, result)
        print(f"\nwrote {path} and {path.parent / 'accuracy.png'}")


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_result(out_dir: str | Path, result: dict) -> Path:
    """Write `result.json` and `accuracy.png` into out_dir; returns the JSON's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "accuracy.png", lambda f: plot_accuracy(result, f))
    _atomic_write(out / "result.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    return out / "result.json"


def plot_accuracy(result: dict, file) -> None:
    """Test accuracy per architecture per round, with local-only baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in result["rounds"]]
    archs = list(rounds[0]["accuracy"]) if rounds else []
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, arch in enumerate(archs):
        color = f"C{i}"
        ax.plot(
            [r["round"] for r in rounds],
            [r["accuracy"][arch] for r in rounds],
            "o-",
            color=color,
            label=arch,
        )
        for name, style in (("local_only", "--"), ("transfer_only", ":")):
            base = result.get("baselines", {}).get(name, {})
            if arch in base:
                ax.axhline(
                    base[arch],
                    ls=style,
                    color=color,
                    lw=1,
                    label=f"{arch} {name.replace('_', '-')}",
                )
    cfg = result["config"]
    ax.set(
        xlabel="round",
        ylabel="test accuracy",
        ylim=(0, 1),
        title=(
            f"{cfg['strategy']} on {cfg['dataset']}: "
            f"{cfg['num-clients']} clients, alpha={cfg['alpha']}"
        ),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(file, format="png")
    plt.close(fig)


def print_summary(result: dict, out=None) -> None:
    """Final accuracy against the baselines, one line per architecture."""
    out = out or sys.stdout
    final = result["rounds"][-1]["accuracy"]
    baselines = result.get("baselines", {})
    print("\nfinal test accuracy" + "".join(f"  {k}" for k in baselines), file=out)
    for arch, acc in final.items():
        extra = "".join(f"  {baselines[k].get(arch, float('nan')):.3f}" for k in baselines)
        print(f"  {arch:<28}{acc:.3f}{extra}", file=out)
