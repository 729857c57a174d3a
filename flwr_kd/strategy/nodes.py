"""Which timm architecture each node runs, learned once per node with a `query.architecture`."""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from flwr_kd import protocol


class ArchitectureRegistry:
    def __init__(self, min_available_nodes: int = 2) -> None:
        self.min_available_nodes = min_available_nodes
        self.arch_of: dict[int, str] = {}

    def refresh(self, grid: Grid, config: ConfigRecord) -> dict[int, str]:
        """Wait for enough nodes, ask those not seen yet, and return {node: arch} of the
        connected nodes that answered."""
        while len(node_ids := list(grid.get_node_ids())) < self.min_available_nodes:
            log(
                INFO,
                "Waiting for nodes: %d of %d connected",
                len(node_ids),
                self.min_available_nodes,
            )
            time.sleep(1)
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
                self.arch_of[node] = str(msg.content[protocol.CONFIG]["arch"])
            log(INFO, "Architectures: %s", count_by_value(self.arch_of.values()))
        return {n: self.arch_of[n] for n in node_ids if n in self.arch_of}


def count_by_value(values) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in counts.items())
