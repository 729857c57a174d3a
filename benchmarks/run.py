"""flwr-kd benchmarks: accuracy over seeds against the baselines, and where the time goes.

    python benchmarks/run.py --mode quick   # digits, minutes   (make bench-quick)
    python benchmarks/run.py --mode full    # Fashion-MNIST     (make bench)
    python benchmarks/run.py --mode quick --sections evidence --seeds 2 --rounds 1   # a smoke

The `evidence` section is the seeded accuracy study (benchmarks/evidence.py, configured by each
mode's `study`); its runs are kept and reused, so an interrupted bench resumes.

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
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORES = os.cpu_count() or 1


def study(paper_regime_flags: list[str], early_stopping: bool = False) -> dict:
    """The seeded accuracy study (benchmarks/evidence.py): per configuration, the flags that
    set its data (after the mode's own), its methods as [strategy, *flags], and the paired
    comparisons that make headline keys, as {key: [method a, method b]} (a - b per seed).
    `early_stopping` adds FedDF with the paper's early stopping at alpha 0.1 (3 runs per seed;
    left out of both modes for their time budgets)."""
    # FedMD first: its runs are the cheapest per seed to learn from when a study is cut short
    configs = {
        "same_distribution": {  # FedMD with its public set cut from the private task's pool
            "flags": ["--partitioner", "dirichlet", "--alpha", "0.5"],
            "methods": {"fedmd": ["fedmd"]},
            "paired": {"fedmd_minus_transfer_only_same_distribution": ["fedmd", "transfer_only"]},
        },
        "paper_regime": {  # FedMD's own: public data from another task, small private data
            "flags": paper_regime_flags,
            "methods": {"fedmd": ["fedmd"]},
            "paired": {"fedmd_minus_transfer_only_paper_regime": ["fedmd", "transfer_only"]},
        },
        "alpha0.1": {
            "flags": ["--partitioner", "dirichlet", "--alpha", "0.1"],
            "methods": {
                "feddf": ["feddf"],
                "fedavg": ["fedavg"],
                "feddf_plain": ["feddf", "-c", "distill-selection=last"],
                "feddf_early_stopping": ["feddf", "-c", "distill-selection=best"],
            },
            "paired": {
                "feddf_minus_fedavg_alpha0.1": ["feddf", "fedavg"],
                "feddf_defaults_minus_plain": ["feddf", "feddf_plain"],
                "feddf_defaults_minus_early_stopping": ["feddf", "feddf_early_stopping"],
            },
        },
        "shards": {
            "flags": ["--partitioner", "shard", "-c", "shards-per-client=2"],
            "methods": {"feddf": ["feddf"], "fedavg": ["fedavg"]},
            "paired": {"feddf_minus_fedavg_shards": ["feddf", "fedavg"]},
        },
    }
    if not early_stopping:
        configs["alpha0.1"]["methods"].pop("feddf_early_stopping")
        configs["alpha0.1"]["paired"].pop("feddf_defaults_minus_early_stopping")
    return configs


def _c(*pairs: str) -> list[str]:
    """`-c KEY=VALUE` for each pair."""
    return [flag for kv in pairs for flag in ("-c", kv)]


#: Both modes' zoo: flwr-kd's default (`flwr_kd.models.DEFAULT_ARCHITECTURES`) with timm's small
#: ResNet, test_resnet (0.37M parameters), in place of resnet10t (4.9M). On one thread resnet10t
#: was over half of a training step of the three (62 of 119 ms at batch 16, 145 of 252 at 64;
#: test_resnet 23 and 58, results/full/cpu_kernels.json): with it, make bench took 1 h 43 min on
#: 2 cores, with test_resnet 57 min (docs/evidence-lab.md, "What it costs").
STUDY_ARCHS = "test_resnet,mobilenetv3_small_050,test_vit"
#: Quick mode's sections: the emulated serverless stack and its soak are `make test`'s too,
#: and the scale runs have one fixed config (benchmarks/scale.py), so full mode measures those.
QUICK_SECTIONS = "evidence,client_round,communication,aggregation,pretrain,cpu_kernels"
MODES = {
    "quick": {
        "dataset": "digits",
        "clients": 6,
        "seeds": 3,
        "rounds": 3,
        "archs": STUDY_ARCHS,
        # sized for make bench-quick's 10 minutes on 2 cores: a smoke of every figure, whose
        # differences are noise at these sizes (docs/evidence-lab.md)
        "extra": _c(
            "local-epochs=1",
            "distill-steps=20",
            "subset-size=200",
            "pretrain-epochs=2",
            "finetune-epochs=2",
            "digest-epochs=1",
        ),
        "study": study(
            [
                *("--dataset", "fashion-mnist", "--partitioner", "dirichlet", "--alpha", "0.5"),
                *_c("public-classes-from=5", "public-fraction=0.02", "max-private=300"),
                *_c("max-test=500", "revisit-lr=0.001"),
            ]
        ),
        "aggregation": {"subset": 440, "steps": 30, "clients": [6, 12]},
        "emulate_rounds": 1,
        "emulate_clients": 3,
        "soak_rounds": 10,
        "sections": QUICK_SECTIONS,
        "bounds": False,  # 3.5 more minutes: `--sections bounds` adds them to the stored study
    },
    "full": {
        "dataset": "fashion-mnist",
        "clients": 10,
        "seeds": 3,
        "rounds": 5,
        "archs": STUDY_ARCHS,
        # Where distillation pays (paired lab sweep, 3 seeds, docs/evidence-lab.md): clients
        # train flwr-kd's default 5 local epochs, FedDF distils 200 steps, FedMD digests 3
        # epochs. At 2 local epochs, 60 steps and 1 digest epoch every method stayed near its
        # start and the differences were noise, or negative.
        "extra": _c(
            "max-private=1500",
            "max-test=1000",
            "local-epochs=5",
            "distill-steps=200",
            "subset-size=500",
            "public-fraction=0.05",
            "pretrain-epochs=2",
            "finetune-epochs=5",
            "digest-epochs=3",
        ),
        # FedMD's paper regime: Fashion-MNIST classes 5-9 are the public task (10% of them),
        # classes 0-4 the private one, 60 samples per client on average. Revisiting at lr 1e-3:
        # with 48 training samples a client's revisit epoch is 3 Adam steps, which at the
        # default 1e-4 left the rounds to the digest alone (paired A/B, docs/evidence-lab.md)
        "study": study(
            [
                *("--partitioner", "dirichlet", "--alpha", "0.5"),
                *_c("public-classes-from=5", "public-fraction=0.1", "max-private=600"),
                *_c("revisit-lr=0.001"),
            ],
        ),
        "aggregation": {"subset": 2000, "steps": 60, "clients": [10, 25, 50]},
        "emulate_rounds": 2,
        "emulate_clients": 4,
        "soak_rounds": 50,
        "sections": f"{QUICK_SECTIONS},serverless,soak,scale",
    },
}


#: Headline keys of earlier benchmarks, dropped from summary.json when the evidence is rerun:
#: one seed's difference, and FedMD against a local-only baseline without the public labels.
OBSOLETE_KEYS = ("feddf_minus_fedavg_alpha0.1", "fedmd_minus_local_only")


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


#: How a run's clients are executed: `flwr-kd simulate` on Ray, or the same arguments on an
#: in-process grid without Ray's start-up (benchmarks/inprocess.py).
ENGINES = {
    "ray": ["-m", "flwr_kd.cli"],
    "inprocess": [str(ROOT / "benchmarks" / "inprocess.py")],
}


def flwr_kd(
    args: list[str], out: Path, memory: bool = False, engine: str = "ray", threads: int = 0
) -> tuple[dict, dict]:
    """Run `flwr-kd ...` in a subprocess (Ray starts and stops cleanly each time) on `engine`,
    with `threads` torch threads (0: torch's default); returns (result.json, memory peaks)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, *ENGINES[engine], *args, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    print("$", " ".join(args), f"({engine})", flush=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
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


def _extra_config(mode: dict) -> dict:
    extra = mode["extra"]
    pairs = [extra[i + 1] for i in range(0, len(extra), 2) if extra[i] == "-c"]
    out = {}
    for kv in pairs:
        k, v = kv.split("=", 1)
        out[k] = v
    return out


def timing_section(run_out: Path, out: Path) -> dict:
    """Where a FedDF round's time goes, and the framework overhead over the critical path, in
    one stored run of the study (`run_out`). The clients' part of the critical path depends on
    the run's engine: Ray's actors train side by side, the in-process grid one client after
    another (benchmarks/inprocess.py), so there it is their sum. Distillation fans out to one
    process per architecture on either engine."""
    result = json.loads((run_out / "result.json").read_text())
    engine = json.loads((run_out / "args.json").read_text())["key"].get("engine", "ray")
    rounds = []
    for r in result["rounds"][1:]:  # round 1 includes Ray and worker start-up
        compute = r.get("client_compute") or []
        distill = [d["seconds"] + d["teacher_seconds"] for d in r["distill"].values()]
        if engine == "inprocess":
            client_path = float(sum(compute))
        else:
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
    overheads = [r["overhead"] for r in rounds if r["overhead"]]
    clients = (
        "the clients' compute summed (the in-process grid runs them one after another)"
        if engine == "inprocess"
        else "max(longest client, total client compute / cores)"
    )
    data = {
        "run": str(run_out.relative_to(out / "runs")),
        "engine": engine,
        "cores": CORES,
        "rounds": rounds,
        "framework_overhead": round(float(np.mean(overheads)), 3) if overheads else None,
        "note": (
            f"critical path on this machine's {CORES} cores: {clients}, plus FedAvg, plus "
            "max(longest distillation, total distillation / cores)"
        ),
    }
    save(out, "timing", data)
    return data


def aggregation_section(mode: dict, out: Path) -> dict:
    """FedDF aggregation: teacher logits from the clients vs every aggregator evaluating all
    client models (the seed system), at each client count of `mode["aggregation"]["clients"]`,
    side by side; and the k architecture tasks in parallel vs one after another."""
    from flwr_kd.data import DataSpec, load_federated
    from flwr_kd.distill import DistillConfig, average_logits
    from flwr_kd.fanout import ProcessFanOut
    from flwr_kd.models import create_model, state_to_numpy
    from flwr_kd.tasks import DistillTask, run_distill_task, teacher_from_models

    cfg = mode["aggregation"]
    archs = mode["archs"].split(",")
    data = load_federated(DataSpec(dataset=mode["dataset"], num_partitions=10, alpha=0.5))
    x = data.public_x[: cfg["subset"]]
    initial = {a: state_to_numpy(create_model(a, data.model_spec)) for a in archs}
    dc = DistillConfig(steps=cfg["steps"], selection="last")  # fixed work, no validation

    def tasks(clients: list, teacher, server_side: bool) -> list:
        return [
            DistillTask(
                *(arch, data.model_spec, dict(initial[arch]), x, data.val_x, data.val_y, dc),
                teacher_logits=None if server_side else teacher,
                teacher_models=clients if server_side else [],
                seed=i,
            )
            for i, arch in enumerate(archs)
        ]

    def timed(fanout, work) -> float:
        t0 = time.perf_counter()
        fanout.map(run_distill_task, work)
        return round(time.perf_counter() - t0, 3)

    curve, teacher = {}, None
    # "serial" is one worker process running the k tasks one after another with all the cores'
    # threads; "parallel" is k workers with one thread each: the same kind of process either way.
    with ProcessFanOut() as parallel, ProcessFanOut(max_workers=1) as serial:
        for n in cfg["clients"]:
            clients = [(archs[i % len(archs)], initial[archs[i % len(archs)]]) for i in range(n)]
            teacher = teacher_from_models(clients, data.model_spec, x)  # the clients' part
            if not curve:  # start the workers before timing
                for fanout in (parallel, serial):
                    fanout.map(run_distill_task, tasks(clients, teacher, False)[:2])
            curve[n] = {
                "clients_parallel": timed(parallel, tasks(clients, teacher, False)),
                "server_parallel": timed(parallel, tasks(clients, teacher, True)),
            }
            curve[n]["speedup"] = round(
                curve[n]["server_parallel"] / curve[n]["clients_parallel"], 3
            )
            if len(curve) == 1:  # the fan-out's speedup, right beside its parallel figure
                curve[n]["clients_serial"] = timed(serial, tasks(clients, teacher, False))
        first = curve[cfg["clients"][0]]
    data_out = {
        "subset": cfg["subset"],
        "clients": cfg["clients"],
        "architectures": archs,
        "distill_steps": cfg["steps"],
        "seconds": first,
        "curve": {str(n): c for n, c in curve.items()},
        **{f"aggregation_speedup_n{n}": c["speedup"] for n, c in curve.items()},
        "aggregation_speedup_client_logits": first["speedup"],
        "fanout_speedup": round(first["clients_serial"] / first["clients_parallel"], 3),
        "teacher_logits_bytes_float16": int(average_logits([teacher]).astype(np.float16).nbytes),
    }
    save(out, "aggregation", data_out)
    return data_out


def study_clients(mode: dict, config: str, method: str = "feddf", seed: int = 0):
    """One study run (benchmarks/evidence.py): its ExperimentConfig, the indices of its round-1
    public subset, its FederatedData, and per client (partition, architecture, ClientData): the
    split as the run's clients load it."""
    from evidence import study_args
    from flwr.app import ConfigRecord, Context, RecordDict

    from flwr_kd.cli import _parser, config_from_args
    from flwr_kd.client.node import load_split_partition
    from flwr_kd.data import load_federated
    from flwr_kd.strategy.base import public_subset

    cfg = config_from_args(_parser().parse_args(study_args(mode, config, method, seed)))
    spec = cfg.data_spec.to_config()
    federated = load_federated(cfg.data_spec)
    subset = public_subset(len(federated.public_x), cfg.subset_size, cfg.seed, 1)

    def clients():
        for partition in range(cfg.num_clients):
            context = Context(1, partition, {"partition-id": partition}, RecordDict(), {})
            data = load_split_partition(context, ConfigRecord(dict(spec)))
            yield partition, cfg.arch_of_partition(partition), data

    return cfg, subset, federated, clients()


def client_round_section(mode: dict, out: Path, repeats: int = 3) -> dict:
    """A FedDF client's round against a FedAvg client's, side by side: every client of the
    study's cost configuration (seed 0's split) trains its local epochs from its architecture's
    initial weights, then computes its logits on the round's public subset, `repeats` times.
    FedAvg's round is the training; FedDF's is the training and the logits (decoding the
    subset's indices and packing float16 cost microseconds), as the train handler runs them, on
    one thread. The ratio of the round's summed medians, and per architecture."""
    import torch
    from evidence import COST_CONFIG

    from flwr_kd.client.handlers import train_private
    from flwr_kd.models import create_model, load_numpy_state, state_to_numpy
    from flwr_kd.training import predict_logits

    torch.set_num_threads(1)
    cfg, idx, federated, clients = study_clients(mode, COST_CONFIG)
    subset = federated.public_x[idx]
    settings, device = cfg.train_config, cfg.device_config
    per_arch: dict[str, dict] = {}
    samples = 0
    for _, arch, data in clients:
        samples += len(data.train_x)
        start = state_to_numpy(create_model(arch, data.model_spec))
        train_s, logits_s = [], []
        for r in range(repeats):
            model = create_model(arch, data.model_spec)
            load_numpy_state(model, start)
            t0 = time.perf_counter()
            train_private(model, data, settings.local_epochs, settings, r, device)
            t1 = time.perf_counter()
            predict_logits(model, subset, device)
            train_s.append(t1 - t0)
            logits_s.append(time.perf_counter() - t1)
        arch_sums = per_arch.setdefault(arch, {"train_seconds": 0.0, "logits_seconds": 0.0})
        arch_sums["train_seconds"] += float(np.median(train_s))
        arch_sums["logits_seconds"] += float(np.median(logits_s))
    for arch_sums in per_arch.values():
        train, logits = arch_sums["train_seconds"], arch_sums["logits_seconds"]
        arch_sums.update(
            train_seconds=round(train, 3),
            logits_seconds=round(logits, 3),
            feddf_over_fedavg=round((train + logits) / train, 4),
        )
    train = sum(a["train_seconds"] for a in per_arch.values())
    logits = sum(a["logits_seconds"] for a in per_arch.values())
    result = {
        "config": f"{COST_CONFIG}, seed 0: {cfg.num_clients} clients, {samples} training "
        f"samples in all, {settings.local_epochs} local epochs at batch {settings.batch_size}, "
        f"logits on a subset of {len(subset)}",
        "repeats": repeats,
        "per_arch": per_arch,
        "feddf_client_round_over_fedavg": round((train + logits) / train, 4),
    }
    print(f"client round: {result}", flush=True)
    save(out, "client_round", result)
    return result


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


def communication_section(mode: dict, out: Path) -> dict:
    """Bytes per client per round (both directions) in the study's seed-0 runs, and float16
    vs float32 logits (one more FedDF run, beside the study's)."""
    from evidence import (
        COST_CONFIG,
        FEDMD_FALLBACK_CONFIG,
        cached_run,
        code_fingerprint,
        float32_logits_run,
        study_result,
    )

    runs = {s: study_result(out, COST_CONFIG, s) for s in ("feddf", "fedmd", "fedavg")}
    fedmd_config = COST_CONFIG if runs["fedmd"] is not None else FEDMD_FALLBACK_CONFIG
    runs["fedmd"] = runs["fedmd"] or study_result(out, fedmd_config, "fedmd")
    missing = [s for s, r in runs.items() if r is None]
    if missing:
        raise RuntimeError(
            f"communication needs the study's seed-0 runs of {missing}: run the "
            "evidence section first"
        )
    per_strategy = {}
    for s, r in runs.items():
        rows = r["rounds"]
        per_strategy[s] = {
            "down_per_client": int(
                np.mean([x["bytes"]["down"] / max(1, x["replies"]) for x in rows])
            ),
            "up_per_client": int(np.mean([x["bytes"]["up"] / max(1, x["replies"]) for x in rows])),
        }
    [(folder, args)] = float32_logits_run(mode).items()
    f32, _ = cached_run(  # made beside the study's runs, on their engine, when it ran
        args, out / "runs" / folder, code_fingerprint(), engine=mode.get("engine", "ray")
    )
    f16 = runs["feddf"]
    data_out = {
        "config": COST_CONFIG,
        "fedmd_config": fedmd_config,
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


def soak_section(mode: dict, out: Path, beside: str = "") -> dict:
    """Many tiny FedDF rounds on the emulated stack with 30% of client calls failing (every
    failure kind); afterwards the run's records must be complete (`flwr-kd cloud audit`) and
    the final models must load and evaluate. `beside` names the work it shared the cores with,
    if any (its `seconds` then include that share)."""
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
        **({"beside": beside} if beside else {}),
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
        "--sections",
        help="comma-separated (default: the mode's `sections`); `bounds` alone computes the "
        "stored study's centralized bounds, `timing` reads the stored study's timing run",
    )
    parser.add_argument("--seeds", type=int, help="seeds per configuration (default: the mode's)")
    parser.add_argument("--rounds", type=int, help="rounds per run (default: the mode's)")
    parser.add_argument(
        "--engine",
        choices=sorted(ENGINES),
        default="ray",
        help="the study's runs on Ray (as users run them) or in-process (no Ray start-up)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="study runs side by side (cores or a GPU to spare)"
    )
    parser.add_argument("--device", help="the study runs' --device (default: flwr-kd's auto)")
    parser.add_argument(
        "--no-bounds",
        action="store_true",
        help="leave the study's centralized bounds out, as quick mode does (one training per "
        "architecture, seed and data regime; `--sections bounds` adds them to the study's "
        "evidence.json later)",
    )
    parser.add_argument(
        "--reuse-code",
        action="append",
        default=[],
        metavar="FINGERPRINT",
        help="also reuse the study's stored runs made by this earlier flwr_kd source fingerprint "
        "(only after showing that it gives the same results); evidence.json lists them",
    )
    args = parser.parse_args()
    if args.workers < 1 or (args.workers > 1 and args.engine != "inprocess"):
        parser.error("--workers N > 1 needs --engine inprocess (Ray runs take every core)")
    mode = dict(
        MODES[args.mode],
        engine=args.engine,
        workers=args.workers,
        bounds=MODES[args.mode].get("bounds", True) and not args.no_bounds,
        reuse_codes=args.reuse_code,
    )
    for key in ("seeds", "rounds"):  # smaller smoke runs of a mode
        if getattr(args, key):
            mode[key] = getattr(args, key)
    if args.device:
        mode["extra"] = [*mode["extra"], "--device", args.device]
    out = ROOT / "benchmarks" / "results" / args.mode
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_KD_CACHE", str(out / ".cache"))
    sections = (args.sections or mode["sections"]).split(",")
    t0 = time.perf_counter()
    previous = out / "summary.json"  # a run of some sections updates the others' figures
    summary: dict = {
        **(json.loads(previous.read_text()) if previous.exists() else {}),
        "mode": args.mode,
        "cores": CORES,
    }
    beside = ThreadPoolExecutor(1)  # the soak, while the study's bounds train
    soak_started: list[Future] = []
    if "evidence" in sections:
        from evidence import evidence_section, float32_logits_run, study_memory

        def soak_beside_bounds() -> None:
            """The soak mostly waits on its emulators, functions and injected hangs, and no
            figure of it is a timing: it runs while the bounds train, not after them."""
            if "soak" in sections:
                soak_started.append(
                    beside.submit(soak_section, mode, out, "the centralized bounds")
                )

        for key in OBSOLETE_KEYS:
            summary.pop(key, None)
        extra = float32_logits_run(mode) if "communication" in sections else {}
        summary.update(evidence_section(mode, out, extra, soak_beside_bounds))
        for future in soak_started:  # done before the sections whose figures are timings
            future.result()
        summary["peak_memory_mib"] = study_memory(out).get("peak_total_mib")
    elif "bounds" in sections:  # the stored study's centralized bounds, without its runs
        from evidence import bounds_section

        bounds_section(mode, out)
    if "evidence" in sections or "timing" in sections:  # `timing` alone: of the stored run
        from evidence import COST_CONFIG, run_dir

        timing = timing_section(run_dir(out, COST_CONFIG, "feddf", 0), out)
        summary["framework_overhead"] = timing["framework_overhead"]
    if "client_round" in sections:  # after the study: its figure from the runs is noisier
        client = client_round_section(mode, out)
        summary["feddf_client_round_over_fedavg"] = client["feddf_client_round_over_fedavg"]
    if "communication" in sections:
        communication_section(mode, out)
    if "aggregation" in sections:
        agg = aggregation_section(mode, out)
        summary["aggregation_speedup_client_logits"] = agg["aggregation_speedup_client_logits"]
        summary["fanout_speedup"] = agg["fanout_speedup"]
        summary.update({k: v for k, v in agg.items() if k.startswith("aggregation_speedup_n")})
    if "pretrain" in sections:
        summary["pretrain_speedup"] = pretrain_section(mode, out)["pretrain_speedup"]
    if "cpu_kernels" in sections:  # benchmarks/cpu_kernels.py: a training step, three ways
        from cpu_kernels import cpu_kernels_section

        kernels = cpu_kernels_section(mode, out)
        summary.update({k: v for k, v in kernels.items() if k.startswith("cpu_step_speedup")})
    if "serverless" in sections:
        serverless_section(mode, out)
    if "soak" in sections:
        soak = soak_started[0].result() if soak_started else soak_section(mode, out)
        summary["soak_rounds_done"] = f"{soak['rounds_done']}/{soak['rounds']}"
        summary["soak_faults_injected"] = soak["reliability"]["injected_total"]
        summary["soak_audit_problems"] = len(soak["audit_problems"])
    beside.shutdown()
    if "scale" in sections:  # benchmarks/scale.py: its own fixed config, in any mode
        from scale import scale_section

        scale = scale_section(ROOT / "benchmarks" / "results" / "scale")  # one place, any mode
        summary.update({k: v for k, v in scale.items() if k.startswith("scale_")})
    whole = set(sections) >= {"evidence", "aggregation", "pretrain"}
    if whole:  # one time for the whole run: earlier runs' section times no longer apply
        summary = {k: v for k, v in summary.items() if not k.startswith("seconds_")}
    if not whole and "evidence" in sections:
        summary.pop("seconds", None)  # an earlier whole run's time no longer fits the figures
    summary["seconds" if whole else f"seconds_{'_'.join(sections)}"] = round(
        time.perf_counter() - t0, 1
    )
    save(out, "summary", summary)
    if args.mode == "full":
        save(ROOT / "benchmarks" / "results", "summary", summary)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report import write

    print(json.dumps(summary, indent=2))
    print(f"wrote {write(args.mode)}")


if __name__ == "__main__":
    main()
