"""Run, round and invocation records on Firestore: enough to watch a run and to resume it.

Only the driver reads or writes Firestore (functions hold no role on it). A run's document
holds the config and the strategy state after each finished round; a round's document its
status, statistics and scores; an invocation's document one function call, written by the
driver from the call records the function created in its own outbox (`callrecords`,
`invocations`). The paths are `names`'s (docs/serverless.md). Events are merged with
`ArrayUnion`, never read back and rewritten (the emulator is slow under contended
transactions).
"""

from __future__ import annotations

from google.api_core import exceptions as gexc
from google.cloud import firestore

from flwr_kd.serverless import names
from flwr_kd.serverless.callrecords import DONE, FAILED, RUNNING, left_out_event

__all__ = ["DONE", "FAILED", "RUNNING", "RoundStore"]


class RoundStore:
    def __init__(self, client: firestore.Client | None = None, database: str | None = None) -> None:
        self.db = client or firestore.Client(database=database or "(default)")

    # -- documents ------------------------------------------------------------------------

    def run_ref(self, run: str):
        return self.db.document(names.run_document(run))

    def round_ref(self, run: str, server_round: int):
        return self.db.document(names.round_document(run, server_round))

    def invocation_ref(self, run: str, server_round: int, call: str):
        return self.db.document(names.invocation_document(run, server_round, call))

    # -- runs -----------------------------------------------------------------------------

    def create_run(self, run: str, config: dict, strategy: str) -> None:
        try:
            self.run_ref(run).create(
                {
                    "config": config,
                    "strategy": strategy,
                    "status": RUNNING,
                    "last_done_round": 0,
                    "created": firestore.SERVER_TIMESTAMP,
                    "updated": firestore.SERVER_TIMESTAMP,
                }
            )
        except gexc.Conflict as exc:
            raise ValueError(f"run '{run}' exists already; resume it with --resume {run}") from exc

    def get_run(self, run: str) -> dict:
        snap = self.run_ref(run).get()
        if not snap.exists:
            raise KeyError(f"no run '{run}' in Firestore")
        return snap.to_dict()

    def finish_run(self, run: str, status: str = DONE, result: dict | None = None) -> None:
        self.run_ref(run).update(
            {
                "status": status,
                "updated": firestore.SERVER_TIMESTAMP,
                **({"result": result} if result else {}),
            }
        )

    # -- rounds ---------------------------------------------------------------------------

    def start_round(self, run: str, server_round: int) -> None:
        self.round_ref(run, server_round).set(
            {"round": server_round, "status": RUNNING, "started": firestore.SERVER_TIMESTAMP},
            merge=True,
        )

    def record_round(self, run: str, server_round: int, record: dict) -> None:
        """What is known of a round before it is done (its statistics once aggregated)."""
        self.round_ref(run, server_round).set(record, merge=True)

    def finish_round(self, run: str, server_round: int, record: dict, state: dict) -> None:
        """Mark the round done and store the strategy state that resuming needs, in one batch."""
        batch = self.db.batch()
        batch.set(
            self.round_ref(run, server_round),
            {**record, "round": server_round, "status": DONE, "ended": firestore.SERVER_TIMESTAMP},
            merge=True,
        )
        batch.update(
            self.run_ref(run),
            {
                "state": state,
                "last_done_round": server_round,
                "updated": firestore.SERVER_TIMESTAMP,
            },
        )
        batch.commit()

    def fail_round(self, run: str, server_round: int, error: str) -> None:
        self.round_ref(run, server_round).set(
            {"status": FAILED, "error": error, "ended": firestore.SERVER_TIMESTAMP}, merge=True
        )

    def rounds(self, run: str) -> list[dict]:
        docs = self.db.collection(names.rounds_collection(run)).order_by("round").stream()
        return [d.to_dict() for d in docs]

    def invocations(self, run: str, server_round: int) -> list[dict]:
        return [
            d.to_dict() | {"id": d.id}
            for d in self.db.collection(names.invocations_collection(run, server_round)).stream()
        ]

    # -- invocations (written by the driver, from the functions' call records) ---------------

    def start_invocation(self, run: str, server_round: int, call: str, message_id: str) -> None:
        """The driver sent the call (again): `running` from now."""
        self.invocation_ref(run, server_round, call).set(
            {"status": RUNNING, "message_id": message_id, "started": firestore.SERVER_TIMESTAMP},
            merge=True,
        )

    def end_invocation(
        self, run: str, server_round: int, call: str, record: dict, events: list[dict]
    ) -> None:
        """The call's outcome; a success clears an earlier attempt's error (kept in `events`,
        merged with those already there)."""
        cleared = {} if "error" in record else {"error": firestore.DELETE_FIELD}
        self.invocation_ref(run, server_round, call).set(
            {
                **cleared,
                **record,
                **({"events": firestore.ArrayUnion(events)} if events else {}),
                "ended": firestore.SERVER_TIMESTAMP,
            },
            merge=True,
        )

    def record_verdict(
        self, run: str, server_round: int, call: str, reason: str, known: dict
    ) -> None:
        """Why the driver left this call's reply out of the round, with what the call records
        say (`known`: attempts and events). A call still `running` then (its process died, or
        it straggles past the deadline) is marked failed; a straggler that finishes later
        records its own outcome over it."""
        ref = self.invocation_ref(run, server_round, call)
        snap = ref.get()
        still_running = snap.exists and snap.to_dict().get("status") == RUNNING
        ref.set(
            {
                "dropped": reason,
                "attempts": known.get("attempts", 0),
                "events": firestore.ArrayUnion([*known.get("events", []), left_out_event(reason)]),
                **(
                    {"status": FAILED, "error": f"the driver gave up on this call: {reason}"}
                    if still_running
                    else {}
                ),
            },
            merge=True,
        )
