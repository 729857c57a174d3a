"""What each node is, learned once per node with a `query.architecture`: the timm architecture
it runs, and the fingerprint of the public set it holds (if any)."""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from flwr_kd import protocol
from flwr_kd.publicset import FINGERPRINT_KEY


class ArchitectureRegistry:
    def __init__(self, min_available_nodes: int = 2) -> None:
        self.min_available_nodes = min_available_nodes
        self.arch_of: dict[int, str] = {}
        self.public_of: dict[int, str] = {}  # node -> fingerprint of the public set it holds

    def refresh(self, grid: Grid, config: ConfigRecord) -> dict[int, str]:
        """Wait for enough nodes, ask those not seen yet, and return {node: arch} of the
        connected nodes that answered."""
        return self.describe(grid, config, self.connected(grid))

    def connected(self, grid: Grid) -> list[int]:
        """The connected nodes, once there are at least `min_available_nodes`."""
        while len(node_ids := list(grid.get_node_ids())) < self.min_available_nodes:
            log(
                INFO,
                "Waiting for nodes: %d of %d connected",
                len(node_ids),
                self.min_available_nodes,
            )
            time.sleep(1)
        return node_ids

    def describe(self, grid: Grid, config: ConfigRecord, node_ids: list[int]) -> dict[int, str]:
        """Ask those of `node_ids` not seen yet; {node: arch} of those that ever answered."""
        unknown = [n for n in node_ids if n not in self.arch_of]
        if unknown:
            queries = [
                Message(
                    RecordDict({protocol.CONFIG: config}),
                    dst_node_id=n,
                    message_type=protocol.DESCRIBE,
                )
                for n in unknown
            ]
            for msg in grid.send_and_receive(queries):
                node = msg.metadata.src_node_id
                if msg.has_error():
                    log(WARNING, "node %s did not describe itself: %s", node, msg.error.reason)
                    continue
                answer = msg.content[protocol.CONFIG]
                self.arch_of[node] = str(answer["arch"])
                if FINGERPRINT_KEY in answer:
                    self.public_of[node] = str(answer[FINGERPRINT_KEY])
            log(INFO, "Architectures: %s", count_by_value(self.arch_of.values()))
        return {n: self.arch_of[n] for n in node_ids if n in self.arch_of}

    def having(self, node_ids: list[int], archs, described: bool = False) -> list[int]:
        """`node_ids` less those known to run an architecture not in `archs` (logged) and, once
        `described`, less those that did not answer. While every node runs one of `archs`, a
        draw among all connected nodes, described only once drawn, is a draw among all
        described nodes: sampling before describing costs what the sample costs."""
        kept = []
        for n in node_ids:
            arch = self.arch_of.get(n)
            if arch in archs or (arch is None and not described):
                kept.append(n)
            elif arch is not None:
                log(
                    WARNING,
                    "node %s has architecture '%s', which has no global model: skipped",
                    n,
                    arch,
                )
        return kept


def count_by_value(values) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in counts.items())
