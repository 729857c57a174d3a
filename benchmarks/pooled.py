"""Pooled mode at 100 clients: what a FedDF round costs when one function per architecture pool
serves every simulated client (terraform/'s `deployment_mode = "pooled"`), on the emulated stack.

    python benchmarks/pooled.py   # writes benchmarks/results/pooled.json, its REPORT.md section

The same run as `flwr-kd cloud emulate --deployment-mode pooled` with `flags()` (3 pools and 3
aggregators behind the Cloud Run front ends, each acting as its service account through the
IAM gates), driven in this process so that the driver's view of each call can be set beside
what the functions recorded. Per round:

- wall time, and the strategy's phases (`result.json`);
- calls: client calls (round 0 asks each client its architecture) and aggregator calls;
- bytes down (what the driver wrote for the functions: client inboxes, aggregator tasks, HTTP
  request bodies) and up (what the functions wrote: client outboxes, aggregator results and
  call records, HTTP reply bodies), listed from the bucket; beside them the strategy's own
  count of the payload (`result.json`'s `bytes`);
- per-call overhead: of the client calls' time as the driver saw it (HTTP round trip, its
  message upload and reply checks), the share the functions report as compute, the share
  inside the function that is not compute (storage reads and writes, call records, model
  build), and the share outside the function.

Tiny models and data so it runs in a few minutes on 2 cores: digits, IID, 1 local epoch, 5
distillation steps, no baseline. Each emulated pool is one process serving one request at a
time (`emulate.EMULATED_INSTANCES`), so the driver keeps one call in flight per pool
(`--max-concurrency 3`): driver-observed time is then not time spent queueing at a busy front
end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "pooled.json"
REPORT = ROOT / "benchmarks" / "REPORT.md"
HEADING = "## Pooled mode (emulated serverless)"
ARCHS = "test_resnet,test_vit,test_efficientnet"
PHASES = ("configure", "clients", "distill")  # of a FedDF round (`result.json`'s `time`)


def flags(clients: int, rounds: int) -> list[str]:
    """`flwr-kd cloud emulate` flags of the measured run."""
    return [
        *("--deployment-mode", "pooled", "--strategy", "feddf", "--dataset", "digits"),
        *("--clients", str(clients), "--partitioner", "iid", "--alpha", "0"),
        *("--rounds", str(rounds), "--archs", ARCHS, "--local-epochs", "1"),
        *("--distill-steps", "5", "--no-baseline", "--max-concurrency", "3"),
        *("-c", "subset-size=100"),
    ]


def storage_bytes(objects: dict[str, int], roots: list[str], run: str, r: int, archs) -> dict:
    """Bytes of the objects of round `r`: in the clients' inboxes and outboxes, and the
    aggregators' tasks and results (with call records)."""
    from flwr_kd.serverless import names

    def under(prefixes: list[str], keep=lambda name: True) -> int:
        return sum(size for n, size in objects.items() if n.startswith(tuple(prefixes)) and keep(n))

    aggregators = [names.aggregator_prefix(run, r, arch) for arch in archs]

    def is_task(name: str) -> bool:
        return name.rsplit("/", 1)[-1].startswith("task-")

    return {
        "client_inboxes": under([names.inbox_prefix(root, run, r) for root in roots]),
        "client_outboxes": under([names.outbox_prefix(root, run, r) for root in roots]),
        "aggregator_tasks": under(aggregators, is_task),
        "aggregator_results": under(aggregators, lambda n: not is_task(n)),
    }


def round_figures(r: int, row: dict | None, calls: list, docs: list[dict], stored: dict) -> dict:
    """One round's time, calls, bytes and per-call overhead."""
    from flwr_kd.serverless import names

    client_docs = [d for d in docs if not names.is_aggregator_call(d["id"])]
    driver = sum(c.seconds for c in calls)
    total = sum(float(d.get("seconds", {}).get("total", 0.0)) for d in client_docs)
    compute = sum(float(d.get("seconds", {}).get("compute", 0.0)) for d in client_docs)
    requests, replies = sum(c.bytes_request for c in calls), sum(c.bytes_reply for c in calls)
    down = stored["client_inboxes"] + stored["aggregator_tasks"] + requests
    up = stored["client_outboxes"] + stored["aggregator_results"] + replies
    share = (lambda x: round(x / driver, 4)) if driver else (lambda x: 0.0)
    return {
        "round": r,
        "wall_seconds": row["seconds"] if row else None,
        "phase_seconds": row["time"] if row else {},
        "client_calls": len(calls),
        "aggregator_calls": len(docs) - len(client_docs),
        "bytes_down": down,
        "bytes_up": up,
        "bytes": {**stored, "http_requests": requests, "http_replies": replies},
        "strategy_bytes": row["bytes"] if row else {},
        "client_call_seconds": {
            "driver_observed": round(driver, 3),
            "function_total": round(total, 3),
            "function_compute": round(compute, 3),
        },
        "overhead_share": {
            "compute": share(compute),
            "function_not_compute": share(total - compute),
            "outside_function": share(driver - total),
        },
    }


def measure(clients: int, rounds: int) -> dict:
    """Start a pooled stack, drive the run, and read back what it cost."""
    from flwr_kd.cli import _parser, config_from_args
    from flwr_kd.serverless.driver import drive
    from flwr_kd.serverless.emulate import EmulatedStack
    from flwr_kd.serverless.grid import GridOptions
    from flwr_kd.serverless.roundstore import RoundStore

    logging.getLogger("flwr").setLevel(logging.WARNING)
    argv = ["cloud", "emulate", *flags(clients, rounds)]
    args = _parser().parse_args([*argv, "--out", tempfile.mkdtemp(prefix="flwr-kd-pooled-")])
    cfg = config_from_args(args)
    run = f"pooled-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    with EmulatedStack(cfg, mode=args.deployment_mode) as stack:
        started = time.perf_counter() - t0
        options = GridOptions(max_concurrency=args.max_concurrency, auth=stack.auth)
        deployment = stack.deployment()
        result = drive(cfg, deployment, run, options=options)
        ran = time.perf_counter() - t0 - started
        from google.cloud import storage

        bucket = storage.Client(project=stack.project).bucket(stack.bucket)
        objects = {b.name: b.size for b in bucket.list_blobs()}
        docs = {r: RoundStore().invocations(run, r) for r in range(rounds + 1)}
        statuses: dict[str, int] = {}
        for front in stack.front_ends.values():
            for entry in front.log:
                statuses[str(entry.status)] = statuses.get(str(entry.status), 0) + 1
        kinds = [s.kind for s in stack.policy.services.values()]
        denied = len(stack.access_log.denied())
    roots = [c.root for c in deployment.clients]
    rows = {row["round"]: row for row in result["rounds"]}
    per_round = [
        round_figures(
            r,
            rows.get(r),
            [c for c in options.calls if c.server_round == r],
            docs[r],
            storage_bytes(objects, roots, run, r, cfg.arch_list),
        )
        for r in range(rounds + 1)
    ]
    return {
        "command": "flwr-kd cloud emulate " + " ".join(flags(clients, rounds)),
        "clients": clients,
        "architectures": cfg.arch_list,
        "rounds": rounds,
        "services": {k: kinds.count(k) for k in sorted(set(kinds))},
        "stack_start_seconds": round(started, 1),
        "run_seconds": round(ran, 1),
        "per_round": per_round,
        "final_accuracy": result["rounds"][-1]["accuracy"],
        "front_end_statuses": statuses,
        "storage_denials": denied,
        "reliability": result["serverless"]["reliability"],
    }


def section(data: dict) -> list[str]:
    """The REPORT.md section on `data` (pooled.json)."""
    services = ", ".join(f"{n} {k}" for k, n in data["services"].items())
    archs, retried = ", ".join(data["architectures"]), data["reliability"]["retried_calls"]
    intro = (
        f"`python benchmarks/pooled.py`, i.e. `{data['command']}`: {data['clients']} clients "
        f"of {archs} served by {services} functions (one process each, one request at a "
        f"time). Stack start {data['stack_start_seconds']} s, run {data['run_seconds']} s; "
        f"front-end answers {data['front_end_statuses']}, storage-gate denials "
        f"{data['storage_denials']}, retried calls {retried}. Round 0 asks each client its "
        "architecture. Bytes down: client inboxes + aggregator tasks + request bodies; up: "
        "client outboxes + aggregator results and call records + reply bodies (from the "
        "bucket's listing). Overhead: shares of the client calls' time as the driver saw it "
        "(it includes writing the message to the client's inbox); inside the function, what is "
        "not compute is Cloud Storage: the message, the client's data (a pool instance keeps "
        "2 clients' data cached, so each call reads its client's anew), the call records, the "
        "reply. Round 1's configure phase includes round 0's calls."
    )
    lines = [
        HEADING,
        "",
        intro,
        "",
        (
            "| round | wall s | configure / clients / distill s | client calls | "
            "aggregator calls | bytes down | bytes up | "
            "strategy down / up | driver-observed call s | function total s | compute s | "
            "compute share | in function, not compute | outside function |"
        ),
        "|" + " --- |" * 14,
    ]
    for r in data["per_round"]:
        s, share, b = r["client_call_seconds"], r["overhead_share"], r["strategy_bytes"]
        strategy = f"{b['down']:,} / {b['up']:,}" if b else "-"
        phases = " / ".join(str(r["phase_seconds"].get(k, "-")) for k in PHASES)
        lines.append(
            f"| {r['round']} | {r['wall_seconds'] or '-'} | {phases} | {r['client_calls']} | "
            f"{r['aggregator_calls']} | {r['bytes_down']:,} | {r['bytes_up']:,} | {strategy} | "
            f"{s['driver_observed']} | {s['function_total']} | {s['function_compute']} | "
            f"{share['compute']} | {share['function_not_compute']} | "
            f"{share['outside_function']} |"
        )
    lines += ["", f"Final accuracy: {data['final_accuracy']}.", ""]
    return lines


def write_section(data: dict, report: Path = REPORT) -> None:
    """Put the section into REPORT.md in place of an earlier one (at the end if none):
    `benchmarks/run.py` rewrites the rest of the file, `make bench` runs this after it."""
    lines = report.read_text().splitlines() if report.exists() else []
    if HEADING in lines:
        start = lines.index(HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), None)
        lines = lines[:start] + (lines[end:] if end is not None else [])
    while lines and not lines[-1].strip():
        lines.pop()
    report.write_text("\n".join([*lines, "", *section(data)]).rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULT, help="the JSON to write")
    parser.add_argument("--no-report", action="store_true", help="leave REPORT.md alone")
    args = parser.parse_args()
    data = measure(args.clients, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    if not args.no_report:
        write_section(data)
    print(f"wrote {args.out}" + ("" if args.no_report else f" and {REPORT}"))


if __name__ == "__main__":
    main()
