"""A per-node index of pending messages for Flower's in-memory LinkState, so that a simulation
round costs what its participants cost, not what the population costs.

Flower 1.42's Simulation Engine looks for work with one `LinkState.get_message_ins(node_id,
limit=1)` call per simulated node every 0.1 s (`vce_api.add_messages_to_queue`), and the
in-memory LinkState answers each call by checking every stored message (its TTL and its nodes'
federation, `_check_stored_messages`) before comparing its destination: nodes x messages checks
per tick, under the state's lock, in the process that also runs the ServerApp. At 1,000 nodes
with 10-20 messages stored that pass takes 75-100 ms of each 100 ms tick (docs/simulation.md).

`install_poll_index(grid)` gives that LinkState instance a record of which stored instructions
each node has not been handed yet: `store_message_ins` adds to it, and `get_message_ins`
looks only at the asking node's own entries, with Flower's own checks on those entries (expiry,
federation, run id, limit, delivery mark). The index is a superset of what is pending: entries
whose message was deleted, expired or delivered by any other path are dropped when their node
next asks, so Flower's answers are unchanged (tests/test_simulation_poll.py compares them call
by call). It applies only where the grid is Flower's `InMemoryGrid` over an exact
`InMemoryLinkState` with the attributes it relies on; anywhere else (a deployed SuperLink, the
serverless runtime, another Flower version's layout) it changes nothing. `-c poll-index=false`
leaves Flower's poll as it is.
"""

from __future__ import annotations

import threading

from flwr.supercore.date import now  # Flower's own delivery timestamp, as its method uses

#: What the index relies on in Flower's in-memory LinkState (checked before installing).
_REQUIRED = ("lock", "message_ins_store", "_check_stored_messages")


class PendingByNode:
    """The installed index: node id -> ids of its stored, not yet delivered instructions, in
    the order they were stored (Flower hands them out in that order)."""

    def __init__(self, state) -> None:
        self.state = state
        self._pending: dict[int, dict[str, None]] = {}
        self._store_message_ins = state.store_message_ins  # Flower's, bound to the instance

    def install(self) -> None:
        """Replace the instance's two methods and index what is already stored."""
        with self.state.lock:
            self.state.store_message_ins = self.store_message_ins
            self.state.get_message_ins = self.get_message_ins
            for message_id, message in self.state.message_ins_store.items():
                if message.metadata.delivered_at == "":
                    self._add(message.metadata.dst_node_id, message_id)

    def _add(self, node_id: int, message_id: str) -> None:
        self._pending.setdefault(node_id, {})[message_id] = None

    def store_message_ins(self, message) -> str | None:
        """Flower's `store_message_ins`, then the stored message is indexed under its node."""
        with self.state.lock:  # re-entrant: Flower's method takes it too
            message_id = self._store_message_ins(message)
            if message_id is not None and message_id in self.state.message_ins_store:
                self._add(message.metadata.dst_node_id, message_id)
        return message_id

    def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None):
        """Flower's `get_message_ins`, over the asking node's own entries only."""
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        found = []
        with self.state.lock:
            entries = self._pending.get(node_id)
            if not entries:
                return found
            for message_id in list(entries):
                if limit and len(found) == limit:
                    break
                self.state._check_stored_messages({message_id})  # may delete it (expired)
                message = self.state.message_ins_store.get(message_id)
                if message is None or message.metadata.delivered_at != "":
                    del entries[message_id]  # gone, or handed out by another path
                elif run_id is None or message.metadata.run_id == run_id:
                    found.append(message)
                    del entries[message_id]
            if not entries:
                del self._pending[node_id]
            if found:
                delivered_at = now().isoformat()
                for message in found:
                    message.metadata.delivered_at = delivered_at
        return found


_INSTALL_LOCK = threading.Lock()


def install_poll_index(grid) -> bool:
    """Index the pending messages of `grid`'s LinkState if it is Flower's in-memory one (a
    simulation); True if the index is in place (installed now or before), False if this grid
    is not one it applies to."""
    try:
        from flwr.server.superlink.linkstate import InMemoryLinkState
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # another Flower layout: leave it alone
        return False
    state = getattr(grid, "state", None)
    if not isinstance(grid, InMemoryGrid) or type(state) is not InMemoryLinkState:
        return False
    if not all(hasattr(state, name) for name in _REQUIRED):
        return False
    with _INSTALL_LOCK:
        if isinstance(getattr(state.get_message_ins, "__self__", None), PendingByNode):
            return True
        PendingByNode(state).install()
    return True


def in_memory_link(num_nodes: int):
    """Flower's in-memory LinkState and grid with `num_nodes` registered nodes and one run, as
    its simulation engine builds them: `(state, grid, node_ids)`, for measuring and testing the
    engine's poll (benchmarks/scale.py, tests/test_simulation_poll.py)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    nodes = list(_register_nodes(num_nodes, factory))
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, "@none/default", None, None, "serverapp")
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    grid = InMemoryGrid(factory)
    grid.set_run(Run.create_empty(run_id))
    return state, grid, nodes
