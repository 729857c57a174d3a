"""Scale: 1,000 clients with 1% taking part in each round, against 10 clients all taking part.

    python benchmarks/scale.py                 # writes benchmarks/results/scale/scale.json
    python benchmarks/run.py --sections scale       # the same, into the mode's summary.json

Every run gives each client the same data (Fashion-MNIST, IID, `PER_CLIENT` private samples
each) and runs the same FedAvg rounds of 10 clients, side by side in this process' run: 10
clients, 1,000 clients, and 1,000 clients with Flower's own poll (`-c poll-index=false`):

- `scale_round_time_ratio_1000_vs_10`: the median round time after round 1 (round 1 starts
  Ray's actors and loads their data; the median, since this machine's cores are shared). Each
  round of the 1,000-client run also asks the next round's newly sampled nodes for their
  architecture, while its clients train, which the 10-client run did once in round 1;
- `scale_peak_memory_ratio_1000_vs_10`: the peak resident memory of the whole process tree
  (`flwr-kd`, Flower's SuperLink and simulation process, Ray and its actors), sampled with
  psutil over the children of `flwr-kd`, recursively;
- `scale_round_time_ratio_1000_vs_10_flower_poll`: the same ratio without flwr-kd's per-node
  index of pending messages (flwr_kd.simulation_poll);
- `flower_poll_ms_per_tick`: one pass of Flower's simulation engine over its nodes (one
  `LinkState.get_message_ins` call per node, every 0.1 s) on Flower's in-memory LinkState with
  10 messages pending, at 10 and at 1,000 nodes, as Flower ships it and with the index.

Needs Fashion-MNIST (`sudo apt-get install dataset-fashion-mnist`). Tiny model, 1 local epoch,
no baseline: about 7 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, flwr_kd, save

PER_CLIENT = 40  # private samples per client: 32 to train on, 8 held out
PARTICIPANTS = 10  # clients per round, in both runs
POPULATIONS = (10, 1000)
ROUNDS = 10  # the median of 9 rounds after the first: a round is about a second here


def scale_args(clients: int, rounds: int, strategy: str = "fedavg") -> list[str]:
    """`flwr-kd simulate` arguments of one population: the same data per client and the same
    10 participants per round."""
    return [
        "simulate",
        *("--strategy", strategy, "--dataset", "fashion-mnist", "--clients", str(clients)),
        *("--partitioner", "iid", "--alpha", "0", "--rounds", str(rounds)),
        *("--archs", "test_resnet", "--local-epochs", "1", "--distill-steps", "5"),
        "--no-baseline",
        *("-c", f"fraction-train={PARTICIPANTS / clients}"),
        *("-c", f"max-private={PER_CLIENT * clients}", "-c", "max-test=500"),
        *("-c", "public-fraction=0.05", "-c", "subset-size=500"),
    ]


def flower_poll_seconds(num_nodes: int, pending: int = 10, ticks: int = 5, index=False) -> float:
    """One pass of Flower's simulation engine over its nodes (`vce_api.add_messages_to_queue`)
    on its in-memory LinkState, with `pending` messages stored; `index`: with flwr-kd's
    per-node index of pending messages (flwr_kd.simulation_poll)."""
    from flwr.app import Message, RecordDict

    from flwr_kd.simulation_poll import in_memory_link, install_poll_index

    state, grid, nodes = in_memory_link(num_nodes)
    if index:
        install_poll_index(grid)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]
    grid.push_messages(messages[:pending])
    t0 = time.perf_counter()
    for _ in range(ticks):
        for node in nodes:
            state.get_message_ins(node_id=node, limit=1)
    return (time.perf_counter() - t0) / ticks


def _round_times(result: dict) -> list[float]:
    return [row["seconds"] for row in result["rounds"]]


#: The runs, side by side: (key in scale.json, population, extra arguments). The last one is
#: the 1,000-client run with Flower's own poll (no per-node index), for comparison.
RUNS = (
    ("10", 10, []),
    ("1000", 1000, []),
    ("1000_flower_poll", 1000, ["-c", "poll-index=false"]),
)


def scale_section(out: Path, rounds: int = ROUNDS, strategy: str = "fedavg") -> dict:
    """The runs of `RUNS`, one after the other, in subprocesses; the ratios and their inputs."""
    runs = {}
    for key, clients, extra in RUNS:
        result, memory = flwr_kd([*scale_args(clients, rounds, strategy), *extra], out / key, True)
        times = _round_times(result)
        runs[key] = {
            "round_seconds": times,
            "round_seconds_after_first": round(float(np.median(times[1:])), 3),
            "phases": [row["time"] for row in result["rounds"]],
            "client_compute": [row["client_compute"] for row in result["rounds"]],
            "replies": [row["replies"] for row in result["rounds"]],
            "wall_seconds": result["wall_seconds"],
            **memory,
        }

    def ratio(key: str, field: str) -> float:
        return round(runs[key][field] / runs["10"][field], 3)

    poll = {
        f"{n}{suffix}": round(1000 * flower_poll_seconds(n, index=index), 2)
        for n in POPULATIONS
        for suffix, index in (("", False), ("_indexed", True))
    }
    data = {
        "config": {
            "strategy": strategy,
            "rounds": rounds,
            "participants_per_round": PARTICIPANTS,
            "private_samples_per_client": PER_CLIENT,
        },
        "runs": runs,
        "scale_round_time_ratio_1000_vs_10": ratio("1000", "round_seconds_after_first"),
        "scale_peak_memory_ratio_1000_vs_10": ratio("1000", "peak_total_mib"),
        "scale_round_time_ratio_1000_vs_10_flower_poll": ratio(
            "1000_flower_poll", "round_seconds_after_first"
        ),
        "flower_poll_ms_per_tick": poll,
    }
    save(out, "scale", data)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--strategy", default="fedavg")
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / "scale"
    out.mkdir(parents=True, exist_ok=True)
    data = scale_section(out, args.rounds, args.strategy)
    print(json.dumps({k: v for k, v in data.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
