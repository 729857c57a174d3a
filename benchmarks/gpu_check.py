"""`make gpu-check`: a short FedDF on one NVIDIA GPU that proves every phase ran on it.

    python benchmarks/gpu_check.py              # needs CUDA: about a minute on one GPU
    python benchmarks/gpu_check.py --device cpu --allow-cpu --rounds 1   # the CPU path

FedDF on digits (3 clients, 3 architectures, 2 rounds; the process fan-out, client-side
evaluation and the local-only baseline included) runs on an in-process grid
(`tests/inprocess_grid.py`: real `KDClient` handlers without Ray, so nothing hides the GPU from
the clients), with `FLWR_KD_PHASE_LOG` set: every training, logits, distillation and evaluation
call, here and in the fan-out's worker processes, notes the device of its model
(`flwr_kd.devices.record_phase`). The check fails unless each of these phases ran, and only on
the device asked for. Then the same experiment runs on the CPU, and both runs' samples per
second are printed side by side (compute time summed over calls and processes).

Exit codes: 0 checked, 1 a phase ran elsewhere or not at all, 2 cannot check here (no CUDA).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from flwr_kd.client import KDClient
from flwr_kd.devices import PHASE_LOG_ENV, DeviceError, read_phase_log, resolve_device
from flwr_kd.experiment import ConfigError, ExperimentConfig
from flwr_kd.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("training", "logits", "distillation", "evaluation")
NO_CUDA = "no CUDA device: make gpu-check needs an NVIDIA GPU"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="the device to check (default: cuda)")
    p.add_argument("--allow-cpu", action="store_true", help="check a non-CUDA device (tests)")
    p.add_argument("--no-cpu-run", action="store_true", help="skip the CPU comparison")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--archs", default="resnet10t,mobilenetv3_small_050,test_vit")
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--distill-steps", type=int, default=40)
    p.add_argument("--max-private", type=int, default=0, help="0: all of digits' private pool")
    p.add_argument("--fanout", default="process", help="process (GPU sharing) or serial")
    return p.parse_args(argv)


def experiment(args: argparse.Namespace, device: str) -> ExperimentConfig:
    return ExperimentConfig.from_run_config(
        {
            "strategy": "feddf",
            "dataset": "digits",
            "num-clients": args.clients,
            "num-server-rounds": args.rounds,
            "archs": args.archs,
            "local-epochs": args.local_epochs,
            "distill-steps": args.distill_steps,
            "max-private": args.max_private,
            "fraction-evaluate": 1.0,  # client-side evaluation: a phase to check as well
            "min-replies": 1,
            "fanout": args.fanout,
            "device": device,
        }
    )


def inprocess_grid(num_nodes: int):
    """The strategy tests' in-process grid (tests/inprocess_grid.py) with flwr-kd's client,
    and the run id its messages belong to."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from inprocess_grid import RUN_ID, InProcessGrid

    return InProcessGrid(KDClient().register(ClientApp()), num_nodes), RUN_ID


@contextmanager
def server_side_run(run_id: int, log_path: Path):
    """What Flower's runtime sets before a ServerApp runs (the task identity), and the phase
    log in the environment that the fan-out's workers inherit; both restored after."""
    saved_identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    saved_log = os.environ.get(PHASE_LOG_ENV)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    os.environ[PHASE_LOG_ENV] = str(log_path)
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved_identity
        if saved_log is None:
            os.environ.pop(PHASE_LOG_ENV, None)
        else:
            os.environ[PHASE_LOG_ENV] = saved_log


def run(cfg: ExperimentConfig, log_path: Path) -> tuple[dict, float]:
    """The experiment on an in-process grid: its phase log and wall time."""
    print(f"\n== FedDF on {cfg.device}", flush=True)
    grid, run_id = inprocess_grid(cfg.num_clients)
    with server_side_run(run_id, log_path):
        t0 = time.perf_counter()
        run_experiment(grid, cfg)
        seconds = time.perf_counter() - t0
    return read_phase_log(log_path), seconds


def problems(phases: dict, device_type: str) -> list[str]:
    """Why the phase log does not show every phase on `device_type` alone."""
    found = []
    for phase in PHASES:
        devices = phases.get(phase, {})
        elsewhere = sorted(d for d in devices if torch.device(d).type != device_type)
        if not devices:
            found.append(f"{phase}: never ran")
        elif elsewhere:
            found.append(f"{phase}: ran on {', '.join(elsewhere)} too")
    return found


def throughput(by_device: dict) -> tuple[int, float]:
    samples = sum(s for s, _ in by_device.values())
    seconds = sum(t for _, t in by_device.values())
    return samples, samples / seconds if seconds > 0 else float("nan")


def print_table(checked: tuple[str, dict, float], baseline: tuple[str, dict, float] | None):
    name, phases, wall = checked
    head = f"{'phase':<14}{'devices':<22}{'samples':>10}{f'{name} samples/s':>20}"
    if baseline is not None:
        head += f"{'cpu samples/s':>16}{'speed-up':>10}"
    print("\n" + head)
    for phase in sorted(phases, key=lambda p: (p not in PHASES, p)):
        samples, rate = throughput(phases[phase])
        row = f"{phase:<14}{', '.join(sorted(phases[phase])):<22}{samples:>10}{rate:>20.0f}"
        if baseline is not None:
            _, cpu_rate = throughput(baseline[1].get(phase, {}))
            speedup = rate / cpu_rate if cpu_rate else float("nan")
            row += f"{cpu_rate:>16.0f}{speedup:>9.1f}x"
        print(row)
    line = f"whole run: {wall:.1f} s on {name}"
    if baseline is not None:
        line += f", {baseline[2]:.1f} s on cpu"
    print(line)


def describe_torch() -> str:
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
        return f"torch {torch.__version__} ({built})"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}: {', '.join(names)}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(describe_torch())
    if not args.allow_cpu and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    try:
        target = resolve_device(args.device)
        cfg = experiment(args, args.device)
    except (DeviceError, ConfigError) as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    if target.type != "cuda" and not args.allow_cpu:
        print(
            f"gpu-check: {args.device} is no CUDA device (--allow-cpu checks it)", file=sys.stderr
        )
        return 2
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="flwr-kd-gpu-check-") as tmp:
        phases, wall = run(cfg, Path(tmp) / f"{target.type}.log")
        baseline = None
        if target.type != "cpu" and not args.no_cpu_run:
            cpu_phases, cpu_wall = run(experiment(args, "cpu"), Path(tmp) / "cpu.log")
            baseline = ("cpu", cpu_phases, cpu_wall)
    print_table((str(target), phases, wall), baseline)
    found = problems(phases, target.type)
    for problem in found:
        print(f"FAIL {problem}", file=sys.stderr)
    if found:
        return 1
    print(f"OK: {', '.join(PHASES)} all ran on {target.type} only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
