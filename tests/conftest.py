"""Shared fixtures: one torch thread, small data splits, a clean data cache, and the server's
task identity for tests that drive strategies on the in-process grid (`inprocess_grid.py`)."""

from __future__ import annotations

import pytest
import torch
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from inprocess_grid import RUN_ID

from flwr_kd.data import DataSpec, FederatedData, load_federated


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread, and results stay reproducible."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def clean_data_cache():
    """`load_federated` is cached per spec; tests that change the environment clear it."""
    load_federated.cache_clear()
    yield
    load_federated.cache_clear()


@pytest.fixture(scope="session")
def digits() -> FederatedData:
    """The embedded digits dataset (16x16 grayscale, 10 classes) split over 2 clients."""
    return load_federated(DataSpec(dataset="digits", num_partitions=2, alpha=None))


@pytest.fixture
def server_task_identity():
    """Messages created server-side take their run and source node from the task identity,
    which Flower's runtime sets before a ServerApp runs; do the same, and restore it.

    Not autouse: the Ray end-to-end test (test_cli.py) lets Flower's simulation set it. Modules
    that use `InProcessGrid` request it with `pytestmark = pytest.mark.usefixtures(...)`."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
