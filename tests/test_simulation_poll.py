"""The per-node index of pending messages (flwr_kd.simulation_poll) answers Flower's simulation
engine exactly as Flower's own in-memory LinkState does, call by call, on real LinkStates."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flwr_kd.simulation_poll import PendingByNode, in_memory_link, install_poll_index


def _push(grid, node: int, tag: str, ttl: float | None = None) -> str:
    TaskIdentity.run_id = grid.run.run_id  # a Message takes its run from the process' task
    content = RecordDict({"tag": ConfigRecord({"tag": tag})})
    message = Message(content, dst_node_id=node, message_type="train", ttl=ttl)
    return next(iter(grid.push_messages([message])))


def _tags(messages) -> list[str]:
    return [str(m.content.config_records["tag"]["tag"]) for m in messages]


def _pair():
    """Two LinkStates with the same nodes: Flower's own, and one with the index installed
    after one message was already stored (it must be indexed too)."""
    plain, plain_grid, nodes = in_memory_link(6)
    indexed, indexed_grid, indexed_nodes = in_memory_link(6)
    assert len(nodes) == len(indexed_nodes) == 6
    _push(plain_grid, nodes[0], "before-install")
    _push(indexed_grid, indexed_nodes[0], "before-install")
    assert install_poll_index(indexed_grid)
    return (plain, plain_grid, nodes), (indexed, indexed_grid, indexed_nodes)


def test_answers_as_flowers_own_get_message_ins():
    links = _pair()
    script = [  # (node index, tag, ttl)
        (0, "a0", None),
        (0, "a1", None),
        (1, "b0", None),
        (3, "d0", 0.2),
        (0, "a2", None),
    ]
    for state, grid, nodes in links:
        for i, tag, ttl in script:
            _push(grid, nodes[i], tag, ttl)
    time.sleep(0.3)  # d0 has expired: both must drop it, not deliver it

    def ask(state, nodes, i, limit):
        return _tags(state.get_message_ins(node_id=nodes[i], limit=limit))

    calls = [(0, 1), (0, 1), (1, None), (2, 1), (3, 1), (0, None), (0, 1), (1, 1), (5, None)]
    answers = [[ask(state, nodes, i, limit) for i, limit in calls] for state, _, nodes in links]
    assert answers[0] == answers[1]
    assert answers[1] == [["before-install"], ["a0"], ["b0"], [], [], ["a1", "a2"], [], [], []]
    plain, indexed = links[0][0], links[1][0]
    assert indexed.num_message_ins() == plain.num_message_ins()  # d0 deleted by both
    delivered = [m for m in indexed.message_ins_store.values() if m.metadata.delivered_at]
    assert len(delivered) == len(indexed.message_ins_store)  # everything left is delivered


def test_messages_deleted_elsewhere_are_not_handed_out():
    _, (state, grid, nodes) = _pair()
    kept = _push(grid, nodes[2], "kept")
    gone = _push(grid, nodes[2], "gone")
    state.delete_messages({gone})  # e.g. a run stopped, or its reply pulled
    assert _tags(state.get_message_ins(node_id=nodes[2], limit=None)) == ["kept"]
    assert state.message_ins_store[kept].metadata.delivered_at != ""


def test_a_pushed_message_is_stored_once_and_indexed_once():
    _, (state, grid, nodes) = _pair()
    first = _push(grid, nodes[4], "once")
    # storing it again: Flower returns the stored id, and the node still gets it once
    assert state.store_message_ins(state.message_ins_store[first]) == first
    assert len(state.get_message_ins(node_id=nodes[4], limit=None)) == 1
    assert state.get_message_ins(node_id=nodes[4], limit=None) == []


def test_a_message_for_another_run_stays_pending():
    _, (state, grid, nodes) = _pair()
    _push(grid, nodes[1], "this-run")
    run_id = grid.run.run_id
    assert state.get_message_ins(node_id=nodes[1], limit=None, run_id=run_id + 1) == []
    assert _tags(state.get_message_ins(node_id=nodes[1], limit=None, run_id=run_id)) == ["this-run"]


def test_limit_below_one_is_refused_as_flower_refuses_it():
    _, (state, _, nodes) = _pair()
    with pytest.raises(AssertionError, match="limit"):
        state.get_message_ins(node_id=nodes[0], limit=0)


def test_installs_once_and_only_on_flowers_in_memory_grid():
    (plain, _, _), (indexed, indexed_grid, _) = _pair()
    method = indexed.get_message_ins
    assert isinstance(method.__self__, PendingByNode)
    assert install_poll_index(indexed_grid)  # already in place: unchanged
    assert indexed.get_message_ins == method
    assert not install_poll_index(object())  # a deployed or serverless grid: left alone
    assert not isinstance(getattr(plain.get_message_ins, "__self__", None), PendingByNode)


def test_poll_index_is_on_by_default_and_a_run_config_key():
    from flwr_kd.experiment import ConfigError, ExperimentConfig

    assert ExperimentConfig().poll_index is True
    assert ExperimentConfig.from_run_config({"poll-index": False}).poll_index is False
    with pytest.raises(ConfigError, match="poll-index"):
        ExperimentConfig.from_run_config({"poll-index": "sometimes"})
