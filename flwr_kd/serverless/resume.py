"""Resuming a serverless run after its driver died (`cloud run --resume RUN`).

What a resumed run trusts is what only the driver can write: the run document in Firestore
(its config, the last round done) and the global models in `runs/<run>/global/` (Cloud
Storage, driver only). Its `result.json` covers the whole run: the rounds before the resume
come from their round documents (statistics and scores, written as each round ended).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from flwr_kd.experiment import ExperimentConfig
from flwr_kd.records import state_to_record
from flwr_kd.runner import RuntimeHooks, round_rows
from flwr_kd.serverless import names
from flwr_kd.serverless.arraystore import GcsArrayStore
from flwr_kd.serverless.roundstore import RoundStore


def resume_hooks(
    cfg: ExperimentConfig, rounds: RoundStore, store: GcsArrayStore, run_id: str
) -> tuple[ExperimentConfig, RuntimeHooks]:
    """The run's own config (with this call's out dir) and where it stopped."""
    run = rounds.get_run(run_id)
    cfg = dataclasses.replace(ExperimentConfig.from_run_config(run["config"]), out_dir=cfg.out_dir)
    hooks = RuntimeHooks(rounds_done=int(run.get("last_done_round", 0)))
    if hooks.rounds_done >= cfg.num_server_rounds:
        raise ValueError(
            f"run '{run_id}' finished all {cfg.num_server_rounds} rounds; nothing to resume"
        )
    if hooks.rounds_done:
        global_models = names.global_object(run_id, hooks.rounds_done)
        hooks.resume_arrays = state_to_record(store.get(global_models))
    print(f"resuming run {run_id} at round {hooks.rounds_done + 1} of {cfg.num_server_rounds}")
    return cfg, hooks


class _RecordedStats:
    """A round's statistics as its round document kept them (`RoundStats.to_dict()`)."""

    def __init__(self, stats: dict) -> None:
        self.stats = stats

    def to_dict(self) -> dict:
        return self.stats


def earlier_rows(rounds: RoundStore, run_id: str, upto: int) -> list[dict]:
    """The report's rows of rounds 1..`upto`, from their round documents (as `round_rows`
    builds them from a live strategy)."""
    docs = [d for d in rounds.rounds(run_id) if 1 <= d["round"] <= upto and "scores" in d]
    strategy = SimpleNamespace(stats={d["round"]: _RecordedStats(d.get("stats", {})) for d in docs})
    no_client_eval = SimpleNamespace(evaluate_metrics_clientapp={})
    return round_rows([d["scores"] for d in docs], strategy, no_client_eval, 0)
