"""Pooled mode on the emulated stack: one client function per architecture pool serves many
simulated clients (terraform/'s `deployment_mode = "pooled"`), each client's data and records
still under its own root in its pool's folder, behind the Cloud Run front ends and the IAM
gates, as `flwr-kd cloud emulate --deployment-mode pooled` starts it.

One stack and one tiny FedDF round (8 clients, 2 architectures) for the whole module.
"""

from __future__ import annotations

import uuid

import pytest
from serverless_fixtures import ARCHS, experiment_flags, invocation_docs, list_objects

from flwr_kd.cli import _parser, config_from_args
from flwr_kd.serverless import names

pytest_plugins = ["serverless_fixtures"]

CLIENTS = 8
POOLED_BUCKET = "kd-tests-pooled"  # this module's own bucket: every object in it is this run's


@pytest.fixture(scope="module")
def pooled(cloud_env, tmp_path_factory):
    """(stack, deployment, result, invocation documents, object names of the bucket) of one
    FedDF round on a pooled stack, driven by this process as the driver."""
    from flwr_kd.serverless.driver import drive
    from flwr_kd.serverless.emulate import EmulatedStack
    from flwr_kd.serverless.grid import GridOptions
    from flwr_kd.serverless.policy import deployment_policy, experiment_tfvars

    out = tmp_path_factory.mktemp("pooled")
    flags = [*experiment_flags("feddf", 1), "--clients", str(CLIENTS), "--out", str(out)]
    cfg = config_from_args(_parser().parse_args(["cloud", "emulate", *flags]))
    run = f"pooled-{uuid.uuid4().hex[:8]}"
    logs = tmp_path_factory.mktemp("pooled-logs")
    with EmulatedStack(cfg, bucket=POOLED_BUCKET, log_dir=logs, mode="pooled") as stack:
        assert stack.policy == deployment_policy(
            experiment_tfvars(cfg, stack.project, "flwr-kd", "pooled")
        )
        deployment = stack.deployment()
        result = drive(cfg, deployment, run, options=GridOptions(auth=stack.auth))
        docs = invocation_docs(run, 1)  # as the driver, the one identity that may read them
        objects = list_objects(POOLED_BUCKET)  # as the driver, too (bucket-wide)
    return stack, deployment, result, docs, objects


def test_pooled_round_completes_with_a_function_per_pool(pooled):
    stack, deployment, result, _, _ = pooled
    kinds = sorted(s.kind for s in stack.policy.services.values())
    assert kinds == ["aggregator"] * len(ARCHS) + ["pool"] * len(ARCHS)
    assert sorted(stack.functions) == sorted(stack.policy.services)
    assert len({c.url for c in deployment.clients}) == len(ARCHS)  # clients share their pool's
    [row] = result["rounds"]
    assert row["replies"] == CLIENTS and row["dropped"] == []
    assert set(row["distill"]) == set(ARCHS)
    assert result["serverless"]["invocations"]["failed_calls"] == 0


def test_each_clients_data_lies_under_its_root_in_its_pools_folder(pooled):
    stack, deployment, _, _, objects = pooled
    pool_of_arch = {
        s.arch: s.client_root for s in stack.policy.services.values() if s.kind == "pool"
    }
    roots = {}
    for client in deployment.clients:
        assert client.root.startswith(pool_of_arch[client.arch]), client
        assert client.root == names.client_root(client.client_id, names.pool_of_root(client.root))
        roots[client.client_id] = client.root
    assert len(set(roots.values())) == CLIENTS
    for cid, root in roots.items():
        mine = [o for o in objects if o.startswith(root)]
        assert any(o.startswith(f"{root}data/") and o.endswith("private.npz") for o in mine), cid
        assert any(o.startswith(f"{root}outbox/") for o in mine), cid
    # nothing of a client anywhere else: only public data, aggregation, the driver's runs/
    elsewhere = [o for o in objects if not any(o.startswith(r) for r in roots.values())]
    assert all(o.split("/")[0] in {"public", "aggregators", "runs"} for o in elsewhere), elsewhere


def test_the_storage_gate_denied_nothing(pooled):
    stack = pooled[0]
    records = stack.access_log.records()
    assert records and stack.access_log.denied() == []
    pools = {s.identity for s in stack.policy.services.values() if s.kind == "pool"}
    assert pools <= {r.identity for r in records}  # each pool acted as its own identity


def test_each_invocation_record_names_its_caller(pooled):
    stack, _, _, docs, _ = pooled
    driver = stack.policy.identities["driver"]
    client_docs = [d for by_id in docs.values() for d in by_id.values()]
    assert len(docs[1]) >= CLIENTS
    assert {d.get("caller") for d in client_docs} == {driver}
