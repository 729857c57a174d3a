"""Shared fixtures: one torch thread, small data splits, and a clean data cache."""

from __future__ import annotations

import pytest
import torch

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
