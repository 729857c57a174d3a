"""Do the study's curves flatten with more rounds, and does the paired lead hold there?

    python benchmarks/longer_curves.py --config alpha0.1 --methods feddf fedavg --rounds 12

`make bench`'s study stops at the full mode's rounds, where FedDF's curves still rise. This runs
one configuration's methods with only `--rounds` changed: the same arguments, seeds, splits and
initial weights as the study (benchmarks/evidence.py), in-process, `--workers` side by side
(about 17 minutes on 2 cores for the command above). The first method is compared with the
second at every round, paired per seed, with each curve's slope over its last 3 rounds there.
Runs are kept in results/lab/runs/ and reused like the study's; writes
benchmarks/results/lab/rounds<R>-<config>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence import _mean, cached_run, code_fingerprint, run_dir, study_args
from run import CORES, MODES, ROOT
from stats import paired, slope, summarize

LAB = ROOT / "benchmarks" / "results" / "lab"


def curves(config: str, methods: list[str], seeds: list[int], rounds: int, workers: int) -> dict:
    """{method: {seed: mean accuracy per round}} of the study's runs at `rounds` rounds."""
    mode, code = {**MODES["full"], "rounds": rounds}, code_fingerprint()
    threads = max(1, CORES // workers)
    jobs = [(m, s) for m in methods for s in seeds]

    def one(job: tuple[str, int]) -> list[float]:
        method, seed = job
        args = study_args(mode, config, method, seed)
        run_out = run_dir(LAB, f"rounds{rounds}-{config}", method, seed)
        result, _ = cached_run(args, run_out, code, engine="inprocess", threads=threads)
        return [row["mean_accuracy"] for row in result["rounds"]]

    with ThreadPoolExecutor(workers) as pool:  # each run is a subprocess: threads only wait
        done = dict(zip(jobs, pool.map(one, jobs)))
    return {m: {s: done[(m, s)] for s in seeds} for m in methods}


def compare(by_method: dict, a: str, b: str) -> list[dict]:
    """Per round: each method's mean accuracy over seeds, its last-3 slope, and a - b paired."""
    seeds = list(by_method[a])
    rows = []
    for r in range(1, len(by_method[a][seeds[0]]) + 1):
        row = {"round": r}
        for m in (a, b):
            row[m] = summarize([by_method[m][s][r - 1] for s in seeds])
            # averaged as the study averages its slopes (None in round 1: one point)
            row[m]["slope_last3"] = _mean([slope(by_method[m][s][:r]) for s in seeds])
        row[f"{a}_minus_{b}"] = paired(
            [by_method[a][s][r - 1] for s in seeds], [by_method[b][s][r - 1] for s in seeds]
        )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="alpha0.1", choices=sorted(MODES["full"]["study"]))
    parser.add_argument("--methods", nargs=2, default=["feddf", "fedavg"], metavar="METHOD")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    known = MODES["full"]["study"][args.config]["methods"]
    for method in args.methods:
        if method not in known:
            parser.error(f"{args.config} has no method '{method}' (it has {', '.join(known)})")
    if args.rounds < 3 or len(args.seeds) < 2:
        parser.error("need at least 3 rounds (for a slope) and 2 seeds (for an interval)")
    by_method = curves(args.config, args.methods, args.seeds, args.rounds, args.workers)
    a, b = args.methods
    report = {
        "config": args.config,
        "rounds": args.rounds,
        "seeds": args.seeds,
        "command": study_args({**MODES["full"], "rounds": args.rounds}, args.config, a, 0),
        "curves": {m: {str(s): c for s, c in per.items()} for m, per in by_method.items()},
        "per_round": compare(by_method, a, b),
    }
    LAB.mkdir(parents=True, exist_ok=True)
    path = LAB / f"rounds{args.rounds}-{args.config}.json"
    path.write_text(json.dumps(report, indent=2))

    def trend(figures: dict) -> str:
        return "" if figures["slope_last3"] is None else f" ({figures['slope_last3']:+.4f}/round)"

    for row in report["per_round"]:
        diff = row[f"{a}_minus_{b}"]
        print(
            f"round {row['round']:>2}: {a} {row[a]['mean']:.3f}{trend(row[a])}"
            f"  {b} {row[b]['mean']:.3f}{trend(row[b])}"
            f"  {a} - {b} {diff['mean']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}]"
            f" min {diff['min']:+.4f}"
        )
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
