"""The seeded accuracy study of `make bench`: does distillation pay, over seeds and partitions?

One accuracy figure from one seed proves little (issue 13), so every configuration of the mode's
`study` runs each of its methods over the same seeds (each seed its own split and initial
weights), and differences are paired per seed with a 95% interval (benchmarks/stats.py). A
centralized bound per data regime trains each architecture on all the labelled data any method
sees, for the epochs a client gets. Writes evidence.json, evidence.png and the headline keys.

Each run is `flwr-kd simulate ... --seed S --no-baseline` in a subprocess, in
runs/<config>/<method>/seed<S>. A run is reused when its args.json holds the same arguments and
the same fingerprint of flwr_kd's source: an interrupted bench resumes where it stopped, and a
code change reruns everything, unless `--reuse-code FINGERPRINT` vouches for runs of earlier code
(shown to give bit-identical results); evidence.json then lists which runs each code made.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import CORES, ROOT, flwr_kd, mean_final, save
from stats import paired, slope, summarize

#: The configuration whose feddf/fedavg/fedmd runs (seed 0) the cost figures, the timing and
#: the communication sections read; its feddf seed-0 run is the one whose memory is measured.
COST_CONFIG = "alpha0.1"
#: Where FedMD's seed-0 run is looked for when COST_CONFIG has none.
FEDMD_FALLBACK_CONFIG = "same_distribution"


# ---------------------------------------------------------------------------- runs


def study_args(mode: dict, config: str, method: str, seed: int, *more: str) -> list[str]:
    """`flwr-kd simulate` arguments of one run: the mode's common flags, then the config's, then
    the method's (later flags and `-c` keys override earlier ones), then `more`."""
    strategy, *method_flags = mode["study"][config]["methods"][method]
    return [
        "simulate",
        *("--strategy", strategy, "--dataset", mode["dataset"]),
        *("--clients", str(mode["clients"]), "--rounds", str(mode["rounds"])),
        *("--archs", mode["archs"]),
        *mode["extra"],
        *mode["study"][config]["flags"],
        *method_flags,
        *more,
        *("--seed", str(seed), "--no-baseline"),
    ]


def run_dir(out: Path, config: str, method: str, seed: int) -> Path:
    return out / "runs" / config / method / f"seed{seed}"


def code_fingerprint() -> str:
    """A hash of flwr_kd's source: a stored run is reused only if the code is unchanged."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "flwr_kd").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _stored(run_out: Path, key: dict) -> dict | None:
    """The marker of a finished run made with `key`, or None."""
    marker = run_out / "args.json"
    if not (marker.exists() and (run_out / "result.json").exists()):
        return None
    stored = json.loads(marker.read_text())
    return stored if stored.get("key") == key else None


def cached_run(
    args: list[str],
    run_out: Path,
    code: str,
    memory: bool = False,
    engine: str = "ray",
    threads: int = 0,
    reuse_codes: tuple[str, ...] = (),
) -> tuple:
    """(result.json, reused) of `flwr-kd args` on `engine`, run unless `run_out` holds it
    already, made by `code` or by one of `reuse_codes` (earlier fingerprints the caller vouches
    for); `reused` is the fingerprint of the reused run, "" for a new one. The measured memory
    peaks, if asked for, go to memory.json beside it."""
    for made_by in (code, *reuse_codes):
        key = {"args": args, "code": made_by, **({"engine": engine} if engine != "ray" else {})}
        stored = _stored(run_out, key)
        if stored is not None:
            result = json.loads((run_out / "result.json").read_text())
            result["wall_seconds"] = stored.get("wall_seconds")
            return result, made_by
    key = {"args": args, "code": code, **({"engine": engine} if engine != "ray" else {})}
    (run_out / "args.json").unlink(missing_ok=True)
    result, mem = flwr_kd(args, run_out, memory=memory, engine=engine, threads=threads)
    if mem:
        (run_out / "memory.json").write_text(json.dumps(mem, indent=2))
    marker = {"key": key, "wall_seconds": result["wall_seconds"]}
    (run_out / "args.json").write_text(json.dumps(marker, indent=2))
    return result, ""


def study_result(out: Path, config: str, method: str, seed: int = 0) -> dict | None:
    """A stored run of the study (for the timing and communication sections), or None."""
    path = run_dir(out, config, method, seed) / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def study_memory(out: Path) -> dict:
    """Memory peaks of the one measured run (COST_CONFIG's feddf, seed 0), or {}."""
    path = run_dir(out, COST_CONFIG, "feddf", 0) / "memory.json"
    return json.loads(path.read_text()) if path.exists() else {}


class Progress:
    """One line per finished run: its final mean, its time and the running total."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.lock = threading.Lock()  # runs finish side by side with --workers

    def line(self, what: str, final_mean: float, seconds: float | None, reused: str) -> None:
        with self.lock:
            self.done += 1
            done = self.done
        took = "reused" if reused else f"{seconds:.0f} s"
        elapsed = (time.perf_counter() - self.t0) / 60
        print(
            f"[{done}/{self.total}] {what}: final mean {final_mean:.4f} ({took}); "
            f"total {elapsed:.1f} min",
            flush=True,
        )


# ---------------------------------------------------------------------------- centralized bound


def _labelled_pool(cfg):
    """Everything labelled that some method of `cfg`'s split sees: the private pool, the
    server's (capped) validation set and the labelled public set (FedMD trains on its labels;
    in the paper regime, the other task's, shifted past the private classes)."""
    from flwr_kd.data import load_federated
    from flwr_kd.runner import cap_validation

    data = cap_validation(load_federated(cfg.data_spec), cfg.max_val_fraction)
    x = np.concatenate([data.private_x, data.val_x, data.public_x])
    y = np.concatenate([data.private_y, data.val_y, data.public_y])
    return data, x, y


def data_regimes(mode: dict) -> dict[str, dict]:
    """The study's configs grouped by the labelled data they draw on (the split's pools, not
    how the private pool is partitioned), named after the first: {name: {"configs", "epochs",
    "run"}}. `epochs` is the most private-data epochs a client gets in any of their runs;
    `run` is (config, method) whose arguments build the regime's config."""
    from flwr_kd.cli import _parser, config_from_args

    regimes: dict[str, dict] = {}
    by_pool: dict[str, str] = {}
    for name, config in mode["study"].items():
        for method in config["methods"]:
            cfg = config_from_args(_parser().parse_args(study_args(mode, name, method, 0)))
            spec = cfg.data_spec.to_config()
            for key in ("alpha", "partitioner", "shards-per-client", "classes-per-client"):
                spec.pop(f"data-{key}")
            pool = json.dumps(
                [spec, cfg.max_val_fraction, cfg.batch_size, cfg.lr, cfg.archs], sort_keys=True
            )
            regime = regimes.setdefault(
                by_pool.setdefault(pool, name),
                {"configs": [], "epochs": 0, "run": (name, method)},
            )
            if name not in regime["configs"]:
                regime["configs"].append(name)
            regime["epochs"] = max(regime["epochs"], cfg.local_budget_epochs)
    return regimes


def centralized_bounds(mode: dict, seeds: list[int], out: Path, code: str) -> dict:
    """Per data regime and seed: each architecture trained on the regime's whole labelled pool
    (`_labelled_pool`) for the most epochs a client gets, at the runs' batch size, learning
    rate and seed, on the same test set. Stored per seed like the runs, and reused alike."""
    from flwr_kd.cli import _parser, config_from_args
    from flwr_kd.data import load_federated
    from flwr_kd.fanout import ProcessFanOut
    from flwr_kd.tasks import LocalTrainTask, run_local_train_task

    regimes = data_regimes(mode)
    bounds: dict = {}
    pending: list[tuple[str, int, Path, dict, list]] = []
    for regime, info in regimes.items():
        per_seed: dict = {}
        bounds[regime] = {
            "configs": info["configs"],
            "epochs": info["epochs"],
            "per_seed": per_seed,
        }
        for seed in seeds:
            cfg = config_from_args(_parser().parse_args(study_args(mode, *info["run"], seed)))
            data, x, y = _labelled_pool(cfg)
            bounds[regime].update(batch_size=cfg.batch_size, samples=len(x))
            key = {
                "pool": cfg.data_spec.to_config(),
                "samples": len(x),
                "epochs": info["epochs"],
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "archs": cfg.archs,
                "code": code,
            }
            task_out = out / "runs" / "centralized" / regime / f"seed{seed}"
            stored = _stored(task_out, key)
            if stored is not None:
                per_seed[str(seed)] = stored["bound"]
                continue
            tasks = [
                LocalTrainTask(
                    arch,
                    data.model_spec,
                    x,
                    y,
                    data.test_x,
                    data.test_y,
                    epochs=info["epochs"],
                    batch_size=cfg.batch_size,
                    lr=cfg.lr,
                    seed=seed,
                    **cfg.device_config.to_config(),
                )
                for arch in cfg.arch_list
            ]
            pending.append((regime, seed, task_out, key, tasks))
            load_federated.cache_clear()  # the tasks hold their own copies
    if pending:
        t0 = time.perf_counter()
        with ProcessFanOut() as fanout:
            outcomes = fanout.map(run_local_train_task, [t for p in pending for t in p[4]])
        print(
            f"centralized bounds: {len(outcomes)} trainings in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        for regime, seed, task_out, key, tasks in pending:
            done, outcomes = outcomes[: len(tasks)], outcomes[len(tasks) :]
            accuracy = {o.arch: round(o.accuracy, 4) for o in done}
            bound = {
                "per_arch": accuracy,
                "mean": round(float(np.mean(list(accuracy.values()))), 4),
            }
            task_out.mkdir(parents=True, exist_ok=True)
            (task_out / "result.json").write_text(json.dumps(bound, indent=2))
            (task_out / "args.json").write_text(json.dumps({"key": key, "bound": bound}, indent=2))
            bounds[regime]["per_seed"][str(seed)] = bound
            print(f"centralized {regime} seed {seed}: mean {bound['mean']:.4f}", flush=True)
    for bound in bounds.values():
        bound["per_seed"] = {str(s): bound["per_seed"][str(s)] for s in seeds}
        bound["summary"] = summarize([bound["per_seed"][str(s)]["mean"] for s in seeds])
    return bounds


# ---------------------------------------------------------------------------- the study


def float32_logits_run(mode: dict) -> dict[str, list[str]]:
    """The communication section's one run besides the study's: COST_CONFIG's FedDF, seed 0,
    with float32 logits ({its folder under runs/: its arguments}). `evidence_section` runs it
    on the study's workers (`extra_runs`), where it costs a share of their time, not a wait of
    its own."""
    args = study_args(mode, COST_CONFIG, "feddf", 0, "--logits-dtype", "float32")
    return {f"feddf-float32-{COST_CONFIG}": args}


def evidence_section(
    mode: dict,
    out: Path,
    extra_runs: dict[str, list[str]] | None = None,
    after_runs: Callable[[], None] | None = None,
) -> dict:
    """Run (or reuse) every configuration x method x seed and the centralized bounds; write
    evidence.json and evidence.png; return the headline keys for summary.json.

    `extra_runs` ({folder under runs/: arguments}) run on the same workers after seed 0's, and
    are stored (and reused) like the study's. `after_runs` is called once the runs are done,
    before the bounds train: where a caller starts work that mostly waits (the soak)."""
    seeds = list(range(mode["seeds"]))
    code = code_fingerprint()
    study = mode["study"]
    # seed by seed: an interrupted study (resumed from the stored runs) has whole seeds
    # (the study's key or None, label, arguments, folder) per run
    jobs: list[tuple] = [
        (
            (name, method, seed),
            f"{name}/{method} seed {seed}",
            study_args(mode, name, method, seed),
            run_dir(out, name, method, seed),
        )
        for seed in seeds
        for name in study
        for method in study[name]["methods"]
    ]
    first_seed = sum(len(config["methods"]) for config in study.values())
    jobs[first_seed:first_seed] = [
        (None, name, args, out / "runs" / name) for name, args in (extra_runs or {}).items()
    ]
    progress = Progress(len(jobs))
    engine, workers = mode.get("engine", "ray"), mode.get("workers", 1)
    threads = max(1, CORES // workers) if workers > 1 else 0

    made_by: dict[str, list[str]] = {}  # fingerprint -> the study's runs it made

    def one(job: tuple) -> dict:
        key, label, args, run_out = job
        result, reused = cached_run(
            args,
            run_out,
            code,
            memory=key == (COST_CONFIG, "feddf", 0),
            engine=engine,
            threads=threads,
            reuse_codes=tuple(mode.get("reuse_codes", ())),
        )
        if key is not None:
            name, method, seed = key
            made_by.setdefault(reused or code, []).append(f"{name}/{method}/seed{seed}")
        progress.line(label, mean_final(result), result.get("wall_seconds"), reused)
        return result

    with ThreadPoolExecutor(workers) as pool:  # each run is a subprocess: threads only wait
        done = list(pool.map(one, jobs))
    results = {job[0]: r for job, r in zip(jobs, done) if job[0] is not None}
    if after_runs is not None:
        after_runs()
    centralized = centralized_bounds(mode, seeds, out, code) if mode.get("bounds", True) else {}
    evidence = build_evidence(mode, seeds, results, centralized)
    evidence["memory"] = {"run": f"{COST_CONFIG}/feddf seed 0", **study_memory(out)}
    evidence["runs"] = {"flwr_kd_fingerprint": code, "engine": engine}  # what they measured
    if set(made_by) != {code}:  # runs reused from earlier code (--reuse-code): which, by what
        evidence["runs"]["made_by"] = {fp: sorted(names) for fp, names in made_by.items()}
    save(out, "evidence", evidence)
    plot_evidence(evidence, out / "evidence.png")
    return evidence["summary"]


def _per_reply(rows: list[dict], direction: str) -> float:
    return float(np.mean([r["bytes"][direction] / max(1, r["replies"]) for r in rows]))


def seed_figures(result: dict) -> dict:
    """What one run contributes: its final accuracies, curve, slope and costs."""
    rows = result["rounds"]
    curve = [row["mean_accuracy"] for row in rows]
    compute = [c for row in rows for c in row.get("client_compute", [])]
    return {
        "final_mean": round(mean_final(result), 4),
        "final": rows[-1]["accuracy"],
        "curve": curve,
        "slope_last3": slope(curve),
        "bytes_down_per_client": round(_per_reply(rows, "down")),
        "bytes_up_per_client": round(_per_reply(rows, "up")),
        "client_compute_per_reply": round(float(np.mean(compute)), 4) if compute else None,
        "server_validation": result.get("server_validation"),
        "wall_seconds": result.get("wall_seconds"),
    }


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return round(float(np.mean(kept)), 4) if kept else None


def method_evidence(per_seed: dict[str, dict]) -> dict:
    """A method over seeds: per-seed figures, summaries, the mean curve and its +-1 std band."""
    seeds = list(per_seed.values())
    evidence = {
        "per_seed": per_seed,
        "final_mean": summarize([s["final_mean"] for s in seeds]),
        "per_arch": {a: summarize([s["final"][a] for s in seeds]) for a in seeds[0]["final"]},
    }
    if "curve" not in seeds[0]:  # a baseline: one accuracy per seed
        return evidence
    curves = np.array([s["curve"] for s in seeds], dtype=float)
    std = curves.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(curves.shape[1])
    return {
        **evidence,
        "mean_curve": [round(v, 4) for v in curves.mean(axis=0).tolist()],
        "std_curve": [round(v, 4) for v in std.tolist()],
        "slope_last3": _mean([s["slope_last3"] for s in seeds]),
        **{
            key: round(np.mean([s[key] for s in seeds]))
            for key in ("bytes_down_per_client", "bytes_up_per_client")
        },
        "client_compute_per_reply": _mean([s["client_compute_per_reply"] for s in seeds]),
    }


def transfer_only_seed(result: dict) -> dict:
    """FedMD's transfer-only baseline of one run (transfer learning and private fine-tuning,
    before round 1): its mean over the architectures."""
    accuracy = result["baselines"]["transfer_only"]
    return {"final_mean": round(float(np.mean(list(accuracy.values()))), 4), "final": accuracy}


def config_evidence(mode: dict, name: str, seeds: list[int], results: dict) -> dict:
    """One configuration: each method (and FedMD's transfer-only baseline) over the seeds,
    and its paired comparisons."""
    config = mode["study"][name]
    methods = {}
    for method, (strategy, *_) in config["methods"].items():
        runs = {str(s): results[name, method, s] for s in seeds}
        methods[method] = method_evidence({s: seed_figures(r) for s, r in runs.items()})
        methods[method]["strategy"] = strategy
        methods[method]["command"] = "flwr-kd " + " ".join(
            study_args(mode, name, method, 0)
        ).replace("--seed 0", "--seed S")
        if strategy == "fedmd":
            baseline = "transfer_only" if method == "fedmd" else f"{method}_transfer_only"
            methods[baseline] = method_evidence({s: transfer_only_seed(r) for s, r in runs.items()})
    comparisons = {}
    for key, (a, b) in config.get("paired", {}).items():
        if a in methods and b in methods and len(seeds) >= 2:
            finals = [[methods[m]["per_seed"][str(s)]["final_mean"] for s in seeds] for m in (a, b)]
            comparisons[key] = {"a": a, "b": b, **paired(*finals)}
    return {"flags": config["flags"], "methods": methods, "paired": comparisons}


def cost_figures(configs: dict, seeds: list[int], results: dict) -> dict:
    """FedDF's costs against FedAvg's (COST_CONFIG, paired runs) and the share of FedDF's
    distillation time spent on validation (its `feddf` runs, every config and seed)."""
    figures: dict = {}
    methods = configs.get(COST_CONFIG, {}).get("methods", {})
    if "feddf" in methods and "fedavg" in methods:
        feddf, fedavg = methods["feddf"], methods["fedavg"]
        figures["feddf_bytes_down_over_fedavg"] = round(
            feddf["bytes_down_per_client"] / fedavg["bytes_down_per_client"], 4
        )
        ratios = [
            feddf["per_seed"][str(s)]["client_compute_per_reply"]
            / fedavg["per_seed"][str(s)]["client_compute_per_reply"]
            for s in seeds
        ]
        # runs side by side share the cores: the headline is client_round_section's
        figures["feddf_client_compute_over_fedavg_in_study_per_seed"] = [
            round(r, 4) for r in ratios
        ]
        figures["feddf_client_compute_over_fedavg_in_study"] = round(float(np.mean(ratios)), 4)
    validation = total = 0.0
    for (_, method, _), result in results.items():
        if method == "feddf":
            for row in result["rounds"]:
                for d in row.get("distill", {}).values():
                    validation += d.get("validation_seconds", 0.0)
                    total += d.get("seconds", 0.0)
    if total:
        figures["distill_validation_share"] = round(validation / total, 4)
    return figures


def build_evidence(mode: dict, seeds: list[int], results: dict, centralized: dict) -> dict:
    """evidence.json: per config and method, the paired comparisons, the costs, the bounds
    and the headline keys (`summary`)."""
    configs = {name: config_evidence(mode, name, seeds, results) for name in mode["study"]}
    costs = cost_figures(configs, seeds, results)
    summary: dict = {"seeds": len(seeds)}
    for config in configs.values():
        for key, p in config["paired"].items():
            summary.update({f"{key}_mean": p["mean"], f"{key}_min": p["min"]})
            summary[f"{key}_ci95"] = p["ci95"]
    summary.update({k: v for k, v in costs.items() if not k.endswith("_per_seed")})
    slopes = [
        abs(m["slope_last3"])
        for c in configs.values()
        for m in c["methods"].values()
        if m.get("slope_last3") is not None
    ]
    summary["slope_last3_max"] = round(max(slopes), 4) if slopes else None
    evidence = {
        "mode": _study_mode(mode),
        "seeds": seeds,
        "configs": configs,
        "costs": {"config": COST_CONFIG, **costs},
        "summary": summary,
    }
    return with_bounds(evidence, centralized)


def _study_mode(mode: dict) -> dict:
    """What of a mode the study's runs depend on (besides its `study`)."""
    return {k: mode[k] for k in ("dataset", "clients", "rounds", "archs", "extra")}


def with_bounds(evidence: dict, centralized: dict) -> dict:
    """`evidence` with the centralized bounds in, each config pointing at its data regime's."""
    for config in evidence["configs"].values():
        config.pop("centralized", None)
    for regime, bound in centralized.items():
        for name in bound["configs"]:
            evidence["configs"][name]["centralized"] = regime
    evidence["centralized"] = centralized
    return evidence


def bounds_section(mode: dict, out: Path) -> dict:
    """Compute (or reuse) the centralized bounds of the study that `out`'s evidence.json holds,
    and add them to it, without its runs: the bounds train on the split alone."""
    path = out / "evidence.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the evidence section first")
    evidence = json.loads(path.read_text())
    seeds = list(range(mode["seeds"]))
    if evidence["mode"] != _study_mode(mode) or evidence["seeds"] != seeds:
        raise SystemExit(
            f"{path} was made with other settings ({evidence['mode']}, seeds "
            f"{evidence['seeds']}) than this mode's: rerun its evidence section"
        )
    evidence = with_bounds(evidence, centralized_bounds(mode, seeds, out, code_fingerprint()))
    save(out, "evidence", evidence)
    plot_evidence(evidence, out / "evidence.png")
    return evidence["centralized"]


def plot_evidence(evidence: dict, path: Path) -> None:
    """Per config: each method's mean curve with a +-1 std band over seeds, the centralized
    bound (dashed) and FedMD's transfer-only baseline (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    configs = evidence["configs"]
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.8), dpi=110)
    for ax, (name, config) in zip(np.atleast_1d(axes), configs.items()):
        for i, (method, m) in enumerate(config["methods"].items()):
            color = f"C{i}"
            if "mean_curve" not in m:
                ax.axhline(m["final_mean"]["mean"], ls=":", color=color, label=method)
                continue
            mean, std = np.array(m["mean_curve"]), np.array(m["std_curve"])
            rounds = np.arange(1, len(mean) + 1)
            ax.plot(rounds, mean, "o-", color=color, label=method)
            ax.fill_between(rounds, mean - std, mean + std, color=color, alpha=0.2)
        regime = config.get("centralized")
        if regime:
            bound = evidence["centralized"][regime]["summary"]["mean"]
            ax.axhline(bound, ls="--", color="gray", label="centralized")
        ax.set(title=name, xlabel="round", ylabel="mean test accuracy")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"mean +- 1 std over {len(evidence['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
