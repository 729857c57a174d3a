"""What each node is, learned once per node with a `query.architecture`: the timm architecture
it runs, and the fingerprint of the public set it holds (if any).

A round that samples a few nodes of many asks the next round's sample while its own clients
train (`prefetch`), so describing new nodes is off the round's critical path: one message round
trip (a poll interval of the grid, 3 s on a deployed SuperLink) less per round."""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from flwr_kd import protocol
from flwr_kd.publicset import FINGERPRINT_KEY

#: How long `collect` waits for answers, and how often it looks (Flower's InMemoryGrid's pull
#: interval).
COLLECT_TIMEOUT, PULL_INTERVAL = 600.0, 0.1


class ArchitectureRegistry:
    def __init__(self, min_available_nodes: int = 2) -> None:
        self.min_available_nodes = min_available_nodes
        self.arch_of: dict[int, str] = {}
        self.public_of: dict[int, str] = {}  # node -> fingerprint of the public set it holds
        self._asked: dict[str, int] = {}  # message id -> node, queries not answered yet

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
        """Ask those of `node_ids` not seen yet (and take the answers of queries in flight);
        {node: arch} of those that ever answered."""
        self.prefetch(grid, config, node_ids)
        self.collect(grid)
        return {n: self.arch_of[n] for n in node_ids if n in self.arch_of}

    def prefetch(self, grid: Grid, config: ConfigRecord, node_ids: list[int]) -> None:
        """Ask those of `node_ids` neither seen nor asked yet, without waiting for the answers:
        `collect` (or the next `describe`) takes them."""
        asking = set(self._asked.values())
        queries = [
            Message(
                RecordDict({protocol.CONFIG: config}), dst_node_id=n, message_type=protocol.DESCRIBE
            )
            for n in node_ids
            if n not in self.arch_of and n not in asking
        ]
        grid.push_messages(queries)  # sets each message's id
        self._asked.update({q.metadata.message_id: q.metadata.dst_node_id for q in queries})

    def collect(self, grid: Grid, timeout: float = COLLECT_TIMEOUT) -> None:
        """Wait up to `timeout` seconds for the answers of every query in flight and learn
        from them; a node that did not answer is asked again when it is next sampled."""
        deadline = time.monotonic() + timeout
        learned = bool(self._asked)
        while self._asked:
            for msg in grid.pull_messages(list(self._asked)):
                node = self._asked.pop(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
                self._learn(node, msg)
            if self._asked and time.monotonic() > deadline:
                log(
                    WARNING,
                    "nodes %s did not describe themselves in %ss",
                    sorted(self._asked.values()),
                    timeout,
                )
                self._asked.clear()
            elif self._asked:
                time.sleep(PULL_INTERVAL)
        if learned:
            log(INFO, "Architectures: %s", count_by_value(self.arch_of.values()))

    def _learn(self, node: int, msg: Message) -> None:
        if msg.has_error():
            log(WARNING, "node %s did not describe itself: %s", node, msg.error.reason)
            return
        answer = msg.content[protocol.CONFIG]
        self.arch_of[node] = str(answer["arch"])
        if FINGERPRINT_KEY in answer:
            self.public_of[node] = str(answer[FINGERPRINT_KEY])

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
