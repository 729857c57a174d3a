"""Who may do what in a deployment, as terraform/ grants it: the one source of the identities,
grants and services that the emulated stack enforces (storagegate, firestoregate) and starts.

The real `terraform` binary evaluates a provider-less copy of terraform/variables.tf and
locals.tf with a tfvars generated from the experiment, so the emulated permissions are the
module's own, never a hand copy. `AccessLog` records each decision the gates make, as Cloud
Audit Logs' data-access entries do: it is what the permission tests read.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = ROOT / "terraform"
#: Terraform without network: no version check, no prompts.
TF_ENV = {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1", "TF_INPUT": "0"}
#: The locals a policy is read from (terraform/locals.tf, docs/permissions.md).
POLICY_LOCALS = (
    "identities",
    "storage_grants",
    "firestore_identities",
    "project_roles",
    "services",
    "arrays_bucket",
    "sources_bucket",
    "logs_bucket",
)


class PolicyError(RuntimeError):
    """Terraform could not evaluate the module's locals (its message is Terraform's)."""


def terraform_binary() -> str:
    binary = shutil.which("terraform") or "/usr/local/bin/terraform"
    if not Path(binary).exists():
        raise PolicyError("terraform is needed to read the deployment's permissions (not found)")
    return binary


def _terraform(module: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [terraform_binary(), *args],
        cwd=module,
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
        env={**TF_ENV, "TF_CLI_CONFIG_FILE": str(module.parent / "tf.rc")},
    )


def prepare_module(workdir: Path, probe: Mapping[str, str], source: Path = TERRAFORM_DIR) -> Path:
    """<workdir>/terraform: variables.tf + locals.tf of `source` (no provider, no resource) and
    an output "locals" = {key: expression} of `probe`, initialised; cloud/ and flwr_kd/ are
    linked beside it, as in the repository, so path-based locals see the real sources.
    An existing copy is reused."""
    module = workdir / "terraform"
    if module.exists():
        return module
    module.mkdir(parents=True)
    for name in ("variables.tf", "locals.tf"):
        shutil.copy(source / name, module / name)
    for name in ("cloud", "flwr_kd"):
        (workdir / name).symlink_to(ROOT / name, target_is_directory=True)
    values = "".join(f"    {key} = {expr}\n" for key, expr in probe.items())
    (module / "probe.tf").write_text(f'output "locals" {{\n  value = {{\n{values}  }}\n}}\n')
    (workdir / "tf.rc").write_text("")
    init = _terraform(module, "init", "-backend=false", "-input=false", "-no-color")
    if init.returncode != 0:
        raise PolicyError(init.stdout + init.stderr)
    return module


def apply_module(module: Path, var_file: Path, *extra_args: str) -> subprocess.CompletedProcess:
    """`terraform apply` of a prepared module with `var_file` (and e.g. `-var=...` args)."""
    args = ("apply", "-auto-approve", "-input=false", "-no-color", f"-var-file={var_file}")
    return _terraform(module, *args, *extra_args)


def module_output(module: Path) -> dict:
    """The probed locals of the last apply."""
    out = _terraform(module, "output", "-json", "locals", timeout=60)
    if out.returncode != 0:
        raise PolicyError(out.stderr)
    return json.loads(out.stdout)


# ------------------------------------------------------------------------------ the policy


@dataclass(frozen=True)
class StorageGrant:
    """One role on a managed folder of the arrays bucket ("" = the whole bucket)."""

    folder: str
    role: str
    identity: str


@dataclass(frozen=True)
class Service:
    """One function (Cloud Run service) and the identity it runs as."""

    name: str
    kind: str  # "client" | "pool" | "aggregator"
    identity: str
    arch: str
    client_root: str | None
    max_instances: int
    concurrency: int
    timeout_seconds: int
    invokers: tuple[str, ...]

    @classmethod
    def from_local(cls, name: str, value: dict) -> Service:
        """From one entry of `local.services` (extra attributes are ignored)."""
        return cls(
            name=name,
            kind=value["kind"],
            identity=value["identity"],
            arch=value["arch"],
            client_root=value.get("client_root"),
            max_instances=int(value["max_instances"]),
            concurrency=int(value["concurrency"]),
            timeout_seconds=int(value["timeout_seconds"]),
            invokers=tuple(value["invokers"]),
        )


@dataclass(frozen=True)
class DeploymentPolicy:
    """terraform/'s locals for one tfvars: identity keys (`driver`, `aggregator`,
    `client:<id>`, `pool:<slug>`) -> e-mails, their Cloud Storage grants, who may use
    Firestore, their roles on the project, the services, and the bucket names."""

    identities: Mapping[str, str]
    storage_grants: tuple[StorageGrant, ...]
    firestore_identities: frozenset[str]
    project_roles: Mapping[str, tuple[str, ...]]  # identity -> roles on the project
    services: Mapping[str, Service]
    buckets: Mapping[str, str]  # "arrays" | "sources" | "logs" -> name

    @classmethod
    def from_locals(cls, values: dict) -> DeploymentPolicy:
        return cls(
            identities=dict(values["identities"]),
            storage_grants=tuple(
                StorageGrant(g["folder"], g["role"], g["identity"])
                for g in values["storage_grants"]
            ),
            firestore_identities=frozenset(values["firestore_identities"]),
            project_roles={k: tuple(v) for k, v in values["project_roles"].items()},
            services={name: Service.from_local(name, s) for name, s in values["services"].items()},
            buckets={k: values[f"{k}_bucket"] for k in ("arrays", "sources", "logs")},
        )

    def grants_of(self, identity: str) -> list[StorageGrant]:
        return [g for g in self.storage_grants if g.identity == identity]


def experiment_tfvars(
    cfg, project: str, name_prefix: str = "flwr-kd", mode: str = "isolated"
) -> dict:
    """The tfvars of a deployment of `cfg`: client `client-<i>` runs partition i's
    architecture (as `ExperimentConfig.arch_of_partition`), or, pooled, `cfg.num_clients`
    simulated clients share one function per architecture."""
    tfvars = {
        "project": project,
        "name_prefix": name_prefix,
        "architectures": list(cfg.arch_list),
        "deployment_mode": mode,
    }
    if mode == "pooled":
        return {**tfvars, "pool_clients": cfg.num_clients}
    clients = {
        f"client-{i}": {"architecture": cfg.arch_of_partition(i)} for i in range(cfg.num_clients)
    }
    return {**tfvars, "clients": clients}


_lock = threading.Lock()


@functools.cache
def _workdir() -> Path:
    """One evaluation directory per process, removed when it exits (by that process only: a
    forked child must not remove its parent's)."""
    path, owner = Path(tempfile.mkdtemp(prefix="flwr-kd-policy-")), os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return path


@functools.cache
def _evaluate(tfvars_json: str, source: Path) -> DeploymentPolicy:
    key = hashlib.sha256(f"{source}\n{tfvars_json}".encode()).hexdigest()[:16]
    workdir = _workdir() / key
    module = prepare_module(workdir, {k: f"local.{k}" for k in POLICY_LOCALS}, source)
    var_file = workdir / "deployment.tfvars.json"
    var_file.write_text(tfvars_json)
    proc = apply_module(module, var_file)
    if proc.returncode != 0:
        raise PolicyError(proc.stdout + proc.stderr)
    return DeploymentPolicy.from_locals(module_output(module))


def deployment_policy(tfvars: dict, source: Path | None = None) -> DeploymentPolicy:
    """The policy of terraform/ (or the module at `source`) for `tfvars`, evaluated once per
    content in this process."""
    with _lock:
        return _evaluate(json.dumps(tfvars, sort_keys=True), Path(source or TERRAFORM_DIR))


# ------------------------------------------------------------------------------ audit


@dataclass(frozen=True)
class AccessRecord:
    """One decision of an emulated IAM check, like a data-access audit log entry."""

    service: str  # "storage" | "firestore"
    identity: str
    email: str
    method: str  # e.g. "objects.insert", "Commit"
    permission: str
    resource: str  # object name, list prefix, bucket or database
    allowed: bool
    time: float


class AccessLog:
    """Every decision of the gates, in order (thread-safe); also appended as JSON lines to
    `path` when given (the stack's log directory)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path, self._lock, self._records = path, threading.Lock(), []

    def record(self, **fields) -> AccessRecord:
        entry = AccessRecord(time=time.time(), **fields)
        with self._lock:
            self._records.append(entry)
            if self.path is not None:
                with self.path.open("a") as fh:
                    fh.write(json.dumps(asdict(entry)) + "\n")
        return entry

    def records(self, since: int = 0) -> list[AccessRecord]:
        """Every record after the first `since` (see `mark`)."""
        with self._lock:
            return self._records[since:]

    def mark(self) -> int:
        """A position to read `records(since=...)` from."""
        with self._lock:
            return len(self._records)

    def denied(self, since: int = 0) -> list[AccessRecord]:
        return [r for r in self.records(since) if not r.allowed]
