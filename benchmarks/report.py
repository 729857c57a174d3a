"""Write benchmarks/REPORT.md from the results of one mode (figures quoted from the JSONs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What `make bench` / `make bench-quick` run, per mode (the Makefile's commands).
COMMANDS = {
    "full": "python benchmarks/run.py --mode full --engine inprocess --workers 2",
    "quick": "python benchmarks/run.py --mode quick --engine inprocess --workers 2",
}
#: Headline targets (issues 13 and 15 for the evidence keys): key -> (operator, target).
TARGETS = {
    "feddf_minus_fedavg_alpha0.1_mean": (">=", 0.03),
    "feddf_minus_fedavg_alpha0.1_min": (">", 0.0),
    "feddf_minus_fedavg_shards_mean": (">=", 0.0),
    "fedmd_minus_transfer_only_paper_regime_mean": (">=", 0.03),
    "fedmd_minus_transfer_only_paper_regime_min": (">", 0.0),
    "fedmd_minus_transfer_only_same_distribution_mean": (">=", 0.0),
    "feddf_defaults_minus_plain_mean": (">=", 0.0),
    "feddf_bytes_down_over_fedavg": ("<=", 1.01),
    "feddf_client_round_over_fedavg": ("<=", 1.2),
    "distill_validation_share": ("<=", 0.2),
    "aggregation_speedup_client_logits": (">=", 3.0),
    "aggregation_speedup_n50": (">=", 5.0),
    "scale_round_time_ratio_1000_vs_10": ("<=", 1.25),
    "scale_peak_memory_ratio_1000_vs_10": ("<=", 1.25),
    "fanout_speedup": (">=", 1.6),
    "pretrain_speedup": (">=", 3.0),
    "framework_overhead": ("<=", 1.2),
}
OPERATORS = {
    ">=": lambda v, t: v >= t,
    ">": lambda v, t: v > t,
    "<=": lambda v, t: v <= t,
}


#: Why a target can be missed on this machine, and what would reach it (written when missed).
WHEN_MISSED = {
    "aggregation_speedup_client_logits": (
        "The seed system's extra cost is every aggregator evaluating all n client models on the "
        "distillation subset (n x subset forward passes each); flwr-kd's aggregators only train "
        "the student. The ratio therefore grows with the number of clients against the "
        "distillation steps: this figure is the curve's first point (10 clients); the curve in "
        "'FedDF aggregation' passes 3 by 25 clients."
    ),
    "fanout_speedup": (
        "Three architecture tasks on a 2-core machine: one worker with both cores' threads against "
        "two single-thread workers. With equal tasks the bound is 3 tasks / 2 cores = 1.5x, so 1.6 "
        "needs a third core; the serverless fan-out (one aggregator function per architecture, the "
        "seed system's 1.76x) has no such bound."
    ),
    "pretrain_speedup": (
        "Bounded by clients / unique architectures (here 10 / 3 = 3.3) and by the cores."
    ),
    "framework_overhead": (
        "Round wall time includes Ray's message passing and the process pool's task transfer; "
        "tiny rounds make that fixed cost a larger share."
    ),
    "feddf_minus_fedavg_alpha0.1_mean": (
        "FedDF's gain over FedAvg per architecture group comes from distilling the ensemble on "
        "the public subset; the per-seed differences and the curves in 'Evidence over seeds' "
        "show whether the gap is noise, or whether distillation had too few steps or rounds to "
        "help."
    ),
    "feddf_minus_fedavg_alpha0.1_min": (
        "At least one seed's split had FedDF at or below FedAvg: see its row of per-seed "
        "differences in 'Evidence over seeds'."
    ),
    "fedmd_minus_transfer_only_paper_regime_mean": (
        "FedMD's rounds (digest of the consensus, revisit of private data) must add to what "
        "transfer learning and private fine-tuning reach; the FedMD curves show whether rounds "
        "gain or lose."
    ),
    "fedmd_minus_transfer_only_paper_regime_min": (
        "At least one seed's FedMD rounds ended below transfer-only: see the per-seed differences."
    ),
    "fedmd_minus_transfer_only_same_distribution_mean": (
        "With the public set cut from the private task's own pool, transfer learning already "
        "sees labelled data of every class; FedMD's rounds must at least keep that accuracy. "
        "The FedMD curve shows in which round it is lost."
    ),
    "feddf_defaults_minus_plain_mean": (
        "flwr-kd's default weight selection after distillation did worse than keeping the last "
        "step (plain FedDF) on these seeds."
    ),
}


def load(out: Path, name: str) -> dict:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def verdict(key: str, value) -> str:
    """'OP target: met' or 'missed' for a key with a target and a numeric value, else ''."""
    if key not in TARGETS or not isinstance(value, int | float):
        return ""
    op, target = TARGETS[key]
    return f"{op} {target}: {'met' if OPERATORS[op](value, target) else 'missed'}"


def _mean_std(s: dict) -> str:
    """'mean ± std' of a benchmarks/stats.py summary (just the mean for one seed)."""
    return f"{s['mean']:.4f} ± {s['std']:.4f}" if s.get("std") is not None else f"{s['mean']:.4f}"


def _with_slope(method: dict) -> str:
    slope = method.get("slope_last3")
    return _mean_std(method["final_mean"]) + (f" ({slope:+.4f}/round)" if slope is not None else "")


def _interval(p: dict) -> str:
    return f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"


def evidence_lines(mode: str, ev: dict) -> list[str]:
    """'Evidence over seeds' (evidence.json): every headline's paired difference, each
    configuration's methods over seeds, the centralized bounds, the costs and the commands."""
    m, seeds, configs, bounds = ev["mode"], ev["seeds"], ev["configs"], ev["centralized"]
    cmd = "make bench" if mode == "full" else "make bench-quick"
    lines = [
        "",
        "## Evidence over seeds",
        "",
        f"![evidence](results/{mode}/evidence.png)",
        "",
        (
            f"{m['dataset']} unless a configuration's flags say otherwise, {m['clients']} "
            f"clients of {m['archs']} (assigned round-robin), {m['rounds']} rounds, "
            f"{len(seeds)} seeds ({', '.join(map(str, seeds))}). Every method of a configuration "
            "runs on the same seeds, each seed its own split and initial weights, so differences "
            "are paired per seed (same seed, same split). Figures are final test accuracies, "
            "mean over the architectures; mean ± std is over seeds (sample std); a paired "
            "difference's 95% interval is Student-t with n - 1 degrees of freedom; the slope is "
            "the least-squares slope per round over the last 3 rounds, mean over seeds (near 0: "
            "the curve has flattened). The centralized bound trains each architecture on all the "
            "labelled data any method of its configurations sees (private pool, server "
            "validation set, labelled public set) for the most private-data epochs a client "
            "gets, at the runs' batch size, per seed."
        ),
        "",
        (
            f"Commands: `{cmd}` (`{COMMANDS[mode]}`); this study alone: the same with "
            "`--sections evidence`. Runs kept in "
            f"`benchmarks/results/{mode}/runs/` are reused while their arguments and flwr_kd's "
            "source are unchanged. Each run's `flwr-kd simulate` command is listed under its "
            "configuration (S = the seed)."
            + (
                f" These runs: flwr_kd source fingerprint `{ev['runs']['flwr_kd_fingerprint']}` "
                f"(`benchmarks/evidence.py: code_fingerprint`), {ev['runs']['engine']} engine."
                if "runs" in ev
                else ""
            )
            + "".join(
                f" Made by fingerprint `{fp}`: {', '.join(names)}."
                for fp, names in ev.get("runs", {}).get("made_by", {}).items()
            )
        ),
        *(
            []
            if bounds
            else [
                "",
                (
                    "Centralized bounds: not computed in this run (`--no-bounds`, quick mode's "
                    "default); `--sections bounds` adds them to this study."
                ),
            ]
        ),
        "",
        "### Headlines",
        "",
        (
            "| headline | seeds | A: mean ± std (slope) | B: mean ± std (slope) | A - B: mean "
            "| 95% interval | min | centralized bound |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, config in configs.items():
        bound = bounds.get(config.get("centralized"), {}).get("summary")
        for key, p in config["paired"].items():
            a, b = config["methods"][p["a"]], config["methods"][p["b"]]
            lines.append(
                f"| `{key}` ({name}: A = {p['a']}, B = {p['b']}) | {p['n']} | {_with_slope(a)} "
                f"| {_with_slope(b)} | {p['mean']:+.4f} | {_interval(p)} | {p['min']:+.4f} "
                f"| {_mean_std(bound) if bound else ''} |"
            )
    for name, config in configs.items():
        lines += _config_lines(name, config, bounds)
    costs = ev.get("costs", {})
    if costs:
        lines += [
            "",
            "### Costs",
            "",
            (
                f"FedDF against FedAvg in {costs.get('config')}, paired over the seeds: "
                "downlink bytes per client per round "
                f"{costs.get('feddf_bytes_down_over_fedavg')}x; client compute per reply "
                f"{costs.get('feddf_client_compute_over_fedavg_in_study')}x (per seed: "
                f"{costs.get('feddf_client_compute_over_fedavg_in_study_per_seed')}; runs side by "
                "side share the cores, so the headline is the client round's own measure "
                "below). Share of FedDF's "
                "distillation time spent on validation (every `feddf` run): "
                f"{costs.get('distill_validation_share')}."
            ),
        ]
    return lines


def _config_lines(name: str, config: dict, bounds: dict) -> list[str]:
    """One configuration: its methods over seeds, its centralized bound and its commands."""
    lines = ["", f"### {name}", "", f"Flags: `{' '.join(config['flags'])}`."]
    regime = config.get("centralized")
    if regime in bounds:
        b = bounds[regime]
        per_seed = ", ".join(f"{v['mean']:.4f}" for v in b["per_seed"].values())
        lines[-1] += (
            f" Centralized bound ({', '.join(b['configs'])}): {_mean_std(b['summary'])} "
            f"(per seed {per_seed}), {b['epochs']} epochs on {b['samples']} labelled samples "
            f"at batch {b['batch_size']}."
        )
    lines += [
        "",
        (
            "| method | final mean ± std | per seed | per architecture (mean ± std) "
            "| slope, last 3 rounds | bytes down / client / round | client s / reply |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, m in config["methods"].items():
        per_seed = ", ".join(f"{v['final_mean']:.4f}" for v in m["per_seed"].values())
        per_arch = ", ".join(f"{a} {_mean_std(s)}" for a, s in m["per_arch"].items())
        slope, down = m.get("slope_last3"), m.get("bytes_down_per_client")
        compute = m.get("client_compute_per_reply")
        lines.append(
            f"| {method} | {_mean_std(m['final_mean'])} | {per_seed} | {per_arch} "
            f"| {'' if slope is None else f'{slope:+.4f}'} | {'' if down is None else f'{down:,}'} "
            f"| {'' if compute is None else compute} |"
        )
    lines += ["", "Commands:", ""]
    lines += [
        f"- {method}: `{m['command']}`" for method, m in config["methods"].items() if "command" in m
    ]
    return lines


def cpu_kernel_lines(kernels: dict) -> list[str]:
    """'A training step on one CPU thread' (cpu_kernels.json), or nothing without it."""
    if not kernels:
        return []
    lines = [
        "",
        "## A training step on one CPU thread (`benchmarks/cpu_kernels.py`)",
        "",
        (
            f"ms per step (forward, backward, Adam) at {kernels['img_size']}x"
            f"{kernels['img_size']}, median of interleaved blocks: Adam's per-parameter loop "
            "with NCHW activations (flwr-kd before December 2026), Adam's fused kernel, and "
            "what flwr-kd runs (`flwr_kd.devices.run_on`: the fused kernel, channels-last "
            "activations for models with depthwise convolutions). "
            + ", ".join(kernels.get("speedups_over", kernels["ms_per_step"]))
            + " together: "
            + ", ".join(
                f"batch {k.rsplit('_b', 1)[1]} **{v}x**"
                for k, v in kernels.items()
                if k.startswith("cpu_step_speedup_b")
            )
            + " faster than the loop; the fused kernel alone: "
            + ", ".join(
                f"{v}x" for k, v in kernels.items() if k.startswith("cpu_step_speedup_fused")
            )
            + "."
        ),
        "",
        "| architecture | batch | Adam loop, NCHW | fused, NCHW | flwr-kd |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arch, by_batch in kernels["ms_per_step"].items():
        for batch, t in by_batch.items():
            lines.append(
                f"| {arch} | {batch.removeprefix('batch')} | {t['adam_nchw']} "
                f"| {t['fused_nchw']} | {t['flwr_kd']} |"
            )
    return lines


def write(mode: str) -> Path:
    out = ROOT / "benchmarks" / "results" / mode
    summary, evidence, timing = load(out, "summary"), load(out, "evidence"), load(out, "timing")
    agg, pre, comm, sls = (
        load(out, "aggregation"),
        load(out, "pretrain"),
        load(out, "communication"),
        load(out, "serverless"),
    )
    cmd = "make bench" if mode == "full" else "make bench-quick"
    lines = [
        "# flwr-kd benchmarks",
        "",
        (
            f"Made by `{cmd}` (`{COMMANDS[mode]}`) on a "
            f"{summary.get('cores')}-core machine"
            + (
                f"; `run.py` took {summary['seconds'] / 60:.0f} minutes"
                + "".join(
                    f" (then `--sections {k.removeprefix('seconds_')}`: {v} s)"
                    for k, v in summary.items()
                    if k.startswith("seconds_")
                )
                if "seconds" in summary
                else ", section by section (`--sections`; each one's time is a `seconds_*` key; "
                "the study's is the sum of its runs' `wall_seconds` in evidence.json)"
            )
            + ". Every ratio is measured side by side in one section's run; "
            f"the raw figures are in `benchmarks/results/{mode}/*.json`."
        ),
        "",
        "## Headline figures (`summary.json`)",
        "",
        "| key | value | target |",
        "| --- | --- | --- |",
    ]
    missed = []
    for key, value in summary.items():
        if key in ("mode", "cores", "seconds") or (
            "seconds" in summary and key.startswith("seconds_")
        ):
            continue  # the times are the header's
        lines.append(f"| `{key}` | {value} | {verdict(key, value)} |")
        if verdict(key, value).endswith("missed"):
            missed.append(f"- `{key}` ({value}): {WHEN_MISSED.get(key, '')}")
    if missed:
        lines += ["", "Targets missed, why, and what would reach them:", "", *missed]
    if evidence:
        lines += evidence_lines(mode, evidence)
    if timing:
        lines += [
            "",
            "## Where a FedDF round's time goes",
            "",
            (
                f"Run: {timing['run']}. Rounds after the first (which includes Ray and worker "
                f"start-up). {timing['note']}. "
                "Framework overhead = round wall time / critical path."
            ),
            "",
            (
                "| round | wall s | client compute (sum) | client critical path | FedAvg "
                "| distillation critical path | server evaluation | critical path | overhead |"
            ),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in timing["rounds"]:
            lines.append(
                f"| {r['round']} | {r['wall']} | {r['client_compute_sum']} "
                f"| {r['client_critical_path']} | {r['fedavg']} | {r['distill_critical_path']} "
                f"| {r['evaluation']} | {r['critical_path']} | {r['overhead']} |"
            )
    lines += cpu_kernel_lines(load(out, "cpu_kernels"))
    client = load(out, "client_round")
    if client:
        lines += [
            "",
            "## A FedDF client's round against a FedAvg client's",
            "",
            (
                f"{client['config']}; median of {client['repeats']} repeats, one thread, side "
                "by side. FedAvg's round is the local training; FedDF's adds the logits. "
                f"The whole round: **{client['feddf_client_round_over_fedavg']}x**."
            ),
            "",
            "| architecture (its clients) | training, s | logits, s | FedDF / FedAvg |",
            "| --- | --- | --- | --- |",
            *(
                f"| {a} | {r['train_seconds']} | {r['logits_seconds']} | {r['feddf_over_fedavg']} |"
                for a, r in client["per_arch"].items()
            ),
        ]
    if agg:
        s = agg["seconds"]
        lines += [
            "",
            "## FedDF aggregation",
            "",
            (
                f"{len(agg['architectures'])} architecture tasks, {agg['clients']} client models, "
                f"{agg['subset']} public samples, {agg['distill_steps']} distillation steps (fixed "
                f"work). Teacher logits from the clients: {s['clients_parallel']} s; the seed "
                "system's way (each aggregator evaluates all client models): "
                f"{s['server_parallel']} s, so **{agg['aggregation_speedup_client_logits']}x**. "
                f"The k tasks in parallel: {s['clients_parallel']} s, one after another: "
                f"{s['clients_serial']} s, so **{agg['fanout_speedup']}x**. The teacher travels "
                f"as {agg['teacher_logits_bytes_float16']} bytes of float16."
            ),
        ]
        if agg.get("curve"):  # the speedup against the number of clients, side by side
            lines += ["", "| clients | teacher from clients, s | seed system, s | speedup |"]
            lines.append("| --- | --- | --- | --- |")
            for n, c in agg["curve"].items():
                lines.append(
                    f"| {n} | {c['clients_parallel']} | {c['server_parallel']} | {c['speedup']} |"
                )
    if pre:
        lines += [
            "",
            "## FedMD transfer learning",
            "",
            (
                f"{pre['public_samples']} public samples, {pre['epochs']} epochs. Once per unique "
                f"architecture ({len(pre['architectures'])}, in parallel): "
                f"{pre['unique_parallel_seconds']} s; once per client ({pre['clients']}, same "
                f"executor): {pre['per_client_seconds']} s: **{pre['pretrain_speedup']}x**."
            ),
        ]
    if comm:
        b = comm["bytes"]
        lines += [
            "",
            "## Communication",
            "",
            (
                f"Bytes per client per round in the seed-0 runs of {comm.get('config')} "
                f"(FedMD's: {comm.get('fedmd_config')}) "
                "(down = server to client, up = client to server):"
            ),
            "",
            "| strategy | down | up |",
            "| --- | --- | --- |",
            *[f"| {k} | {v['down_per_client']:,} | {v['up_per_client']:,} |" for k, v in b.items()],
            "",
            (
                "FedDF logits as float16: mean accuracy "
                f"{comm['logits_float16']['mean_accuracy']}, "
                f"{comm['logits_float16']['up_per_client']:,} bytes up per client; as float32: "
                f"{comm['logits_float32']['mean_accuracy']}, "
                f"{comm['logits_float32']['up_per_client']:,} bytes."
            ),
        ]
    if sls:
        lines += ["", "## Serverless (emulated)", ""]
        for s in ("feddf", "fedmd"):
            if s in sls:
                v = sls[s]
                inv = v["invocations"]
                lines.append(
                    f"- {s}: round latency {v['round_seconds']} s; "
                    "client calls per client per round "
                    f"{v['client_calls_per_round_per_client']} "
                    f"(seed system: {v['seed_system_calls_per_round_per_client']}); "
                    f"mean call {inv.get('mean_call_seconds')} s of which compute "
                    f"{inv.get('mean_compute_seconds')} s "
                    f"(overhead share {inv.get('overhead_share')}); "
                    f"bytes per round {inv.get('bytes_per_round')}; "
                    f"{v['aggregator_calls']} aggregator calls."
                )
        lines.append(
            "- cold start (new function process until it answers): "
            f"{sls.get('cold_start_seconds')} s; "
            f"warm request (median of 20): {sls.get('warm_request_seconds_median')} s."
        )
    scale = load(ROOT / "benchmarks" / "results", "scale/scale")  # one place, any mode
    if scale:
        runs = scale["runs"]
        base = runs["10"]["round_seconds_after_first"]
        lines += [
            "",
            "## Scale: 1,000 clients at 1% against 10 at 100% (`benchmarks/scale.py`)",
            "",
            (
                f"FedAvg, {scale['config']['participants_per_round']} clients per round, "
                f"{scale['config']['private_samples_per_client']} private samples per client, "
                f"{scale['config']['rounds']} rounds; median round time after round 1, and peak "
                "resident memory of the whole process tree, side by side. Flower's poll: one "
                "pass of its simulation engine over the nodes, ms (`flower_poll_ms_per_tick`: "
                f"{scale['flower_poll_ms_per_tick']})."
            ),
            "",
            "| run | round s (median) | peak MiB | round-time ratio to 10 |",
            "| --- | --- | --- | --- |",
            *(
                f"| {key} | {r['round_seconds_after_first']} | {r['peak_total_mib']} | "
                f"{round(r['round_seconds_after_first'] / base, 3)} |"
                for key, r in runs.items()
            ),
        ]
    soak = load(out, "soak")
    if soak:
        rel = soak["reliability"]
        lines += [
            "",
            "## Soak: faults injected and survived (emulated serverless)",
            "",
            (
                f"`{soak['command']}`: {soak['rounds_done']} of {soak['rounds']} rounds done in "
                f"{soak['seconds']} s"
                f"{' (beside ' + soak['beside'] + ')' if soak.get('beside') else ''}. "
                f"Faults injected into {rel['injected_total']} of "
                f"{rel['attempts']} call attempts ({rel['injected']}); "
                f"{rel['retried_calls']} calls retried, {rel['taken_over']} taken over after their "
                f"process died, {rel['left_out']} replies left out (valid replies per round: min "
                f"{min(soak['replies_per_round'])}, mean "
                f"{sum(soak['replies_per_round']) / len(soak['replies_per_round']):.2f} of 6). "
                f"`flwr-kd cloud audit`: {len(soak['audit_problems'])} problems. Final models "
                f"reloaded from Cloud Storage score {soak['final_accuracy_reloaded']} "
                f"(reported {soak['final_accuracy_reported']})."
            ),
        ]
    mem = evidence.get("memory", {})
    if mem.get("peak_total_mib"):
        lines += [
            "",
            "## Memory",
            "",
            (
                f"Peak resident memory of the whole FedDF simulation ({mem['run']}, all "
                f"processes): {mem['peak_total_mib']} MiB."
            ),
            "",
        ]
        lines += [f"- {k}: {v} MiB" for k, v in mem["peak_per_process_mib"].items()]
    if mode == "full":  # pooled.py's section, kept when this file is rewritten after it ran
        from pooled import RESULT, section

        if RESULT.exists():
            lines += ["", *section(json.loads(RESULT.read_text()))]
    path = ROOT / "benchmarks" / ("REPORT.md" if mode == "full" else f"REPORT-{mode}.md")
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else "full"))
