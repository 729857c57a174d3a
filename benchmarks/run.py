"""flwr-kd benchmarks: accuracy against the baselines, and where the time goes.

    python benchmarks/run.py --mode quick   # digits, minutes   (make bench-quick)
    python benchmarks/run.py --mode full    # Fashion-MNIST     (make bench)

Each section writes benchmarks/results/<mode>/<section>.json (and PNGs); `summary.json` holds
the headline figures; benchmarks/REPORT.md is rewritten from the results of the full mode.
Ratios are measured side by side in the same run, never against stored numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORES = os.cpu_count() or 1

MODES = {
    "quick": {
        "dataset": "digits",
        "clients": 6,
        "alphas": [0.1, 100.0],
        "rounds": 2,
        "archs": "resnet10t,mobilenetv3_small_050,test_vit",
        "extra": [
            "-c",
            "local-epochs=3",
            "-c",
            "distill-steps=60",
            "-c",
            "pretrain-epochs=10",
            "-c",
            "finetune-epochs=10",
        ],
        "aggregation": {"subset": 440, "steps": 30, "clients": 6},
        "emulate_rounds": 1,
        "emulate_clients": 3,
        "soak_rounds": 10,
    },
    "full": {
        "dataset": "fashion-mnist",
        "clients": 10,
        "alphas": [0.1, 0.5, 100.0],
        "rounds": 4,
        "archs": "resnet10t,mobilenetv3_small_050,test_vit",
        "extra": [
            "-c",
            "max-private=3000",
            "-c",
            "max-test=2000",
            "-c",
            "local-epochs=3",
            "-c",
            "distill-steps=80",
            "-c",
            "subset-size=1000",
            "-c",
            "pretrain-epochs=3",
            "-c",
            "finetune-epochs=5",
            "-c",
            "digest-epochs=2",
            "-c",
            "public-fraction=0.1",
        ],
        "aggregation": {"subset": 3000, "steps": 60, "clients": 10},
        "emulate_rounds": 2,
        "emulate_clients": 4,
        "soak_rounds": 50,
    },
}


# ---------------------------------------------------------------------------- helpers


class MemorySampler:
    """Peak resident memory of a process tree, sampled every 0.2 s (psutil)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak_total = 0
        self.peak_per_process: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                        name = " ".join(p.cmdline()[:3])[-60:] or p.name()
                    except psutil.Error:
                        continue
                    total += rss
                    kind = (
                        "ClientAppActor"
                        if "ClientAppActor" in p.name() or "ray::ClientAppActor" in name
                        else p.name()
                    )
                    self.peak_per_process[kind] = max(self.peak_per_process.get(kind, 0), rss)
                self.peak_total = max(self.peak_total, total)
            except psutil.Error:
                pass
            time.sleep(0.2)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        mib = 1 / (1024 * 1024)
        return {
            "peak_total_mib": round(self.peak_total * mib, 1),
            "peak_per_process_mib": {
                k: round(v * mib, 1) for k, v in sorted(self.peak_per_process.items())
            },
        }


def simulate_args(mode: dict, strategy: str, alpha: float, *flags: str) -> list[str]:
    """`flwr-kd simulate` arguments for one run of `mode` (flags before the mode's `-c`s)."""
    return [
        "simulate",
        *("--strategy", strategy, "--dataset", mode["dataset"]),
        *("--clients", str(mode["clients"]), "--alpha", str(alpha)),
        *("--rounds", str(mode["rounds"]), "--archs", mode["archs"]),
        *flags,
        *mode["extra"],
    ]


def flwr_kd(args: list[str], out: Path, memory: bool = False) -> tuple[dict, dict]:
    """Run `flwr-kd ...` in a subprocess (Ray starts and stops cleanly each time); returns
    (result.json, memory peaks)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "flwr_kd.cli", *args, "--out", str(out)]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        sampler = MemorySampler(proc.pid) if memory else None
        rc = proc.wait()
        mem = sampler.stop() if sampler else {}
    if rc != 0:
        raise RuntimeError(f"{' '.join(args)} failed with exit code {rc}; see {out / 'log.txt'}")
    result = json.loads((out / "result.json").read_text())
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return result, mem


def mean_final(result: dict) -> float:
    return float(np.mean(list(result["rounds"][-1]["accuracy"].values())))


def save(out: Path, name: str, data: dict) -> None:
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------- sections


def accuracy_section(mode: dict, out: Path) -> dict:
    """FedDF, FedMD, FedAvg per group, local-only and centralized; per alpha, same seeds."""
    from flwr_kd.data import load_federated
    from flwr_kd.experiment import ExperimentConfig
    from flwr_kd.fanout import ProcessFanOut
    from flwr_kd.tasks import LocalTrainTask, run_local_train_task

    runs: dict = {}
    memory: dict = {}
    for alpha in mode["alphas"]:
        for strategy in ("feddf", "fedmd", "fedavg"):
            # local-only comes from the FedDF run: same data, same budget
            args = simulate_args(
                mode, strategy, alpha, *([] if strategy == "feddf" else ["--no-baseline"])
            )
            measure_memory = strategy == "feddf" and alpha == mode["alphas"][-1]
            result, mem = flwr_kd(
                args, out / "runs" / f"{strategy}-alpha{alpha}", memory=measure_memory
            )
            runs[f"{strategy}/{alpha}"] = result
            if mem:
                memory = mem
    # centralized upper bound: each architecture on the pooled private data
    centralized = {}
    cfg = ExperimentConfig.from_run_config(
        {
            "dataset": mode["dataset"],
            "num-clients": mode["clients"],
            "archs": mode["archs"],
            **_extra_config(mode),
        }
    )
    data = load_federated(cfg.data_spec)
    with ProcessFanOut() as fanout:
        tasks = [
            LocalTrainTask(
                arch,
                data.model_spec,
                data.private_x,
                data.private_y,
                data.test_x,
                data.test_y,
                epochs=cfg.local_budget_epochs,
                batch_size=64,
                seed=0,
            )
            for arch in cfg.arch_list
        ]
        for o in fanout.map(run_local_train_task, tasks):
            centralized[o.arch] = round(o.accuracy, 4)
    table = {}
    for alpha in mode["alphas"]:
        feddf = runs[f"feddf/{alpha}"]
        row = {
            s: runs[f"{s}/{alpha}"]["rounds"][-1]["accuracy"] for s in ("feddf", "fedmd", "fedavg")
        }
        row["local_only"] = feddf["baselines"]["local_only"]
        row["transfer_only"] = runs[f"fedmd/{alpha}"]["baselines"].get("transfer_only", {})
        row["centralized"] = centralized
        row["mean"] = {k: round(float(np.mean(list(v.values()))), 4) for k, v in row.items() if v}
        row["curves"] = {
            s: [r["mean_accuracy"] for r in runs[f"{s}/{alpha}"]["rounds"]]
            for s in ("feddf", "fedmd", "fedavg")
        }
        table[str(alpha)] = row
    data_out = {
        "config": {k: v for k, v in mode.items() if k != "aggregation"},
        "alphas": table,
        "memory": memory,
    }
    save(out, "accuracy", data_out)
    _plot_accuracy(table, out / "accuracy.png")
    return {"runs": runs, "table": table, "memory": memory}


def _extra_config(mode: dict) -> dict:
    extra = mode["extra"]
    pairs = [extra[i + 1] for i in range(0, len(extra), 2) if extra[i] == "-c"]
    out = {}
    for kv in pairs:
        k, v = kv.split("=", 1)
        out[k] = v
    return out


def _plot_accuracy(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = list(table)
    fig, axes = plt.subplots(1, len(alphas) + 1, figsize=(4.2 * (len(alphas) + 1), 3.8), dpi=110)
    for ax, alpha in zip(axes, alphas):
        for s, color in (("feddf", "C0"), ("fedmd", "C1"), ("fedavg", "C2")):
            curve = table[alpha]["curves"][s]
            ax.plot(range(1, len(curve) + 1), curve, "o-", color=color, label=s)
        for name, style in (("local_only", "--"), ("centralized", ":")):
            ax.axhline(
                table[alpha]["mean"][name], ls=style, color="gray", label=name.replace("_", "-")
            )
        ax.set(title=f"alpha={alpha}", xlabel="round", ylabel="mean test accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    names = ["local_only", "fedavg", "fedmd", "feddf", "centralized"]
    width = 0.8 / len(alphas)
    for i, alpha in enumerate(alphas):
        ax.bar(
            np.arange(len(names)) + i * width,
            [table[alpha]["mean"].get(n, 0) for n in names],
            width,
            label=f"alpha={alpha}",
        )
    ax.set_xticks(
        np.arange(len(names)) + width * (len(alphas) - 1) / 2, names, rotation=30, fontsize=8
    )
    ax.set(title="final mean accuracy", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def timing_section(acc: dict, mode: dict, out: Path) -> dict:
    """Where a FedDF round's time goes, and the framework overhead over the critical path."""
    alpha = mode["alphas"][len(mode["alphas"]) // 2]
    result = acc["runs"][f"feddf/{alpha}"]
    rounds = []
    for r in result["rounds"][1:]:  # round 1 includes Ray and worker start-up
        compute = r.get("client_compute") or []
        distill = [d["seconds"] + d["teacher_seconds"] for d in r["distill"].values()]
        client_path = max(max(compute, default=0), sum(compute) / CORES)
        distill_path = max(max(distill, default=0), sum(distill) / CORES)
        critical = client_path + r["time"].get("fedavg", 0) + distill_path
        rounds.append(
            {
                "round": r["round"],
                "wall": r["seconds"],
                "client_compute_sum": round(sum(compute), 3),
                "client_critical_path": round(client_path, 3),
                "fedavg": r["time"].get("fedavg", 0),
                "distill_critical_path": round(distill_path, 3),
                "evaluation": r.get("eval_seconds", 0),
                "critical_path": round(critical, 3),
                "overhead": round(r["seconds"] / critical, 3) if critical else None,
            }
        )
    overhead = (
        float(np.mean([r["overhead"] for r in rounds if r["overhead"]])) if rounds else float("nan")
    )
    data = {
        "run": f"feddf alpha={alpha}",
        "cores": CORES,
        "rounds": rounds,
        "framework_overhead": round(overhead, 3),
        "note": (
            "critical path on this machine's cores: max(longest task, total compute / cores) "
            "for clients and for distillation, plus FedAvg"
        ),
    }
    save(out, "timing", data)
    return data


def aggregation_section(mode: dict, out: Path) -> dict:
    """FedDF aggregation: teacher logits from clients vs every aggregator evaluating all client
    models (seed system), and the k architecture tasks in parallel vs one after another."""
    from flwr_kd.data import DataSpec, load_federated
    from flwr_kd.distill import DistillConfig, average_logits
    from flwr_kd.fanout import ProcessFanOut
    from flwr_kd.models import create_model, state_to_numpy
    from flwr_kd.tasks import DistillTask, run_distill_task, teacher_from_models

    cfg = mode["aggregation"]
    archs = mode["archs"].split(",")
    data = load_federated(
        DataSpec(dataset=mode["dataset"], num_partitions=cfg["clients"], alpha=0.5)
    )
    x = data.public_x[: cfg["subset"]]
    clients = []
    for i in range(cfg["clients"]):
        arch = archs[i % len(archs)]
        clients.append((arch, state_to_numpy(create_model(arch, data.model_spec))))
    teacher = teacher_from_models(clients, data.model_spec, x)
    dc = DistillConfig(steps=cfg["steps"], patience=10**9)  # fixed work: no early stop

    def tasks(server_side: bool):
        return [
            DistillTask(
                arch,
                data.model_spec,
                dict(clients[i][1]),
                x,
                data.val_x,
                data.val_y,
                dc,
                teacher_logits=None if server_side else teacher,
                teacher_models=clients if server_side else [],
                seed=i,
            )
            for i, arch in enumerate(archs)
        ]

    timings = {}
    # "serial" is one worker process running the k tasks one after another with all the cores'
    # threads; "parallel" is k workers with one thread each: the same kind of process either way.
    with ProcessFanOut() as parallel, ProcessFanOut(max_workers=1) as serial:
        for fanout in (parallel, serial):  # start the workers before timing
            fanout.map(run_distill_task, tasks(False)[:2])
        for name, fanout, server_side in (
            ("clients_parallel", parallel, False),
            ("server_parallel", parallel, True),
            ("clients_serial", serial, False),
        ):
            t0 = time.perf_counter()
            fanout.map(run_distill_task, tasks(server_side))
            timings[name] = round(time.perf_counter() - t0, 3)
    data_out = {
        "subset": cfg["subset"],
        "clients": cfg["clients"],
        "architectures": archs,
        "distill_steps": cfg["steps"],
        "seconds": timings,
        "aggregation_speedup_client_logits": round(
            timings["server_parallel"] / timings["clients_parallel"], 3
        ),
        "fanout_speedup": round(timings["clients_serial"] / timings["clients_parallel"], 3),
        "teacher_logits_bytes_float16": int(average_logits([teacher]).astype(np.float16).nbytes),
    }
    save(out, "aggregation", data_out)
    return data_out


def pretrain_section(mode: dict, out: Path) -> dict:
    """FedMD transfer learning once per unique architecture (parallel) vs once per client."""
    from flwr_kd.data import DataSpec, load_federated
    from flwr_kd.fanout import ProcessFanOut
    from flwr_kd.models import create_model, state_to_numpy
    from flwr_kd.pretrain import (
        PretrainConfig,
        TransferData,
        per_client_seconds,
        transfer_learning,
    )

    archs = mode["archs"].split(",")
    extra = _extra_config(mode)
    data = load_federated(
        DataSpec(
            dataset=mode["dataset"],
            num_partitions=mode["clients"],
            alpha=0.5,
            public_fraction=float(extra.get("public-fraction", 0.25)),
        )
    )
    pc = PretrainConfig(epochs=max(1, int(extra.get("pretrain-epochs", 20)) // 2))
    initial = {a: state_to_numpy(create_model(a, data.model_spec)) for a in archs}
    client_archs = [archs[i % len(archs)] for i in range(mode["clients"])]
    val = (data.val_x, data.val_y)
    import tempfile

    with ProcessFanOut() as fanout, tempfile.TemporaryDirectory() as cache:
        per_client_seconds(
            client_archs[:2],
            initial,
            TransferData(data.model_spec, data.public_x[:64], data.public_y[:64], *val),
            PretrainConfig(epochs=1),
            fanout,
        )  # start the workers before timing
        _, report = transfer_learning(
            initial,
            TransferData(data.model_spec, data.public_x, data.public_y, *val),
            pc,
            fanout,
            Path(cache),
        )
        per_client = per_client_seconds(
            client_archs,
            initial,
            TransferData(data.model_spec, data.public_x, data.public_y, *val),
            pc,
            fanout,
        )
    data_out = {
        "architectures": archs,
        "clients": mode["clients"],
        "public_samples": len(data.public_x),
        "epochs": pc.epochs,
        "unique_parallel_seconds": round(report.seconds, 2),
        "per_client_seconds": round(per_client, 2),
        "pretrain_speedup": round(per_client / report.seconds, 3),
    }
    save(out, "pretrain", data_out)
    return data_out


def communication_section(acc: dict, mode: dict, out: Path) -> dict:
    """Bytes per client per round (both directions), and float16 vs float32 logits."""
    alpha = mode["alphas"][len(mode["alphas"]) // 2]
    per_strategy = {}
    for s in ("feddf", "fedmd", "fedavg"):
        r = acc["runs"][f"{s}/{alpha}"]
        rows = r["rounds"]
        per_strategy[s] = {
            "down_per_client": int(
                np.mean([x["bytes"]["down"] / max(1, x["replies"]) for x in rows])
            ),
            "up_per_client": int(np.mean([x["bytes"]["up"] / max(1, x["replies"]) for x in rows])),
        }
    args = simulate_args(mode, "feddf", alpha, "--no-baseline", "--logits-dtype", "float32")
    f32, _ = flwr_kd(args, out / "runs" / f"feddf-float32-alpha{alpha}")
    f16 = acc["runs"][f"feddf/{alpha}"]
    data_out = {
        "alpha": alpha,
        "bytes": per_strategy,
        "logits_float16": {
            "mean_accuracy": round(mean_final(f16), 4),
            "up_per_client": per_strategy["feddf"]["up_per_client"],
        },
        "logits_float32": {
            "mean_accuracy": round(mean_final(f32), 4),
            "up_per_client": int(
                np.mean([x["bytes"]["up"] / max(1, x["replies"]) for x in f32["rounds"]])
            ),
        },
    }
    save(out, "communication", data_out)
    return data_out


def serverless_section(mode: dict, out: Path) -> dict:
    """Emulated serverless: round latency, invocations per round, cold vs warm start."""
    import requests

    from flwr_kd.serverless.emulators import FunctionProcess

    results = {}
    for strategy in ("feddf", "fedmd"):
        args = [
            "cloud",
            "emulate",
            "--strategy",
            strategy,
            "--dataset",
            mode["dataset"],
            "--clients",
            str(mode["emulate_clients"]),
            "--rounds",
            str(mode["emulate_rounds"]),
            "--archs",
            mode["archs"],
            "--no-baseline",
            *mode["extra"],
        ]
        r, _ = flwr_kd(args, out / "runs" / f"emulate-{strategy}")
        calls_per_round = {k: v for k, v in r["serverless"]["invocations"].items()}
        results[strategy] = {
            "round_seconds": [x["seconds"] for x in r["rounds"]],
            "client_calls_per_round_per_client": 1,
            "seed_system_calls_per_round_per_client": 3 if strategy == "fedmd" else 1,
            "invocations": calls_per_round,
            "aggregator_calls": len(r["serverless"]["aggregator_calls"]),
        }
    # cold vs warm: a fresh function process (start + import) vs a warm request
    env = {
        **os.environ,
        "FLWR_KD_BUCKET": "b",
        "FLWR_KD_ARCH": "resnet10t",
        "FLWR_KD_CLIENT_ID": "c",
        "FLWR_KD_DATA_PREFIX": "p/",
    }
    t0 = time.perf_counter()
    fn = FunctionProcess(ROOT / "cloud" / "main.py", "client", env, "cold-start")
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(20):
        t1 = time.perf_counter()
        requests.post(fn.url, data=b"{", headers={"Content-Type": "application/json"}, timeout=10)
        warm.append(time.perf_counter() - t1)
    fn.stop()
    results["cold_start_seconds"] = round(cold, 3)
    results["warm_request_seconds_median"] = round(float(np.median(warm)), 4)
    save(out, "serverless", results)
    return results


def soak_section(mode: dict, out: Path) -> dict:
    """Many tiny FedDF rounds on the emulated stack with 30% of client calls failing (every
    failure kind); afterwards the run's records must be complete (`flwr-kd cloud audit`) and
    the final models must load and evaluate."""
    from flwr_kd.cli import _parser, config_from_args
    from flwr_kd.data import load_federated
    from flwr_kd.records import state_to_record
    from flwr_kd.report import ServerTestScore
    from flwr_kd.serverless import names
    from flwr_kd.serverless.arraystore import GcsArrayStore
    from flwr_kd.serverless.audit import audit_run
    from flwr_kd.serverless.emulate import DEFAULT_BUCKET
    from flwr_kd.serverless.emulators import (
        DEFAULT_PROJECT,
        set_env_until_close,
        start_emulators,
    )
    from flwr_kd.serverless.roundstore import RoundStore

    rounds, run = mode["soak_rounds"], f"soak-{int(time.time())}"
    args = [
        "cloud",
        "emulate",
        "--strategy",
        "feddf",
        "--dataset",
        "digits",
        "--clients",
        "6",
        "--rounds",
        str(rounds),
        "--fail-rate",
        "0.3",
        "--local-epochs",
        "1",
        "--distill-steps",
        "5",
        "--no-baseline",
        "--min-replies",
        "1",
        "-c",
        "max-private=120",
        "-c",
        "subset-size=100",
        "-c",
        "fail-hang-seconds=2",
        "--run-id",
        run,
    ]
    logs = out / "runs" / "soak-emulators"
    logs.mkdir(parents=True, exist_ok=True)
    with ExitStack() as emulators:  # the run's records outlive `cloud emulate`, for the audit
        set_env_until_close(emulators, "GOOGLE_CLOUD_PROJECT", DEFAULT_PROJECT)
        start_emulators(emulators, DEFAULT_PROJECT, logs, reuse=False)
        t0 = time.perf_counter()
        result, _ = flwr_kd(args, out / "runs" / "soak")
        seconds = time.perf_counter() - t0
        problems = audit_run(run, RoundStore(), GcsArrayStore(DEFAULT_BUCKET))
        cfg = config_from_args(_parser().parse_args(args))
        data = load_federated(cfg.data_spec)
        final = GcsArrayStore(DEFAULT_BUCKET).get(names.global_object(run, rounds))
        reevaluated = ServerTestScore(cfg.arch_list, data.model_spec, data.test_x, data.test_y)(
            rounds, state_to_record(final)
        )
    rel = result["serverless"]["reliability"]
    results = {
        "command": "flwr-kd " + " ".join(args),
        "rounds": rounds,
        "rounds_done": len(result["rounds"]),
        "seconds": round(seconds, 1),
        "reliability": rel,
        "replies_per_round": [row["replies"] for row in result["rounds"]],
        "left_out": [
            {"round": row["round"], **d} for row in result["rounds"] for d in row["dropped"]
        ],
        "audit_problems": problems,
        "final_accuracy_reported": result["rounds"][-1]["accuracy"],
        "final_accuracy_reloaded": reevaluated,
    }
    save(out, "soak", results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument(
        "--sections", default="accuracy,aggregation,pretrain,communication,serverless,soak,scale"
    )
    args = parser.parse_args()
    mode = MODES[args.mode]
    out = ROOT / "benchmarks" / "results" / args.mode
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_KD_CACHE", str(out / ".cache"))
    sections = args.sections.split(",")
    t0 = time.perf_counter()
    previous = out / "summary.json"  # a run of some sections updates the others' figures
    summary: dict = {
        **(json.loads(previous.read_text()) if previous.exists() else {}),
        "mode": args.mode,
        "cores": CORES,
    }
    if "accuracy" in sections:
        acc = accuracy_section(mode, out)
        table = acc["table"]
        low, mid = str(mode["alphas"][0]), str(mode["alphas"][len(mode["alphas"]) // 2])
        summary[f"feddf_minus_fedavg_alpha{mode['alphas'][0]}"] = round(
            table[low]["mean"]["feddf"] - table[low]["mean"]["fedavg"], 4
        )
        summary["fedmd_minus_local_only"] = round(
            table[mid]["mean"]["fedmd"] - table[mid]["mean"]["local_only"], 4
        )
        summary["framework_overhead"] = timing_section(acc, mode, out)["framework_overhead"]
        summary["peak_memory_mib"] = acc["memory"].get("peak_total_mib")
        if "communication" in sections:
            communication_section(acc, mode, out)
    if "aggregation" in sections:
        agg = aggregation_section(mode, out)
        summary["aggregation_speedup_client_logits"] = agg["aggregation_speedup_client_logits"]
        summary["fanout_speedup"] = agg["fanout_speedup"]
    if "pretrain" in sections:
        summary["pretrain_speedup"] = pretrain_section(mode, out)["pretrain_speedup"]
    if "serverless" in sections:
        serverless_section(mode, out)
    if "soak" in sections:
        soak = soak_section(mode, out)
        summary["soak_rounds_done"] = f"{soak['rounds_done']}/{soak['rounds']}"
        summary["soak_faults_injected"] = soak["reliability"]["injected_total"]
        summary["soak_audit_problems"] = len(soak["audit_problems"])
    if "scale" in sections:  # benchmarks/scale.py: its own fixed config, in any mode
        from scale import scale_section

        scale = scale_section(out / "scale")
        for key in ("scale_round_time_ratio_1000_vs_10", "scale_peak_memory_ratio_1000_vs_10"):
            summary[key] = scale[key]
    summary[
        "seconds"
        if set(sections) >= {"accuracy", "aggregation", "pretrain"}
        else f"seconds_{'_'.join(sections)}"
    ] = round(time.perf_counter() - t0, 1)
    save(out, "summary", summary)
    if args.mode == "full":
        save(ROOT / "benchmarks" / "results", "summary", summary)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report import write

    print(json.dumps(summary, indent=2))
    print(f"wrote {write(args.mode)}")


if __name__ == "__main__":
    main()
