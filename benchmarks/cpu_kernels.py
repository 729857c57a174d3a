"""Why flwr-kd trains the way it does on a CPU: one training step of each architecture of a
benchmark mode (and of flwr-kd's default zoo, which the study's smaller ResNet stands in for),
on one thread, side by side in one process.

    python benchmarks/cpu_kernels.py            # full mode's architectures at 28x28
    python benchmarks/run.py --mode full --sections cpu_kernels

Three ways to run the same step (cross-entropy, forward, backward, Adam):

- `adam_nchw`: `torch.optim.Adam`'s default per-parameter loop, NCHW activations (flwr-kd
  before 2026-12: the baseline);
- `fused_nchw`: Adam's fused kernel, NCHW;
- `flwr_kd`: what `flwr_kd.devices.run_on` and `Compute.adam` pick: the fused kernel, and
  channels-last activations for models with depthwise convolutions.

At the batch sizes of private training (16) and of distillation (64), in interleaved blocks, so
the machine's noise falls on all three alike; each figure is the median block's ms per step.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr_kd.configs import DeviceConfig
from flwr_kd.data import DataSpec, load_federated
from flwr_kd.devices import run_on
from flwr_kd.models import DEFAULT_ARCHITECTURES, ModelSpec, create_model

VARIANTS = ("adam_nchw", "fused_nchw", "flwr_kd")


def _step_fn(arch: str, spec: ModelSpec, batch: int, variant: str):
    """A closure running one training step of a fresh `arch` model the `variant` way."""
    torch.manual_seed(0)
    model = create_model(arch, spec)
    if variant == "flwr_kd":
        on = run_on(model, DeviceConfig(device="cpu"))
        optimizer = on.adam(model, 1e-3)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=variant == "fused_nchw")
    x = torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size)
    y = torch.randint(0, spec.num_classes, (batch,))
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: oneDNN picks its kernels on the first calls
        step()
    return step


def measure(
    archs: list[str], spec: ModelSpec, batches=(16, 64), blocks=5, steps=5, also=()
) -> dict:
    """ms per step per architecture, batch size and variant, and the speed-ups over `archs`
    together; the architectures of `also` are timed alike but left out of the speed-ups."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_arch: dict = {}
        for arch in dict.fromkeys([*archs, *also]):
            for batch in batches:
                fns = {v: _step_fn(arch, spec, batch, v) for v in VARIANTS}
                times: dict[str, list[float]] = {v: [] for v in VARIANTS}
                for _ in range(blocks):
                    for variant, fn in fns.items():
                        started = time.perf_counter()
                        for _ in range(steps):
                            fn()
                        times[variant].append((time.perf_counter() - started) / steps * 1000)
                per_arch.setdefault(arch, {})[f"batch{batch}"] = {
                    v: round(statistics.median(t), 2) for v, t in times.items()
                }
    finally:
        torch.set_num_threads(threads)
    result: dict = {
        "img_size": spec.img_size,
        "threads": 1,
        "speedups_over": list(archs),
        "ms_per_step": per_arch,
    }
    for batch in batches:
        key = f"batch{batch}"
        total = {v: sum(per_arch[a][key][v] for a in archs) for v in VARIANTS}
        result[f"cpu_step_speedup_b{batch}"] = round(total["adam_nchw"] / total["flwr_kd"], 3)
        result[f"cpu_step_speedup_fused_only_b{batch}"] = round(
            total["adam_nchw"] / total["fused_nchw"], 3
        )
    return result


def cpu_kernels_section(mode: dict, out: Path) -> dict:
    """`measure` for `mode`'s architectures (and flwr-kd's default ones) and dataset, saved as
    cpu_kernels.json."""
    spec = load_federated(DataSpec(dataset=mode["dataset"], num_partitions=2)).model_spec
    # flwr-kd's default zoo beside the mode's: what the study's smaller ResNet saves
    result = measure(mode["archs"].split(","), spec, also=DEFAULT_ARCHITECTURES)
    (out / "cpu_kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    from run import MODES

    target = ROOT / "benchmarks" / "results" / "full"
    target.mkdir(parents=True, exist_ok=True)
    print(json.dumps(cpu_kernels_section(MODES["full"], target), indent=2))
