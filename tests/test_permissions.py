"""Identities and permissions, enforced in the emulated stack as terraform/ grants them.

The tests use the session's emulated stack (`gated_stack`: 4 isolated clients, 2
architectures, each function process acting as its own service account through the storage
and Firestore gates). The isolation tests act as an identity from this process, through that
identity's own gate ports, holding exactly its permissions; the normal runs drive the stack
from this process acting as the driver. The permission-table tests hold docs/permissions.md to
Terraform (statically, isolated and pooled) and to what a normal FedDF and FedMD run did (the
gates' access log).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.api_core import exceptions as gexc
from serverless_fixtures import ARCHS, PROJECT, STACK_CLIENTS, experiment_flags

from flwr_kd.cli import _parser, config_from_args
from flwr_kd.experiment import ExperimentConfig
from flwr_kd.serverless import deployment as deployment_api
from flwr_kd.serverless.firestoregate import DENIED
from flwr_kd.serverless.grid import GridOptions
from flwr_kd.serverless.policy import deployment_policy, experiment_tfvars
from flwr_kd.serverless.storagegate import ROLE_PERMISSIONS

pytest_plugins = ["serverless_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "permissions.md"
#: Roles outside Cloud Storage, with the permissions of theirs the table may name (Google's role
#: pages are linked in docs/permissions.md).
OTHER_ROLES = {
    "roles/datastore.user": {
        f"datastore.{p}"
        for p in (
            "entities.create",
            "entities.update",
            "entities.get",
            "entities.list",
            "entities.delete",
            "databases.get",
            "databases.getMetadata",
        )
    },
    "roles/cloudfunctions.viewer": {
        "cloudfunctions.functions.get",
        "cloudfunctions.functions.list",
        "cloudfunctions.locations.list",
        "cloudfunctions.operations.get",
        "cloudfunctions.operations.list",
    },
    "roles/run.invoker": {"run.routes.invoke"},
    "roles/run.viewer": {"run.services.get", "run.services.list", "run.locations.list"},
}
#: Methods of the Cloud Functions API client and the permission each needs (Cloud Functions IAM
#: permissions page). A method the driver calls that is not here fails the test.
FUNCTIONS_API = {
    "list_functions": "cloudfunctions.functions.list",
    "get_function": "cloudfunctions.functions.get",
}
PLACEHOLDER = re.compile(r"<(id|slug)>")


# ------------------------------------------------------------------------------ the table


def _pattern(text: str, bound: dict[str, str]) -> str:
    """A regex of a table cell: `<id>`/`<slug>` bound to a value, or captured."""
    out, pos = "", 0
    for m in PLACEHOLDER.finditer(text):
        name = m.group(1)
        value = re.escape(bound[name]) if name in bound else f"(?P<{name}>[a-z0-9][a-z0-9-]*)"
        out, pos = out + re.escape(text[pos : m.start()]) + value, m.end()
    return out + re.escape(text[pos:])


@dataclass(frozen=True)
class Row:
    identity: str  # an identity key, maybe with a placeholder: `client:<id>`
    permissions: frozenset[str]
    role: str
    where: str  # "bucket", a folder such as "clients/<id>/outbox/", "database", ...

    @property
    def storage(self) -> bool:
        return self.where == "bucket" or self.where.endswith("/")

    def bind(self, identity: str) -> dict[str, str] | None:
        m = re.fullmatch(_pattern(self.identity, {}), identity)
        return m.groupdict() if m else None

    def folder_of(self, identity: str, resource: str) -> str | None:
        """The folder ("" for the bucket) of this row that covers `resource` for `identity`."""
        bound = self.bind(identity)
        if bound is None or not self.storage:
            return None
        if self.where == "bucket":
            return ""
        m = re.match(_pattern(self.where, bound), resource)
        return m.group(0) if m else None

    def instances(self, policy) -> list[tuple[str, str]]:
        """(identity, folder) of this storage row in a deployment: its placeholders bound to
        the deployment's client ids and pool slugs."""
        values = {
            kind: [k.split(":", 1)[1] for k in policy.identities if k.startswith(f"{key}:")]
            for kind, key in (("id", "client"), ("slug", "pool"))
        }
        out = []
        for identity in policy.identities:
            bound = self.bind(identity)
            if bound is None:
                continue
            if self.where == "bucket":
                out.append((identity, ""))
                continue
            free = [n for n in PLACEHOLDER.findall(self.where) if n not in bound]
            for value in values[free[0]] if free else [None]:
                names = {**bound, **({free[0]: value} if free else {})}
                folder = PLACEHOLDER.sub(lambda m, n=names: n[m.group(1)], self.where)
                out.append((identity, folder))
        return out


def table_rows() -> list[Row]:
    rows = []
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not re.fullmatch(r"`[a-z]+(:<[a-z]+>)?`", cells[0]):
            continue
        rows.append(
            Row(
                identity=cells[0].strip("`"),
                permissions=frozenset(re.findall(r"`([a-z]+(?:\.[A-Za-z]+)+)`", cells[2])),
                role=cells[3].strip("`"),
                where=cells[4].strip("`"),
            )
        )
    assert len(rows) >= 10, f"permission table not found in {TABLE}"
    return rows


def policies() -> dict[str, object]:
    """terraform/'s policy of a 3-client, 2-architecture deployment, isolated and pooled."""
    cfg = ExperimentConfig(num_clients=3, archs="resnet10t,test_vit")
    return {m: deployment_policy(experiment_tfvars(cfg, PROJECT, mode=m)) for m in MODES}


MODES = ("isolated", "pooled")


# ------------------------------------------------------------------------------ static checks


def test_every_rows_role_holds_its_permissions():
    for row in table_rows():
        known = ROLE_PERMISSIONS.get(row.role) or OTHER_ROLES.get(row.role)
        assert known is not None, f"{row}: role unknown to the test (add it with its source)"
        assert row.permissions and row.permissions <= known, (row, row.permissions - known)


def test_terraform_grants_every_row_and_the_table_names_every_grant():
    rows = table_rows()
    used = {id(row): 0 for row in rows}
    for mode, policy in policies().items():
        granted = {(g.identity, g.folder, g.role) for g in policy.storage_grants}
        granted |= {(i, "project", r) for i, roles in policy.project_roles.items() for r in roles}
        listed = set()
        for row in rows:
            if row.storage:
                found = {(i, f, row.role) for i, f in row.instances(policy)}
                assert found <= granted, f"{mode}: Terraform lacks {sorted(found - granted)}"
                listed |= found
            elif row.where == "project":  # isolated and pooled check readiness differently
                found = {
                    (i, "project", row.role) for i in policy.identities if row.bind(i) is not None
                }
                listed |= found & granted
                found &= granted
            elif row.where == "database":
                found = [i for i in policy.identities if row.bind(i) is not None]
                assert row.role == "roles/datastore.user", row
                assert set(found) <= policy.firestore_identities, (mode, row)
            else:
                assert row.where == "each service", f"unknown 'where' in {row}"
                found = [i for i in policy.identities if row.bind(i) is not None]
                assert row.role == "roles/run.invoker", row
                for service in policy.services.values():
                    assert set(found) <= set(service.invokers), (mode, row, service)
            used[id(row)] += len(found)
        assert granted <= listed, f"{mode}: grants missing from the table: {granted - listed}"
        invokers = {i for s in policy.services.values() for i in s.invokers}
        for identity in invokers | set(policy.firestore_identities):
            assert any(r.bind(identity) is not None and not r.storage for r in rows), identity
    unused = [r for r in rows if not used[id(r)]]
    assert not unused, f"rows Terraform grants in neither mode: {unused}"


class RecordingFunctionsClient:
    """Stands in for `functions_v2.FunctionServiceClient`: records each method called."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            return []

        return call


def test_the_drivers_cloud_functions_calls_are_in_the_table():
    client = RecordingFunctionsClient()
    deployment_api.check_active(PROJECT, "europe-west1", [], client=client)  # isolated mode
    with pytest.raises(deployment_api.DeploymentError):
        deployment_api.discover(PROJECT, "europe-west1", "flwr-kd", client=client)
    assert client.calls, "the driver's checks called nothing on the Cloud Functions API"
    unknown = set(client.calls) - set(FUNCTIONS_API)
    assert not unknown, f"add the permission of {unknown} to FUNCTIONS_API and the table"
    rows = [r for r in table_rows() if r.identity == "driver" and r.where == "project"]
    for method in set(client.calls):
        permission = FUNCTIONS_API[method]
        row = next((r for r in rows if permission in r.permissions), None)
        assert row is not None, f"the table has no row for the driver's {permission}"
        assert row.role in policies()["isolated"].project_roles.get("driver", ()), (
            f"terraform/ does not grant the driver {row.role}: its {method} call "
            f"({permission}) would get PermissionDenied"
        )


# ------------------------------------------------------------------------------ the stack


def experiment(strategy: str, out: Path, rounds: int = 2) -> ExperimentConfig:
    """A tiny experiment for the session stack's clients and architectures."""
    flags = [*experiment_flags(strategy, rounds), "--clients", str(STACK_CLIENTS)]
    flags += ["--archs", ",".join(ARCHS), "--out", str(out)]
    return config_from_args(_parser().parse_args(["cloud", "run", *flags]))


@pytest.fixture(scope="module")
def stack(cloud_env, gated_stack):
    return gated_stack.stack


@pytest.fixture(scope="module")
def runs(stack, tmp_path_factory) -> dict:
    """A normal 2-round FedDF run and a 1-round FedMD run (its round 1 makes every kind of
    call FedMD makes), driven by this process as the driver; what the gates recorded during
    each."""
    from flwr_kd.serverless.driver import drive

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in stack.identity_env["driver"].items():
            mp.setenv(key, value)
        for strategy, rounds in (("feddf", 2), ("fedmd", 1)):
            cfg = experiment(strategy, tmp_path_factory.mktemp(strategy), rounds)
            mark = stack.access_log.mark()
            run = f"perm-{strategy}-{uuid.uuid4().hex[:6]}"
            drive(cfg, stack.deployment(), run, options=GridOptions(auth=stack.auth))
            out[strategy] = stack.access_log.records(mark)
    return out


def bucket_as(stack, identity: str):
    """The arrays bucket through `identity`'s own gate: this process then holds exactly that
    identity's permissions."""
    from google.cloud import storage

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", stack.identity_env[identity]["STORAGE_EMULATOR_HOST"])
        return storage.Client(project=PROJECT).bucket(stack.bucket)


def firestore_as(stack, identity: str):
    from google.cloud import firestore

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "FIRESTORE_EMULATOR_HOST", stack.identity_env[identity]["FIRESTORE_EMULATOR_HOST"]
        )
        return firestore.Client(project=PROJECT)


def client_roots(stack) -> dict[str, str]:
    """Client identity -> its root prefix (terraform/'s `services`)."""
    return {s.identity: s.client_root for s in stack.policy.services.values() if s.kind == "client"}


@pytest.fixture(scope="module")
def probes(stack) -> str:
    """A private object in each client's data, put there by the driver: `<root>data/<probe>`."""
    probe = f"probe-{uuid.uuid4().hex[:6]}/private.npz"
    driver = bucket_as(stack, "driver")
    for root in client_roots(stack).values():
        driver.blob(f"{root}data/{probe}").upload_from_string(root.encode(), if_generation_match=0)
    return probe


def denied_since(stack, mark: int) -> set[tuple[str, str, str]]:
    return {(r.identity, r.permission, r.resource) for r in stack.access_log.denied(mark)}


def forbidden(call, identity_email: str, permission: str) -> None:
    """`call()` gets Cloud Storage's 403 naming the identity and the missing permission."""
    with pytest.raises(gexc.Forbidden) as exc:
        call()
    assert f"{identity_email} does not have {permission} access" in str(exc.value), exc.value


# ------------------------------------------------------------------------------ isolation


def test_a_client_cannot_read_another_clients_data(stack, probes):
    (me, mine), (_, other) = sorted(client_roots(stack).items())[:2]
    bucket, email = bucket_as(stack, me), stack.policy.identities[me]
    mark = stack.access_log.mark()
    assert bucket.blob(f"{mine}data/{probes}").download_as_bytes() == mine.encode()
    read = bucket.blob(f"{other}data/{probes}").download_as_bytes
    forbidden(read, email, "storage.objects.get")
    for prefix in (other, f"{other}data/", "clients/", ""):
        forbidden(lambda p=prefix: list(bucket.list_blobs(prefix=p)), email, "storage.objects.list")
    assert (me, "storage.objects.get", f"{other}data/{probes}") in denied_since(stack, mark)


def test_a_client_cannot_write_outside_its_prefix(stack, probes):
    (me, mine), (_, other) = sorted(client_roots(stack).items())[:2]
    bucket, email = bucket_as(stack, me), stack.policy.identities[me]
    mark = stack.access_log.mark()
    outside = [f"{other}outbox/forged/reply.json", f"{other}state/node.npz"]
    outside += [f"{mine}data/mine.npz", f"{mine}inbox/forged.npz", "public/forged.npz"]
    outside += ["aggregators/forged/student.npz", "runs/forged/global/1.npz"]
    for name in outside:
        create = bucket.blob(name).upload_from_string
        forbidden(lambda c=create: c(b"{}", if_generation_match=0), email, "storage.objects.create")
    forbidden(bucket.blob(f"{other}data/{probes}").delete, email, "storage.objects.delete")
    assert {(me, "storage.objects.create", n) for n in outside} <= denied_since(stack, mark)


def test_a_client_cannot_overwrite_its_own_outbox_objects(stack):
    me, mine = min(client_roots(stack).items())
    bucket, email = bucket_as(stack, me), stack.policy.identities[me]
    name = f"{mine}outbox/probe-{uuid.uuid4().hex[:6]}/reply.json"
    bucket.blob(name).upload_from_string(b"first", if_generation_match=0)
    mark = stack.access_log.mark()
    replace = bucket.blob(name).upload_from_string
    forbidden(lambda: replace(b"second"), email, "storage.objects.delete")
    forbidden(bucket.blob(name).delete, email, "storage.objects.delete")
    with pytest.raises(gexc.PreconditionFailed):  # create-only: refused by the bucket itself
        replace(b"second", if_generation_match=0)
    assert bucket_as(stack, "driver").blob(name).download_as_bytes() == b"first"
    assert (me, "storage.objects.delete", name) in denied_since(stack, mark)


def test_an_aggregator_cannot_read_private_data(stack, probes):
    bucket, email = bucket_as(stack, "aggregator"), stack.policy.identities["aggregator"]
    for root in client_roots(stack).values():
        read = bucket.blob(f"{root}data/{probes}").download_as_bytes
        forbidden(read, email, "storage.objects.get")
        for prefix in (f"{root}data/", root):
            listing = lambda p=prefix: list(bucket.list_blobs(prefix=p))
            forbidden(listing, email, "storage.objects.list")
        list(bucket.list_blobs(prefix=f"{root}outbox/"))  # its replies are the aggregator's input


def test_functions_touching_firestore_get_permission_denied(stack):
    mark = stack.access_log.mark()
    functions = sorted({s.identity for s in stack.policy.services.values()})
    for identity in functions:
        doc = firestore_as(stack, identity).document("runs/forged")
        with pytest.raises(gexc.PermissionDenied, match=re.escape(DENIED)):
            doc.get()
        with pytest.raises(gexc.PermissionDenied, match=re.escape(DENIED)):
            doc.set({"status": "done"})
    assert not firestore_as(stack, "driver").document("runs/forged").get().exists
    denied = {(r.identity, r.service) for r in stack.access_log.denied(mark)}
    assert denied == {(identity, "firestore") for identity in functions}


# ------------------------------------------------------------------------------ normal runs


@pytest.mark.parametrize("strategy", ["feddf", "fedmd"])
def test_a_normal_run_records_no_denied_call(runs, strategy):
    denied = [
        (r.identity, r.method, r.permission, r.resource) for r in runs[strategy] if not r.allowed
    ]
    assert not denied, f"{len(denied)} denied calls, e.g. {denied[:10]}"


def test_each_function_process_acts_as_its_own_identity(stack, runs):
    seen = {r.identity for records in runs.values() for r in records}
    assert seen == set(stack.policy.identities), seen ^ set(stack.policy.identities)


def test_every_call_of_a_normal_run_is_in_the_permission_table(runs):
    rows = table_rows()
    missing = set()
    for record in (r for records in runs.values() for r in records):
        candidates = [r for r in rows if record.permission in r.permissions]
        if record.service == "storage":
            ok = any(r.folder_of(record.identity, record.resource) is not None for r in candidates)
        else:
            ok = any(
                r.where == "database" and r.bind(record.identity) is not None for r in candidates
            )
        if not ok:
            prefix = "/".join(record.resource.split("/")[:2])
            missing.add((record.identity, record.service, record.permission, prefix))
    assert not missing, f"calls not in docs/permissions.md: {sorted(missing)}"
