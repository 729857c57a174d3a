"""What a serverless run cost and survived, for `result.json`'s `serverless` section: the
driver's view of each call (time, bytes) and what the invocation documents say (faults
injected, attempts, take-overs, failures, replies left out), read from their structured
`events` (`callrecords.fault_event` etc.)."""

from __future__ import annotations

import numpy as np

from flwr_kd.serverless.callrecords import FAILED, FAULT, TOOK_OVER
from flwr_kd.serverless.grid import CloudFunctionGrid
from flwr_kd.serverless.roundstore import RoundStore


def overhead_summary(grid: CloudFunctionGrid) -> dict:
    """Per-invocation time beside the compute inside the function, and bytes per round."""
    calls = [c for c in grid.options.calls if not c.error]
    per_round: dict[int, int] = {}
    for c in grid.options.calls:
        per_round[c.server_round] = (
            per_round.get(c.server_round, 0) + c.bytes_request + c.bytes_reply + c.bytes_objects
        )
    if not calls:
        return {"calls": 0}
    total = float(np.mean([c.seconds for c in calls]))
    compute = float(np.mean([c.compute_seconds for c in calls]))
    return {
        "calls": len(grid.options.calls),
        "failed_calls": sum(1 for c in grid.options.calls if c.error),
        "mean_call_seconds": round(total, 4),
        "mean_compute_seconds": round(compute, 4),
        "mean_overhead_seconds": round(total - compute, 4),
        "overhead_share": round((total - compute) / total, 4) if total else 0.0,
        "bytes_per_round": {str(r): b for r, b in sorted(per_round.items())},
    }


def reliability_summary(rounds: RoundStore, run_id: str, num_rounds: int) -> dict:
    """What the run's invocation documents say: faults injected (by kind), attempts, retried
    and taken-over calls, calls that ended failed, and replies left out, per round."""
    injected: dict[str, int] = {}
    summary = {
        "calls": 0,
        "attempts": 0,
        "retried_calls": 0,
        "taken_over": 0,
        "failed_calls": 0,
        "left_out": 0,
    }
    for server_round in range(num_rounds + 1):
        for doc in rounds.invocations(run_id, server_round):
            summary["calls"] += 1
            summary["attempts"] += int(doc.get("attempts", 0))
            summary["retried_calls"] += int(doc.get("attempts", 0)) > 1
            summary["failed_calls"] += doc.get("status") == FAILED
            summary["left_out"] += "dropped" in doc
            for event in doc.get("events", []):
                if event.get("event") == FAULT:
                    injected[event["fault"]] = injected.get(event["fault"], 0) + 1
                summary["taken_over"] += event.get("event") == TOOK_OVER
    return {
        **summary,
        "injected": dict(sorted(injected.items())),
        "injected_total": sum(injected.values()),
    }


def reliability_line(rel: dict) -> str:
    """One line on the run's calls, for the end of `cloud run`."""
    kinds = ", ".join(f"{k} {n}" for k, n in rel["injected"].items())
    faults = f"; faults injected {rel['injected_total']} ({kinds})" if rel["injected_total"] else ""
    return (
        f"calls {rel['calls']}, attempts {rel['attempts']}: {rel['retried_calls']} retried, "
        f"{rel['taken_over']} taken over after a crash, {rel['failed_calls']} failed; "
        f"replies left out {rel['left_out']}{faults}"
    )
