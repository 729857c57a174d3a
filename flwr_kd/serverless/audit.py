"""Is a run's record complete? The checks behind `flwr-kd cloud audit RUN` and the soak.

A complete run: every round `done`, with its global models on Cloud Storage (checksums
intact); no call left `running`; every reply the driver left out carries the driver's reason in
its invocation document; and each round's reply count equals the calls that ended `done` and
were not left out (a retried call counted once).
"""

from __future__ import annotations

from flwr_kd import protocol
from flwr_kd.serverless import names
from flwr_kd.serverless.arraystore import ArrayStoreError, GcsArrayStore
from flwr_kd.serverless.callrecords import DONE, RUNNING
from flwr_kd.serverless.roundstore import RoundStore

TRAINING = (protocol.TRAIN, protocol.FEDMD_ROUND)


def audit_run(run_id: str, rounds: RoundStore, store: GcsArrayStore) -> list[str]:
    """The problems found in `run_id`'s records (empty: complete)."""
    run = rounds.get_run(run_id)
    num_rounds = int(run["config"]["num-server-rounds"])
    problems = []
    if run.get("status") != DONE:
        problems.append(f"run status is '{run.get('status')}', not done")
    round_docs = {d["round"]: d for d in rounds.rounds(run_id)}
    for r in range(1, num_rounds + 1):
        doc = round_docs.get(r)
        if doc is None or doc.get("status") != DONE:
            problems.append(f"round {r}: status {doc and doc.get('status')!r}, not done")
            continue
        try:
            store.get(names.global_object(run_id, r))
        except ArrayStoreError as exc:
            problems.append(f"round {r}: global models unreadable: {exc}")
        calls = {d["id"]: d for d in rounds.invocations(run_id, r)}
        problems += [
            f"round {r}: call {c} still running"
            for c, d in calls.items()
            if d.get("status") == RUNNING
        ]
        by_node = {}  # (node id, message type) -> a client call's document
        for c, d in calls.items():
            if not names.is_aggregator_call(c):
                client_id, kind = names.split_client_call(c)
                by_node[(names.node_id_for(client_id), kind)] = d
        for entry in doc.get("dropped", []):
            call = by_node.get((entry["node"], entry.get("type")))
            if call is None or call.get("dropped") != entry["reason"]:
                problems.append(
                    f"round {r}: left-out reply of node {entry['node']} has no verdict "
                    "in its invocation document"
                )
        accepted = sum(
            1
            for (_, kind), d in by_node.items()
            if kind in TRAINING and d.get("status") == DONE and "dropped" not in d
        )
        if accepted != doc.get("replies"):
            problems.append(
                f"round {r}: {doc.get('replies')} replies recorded, "
                f"{accepted} calls done and accepted"
            )
    return problems
