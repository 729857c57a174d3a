"""Real local stand-ins for the serverless tests (`test_serverless.py`): fake-gcs-server and the
Firestore emulator for the session, a small "deployment" of functions-framework processes
(client and aggregator functions of `cloud/main.py`) per module, and one emulated stack for the
session (`gated_stack`: as `cloud emulate` starts it, every function acting as its own
identity through the IAM gates that terraform/'s grants configure).

Every process started here is stopped here, by its PID (process group), also when starting
another one fails. The emulators are named to the code under test by environment variables,
set for the module that uses them and restored afterwards.

Import the fixtures into a test module: `from serverless_fixtures import ...  # noqa: F401`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from flwr_kd.serverless.emulators import FirestoreEmulator, FunctionProcess, StorageEmulator

REPO = Path(__file__).resolve().parents[1]
CLOUD_MAIN = REPO / "cloud" / "main.py"
PROJECT = "demo-flwr-kd-tests"
DEPLOY_BUCKET = "kd-tests-deploy"  # the module deployment's arrays bucket
EMULATE_BUCKET = "flwr-kd-arrays"  # what `flwr-kd cloud emulate` uses
ARCHS = ["resnet10t", "test_vit"]
NUM_CLIENTS = 3
CLIENT_IDS = [f"client-{i}" for i in range(NUM_CLIENTS)]  # sorted = partition order (< 10)
MAX_BODY_BYTES = 1 << 20  # client-0's FLWR_KD_MAX_BODY_BYTES (the default is 32 MiB)
STACK_CLIENTS = 4  # clients of `gated_stack`


def experiment_flags(strategy: str = "feddf", rounds: int = 2, *extra: str) -> list[str]:
    """CLI flags of a tiny experiment (3 clients, 2 architectures, ~1 s of compute a call)."""
    flags = [
        "--strategy",
        strategy,
        "--dataset",
        "digits",
        "--clients",
        str(NUM_CLIENTS),
        "--rounds",
        str(rounds),
        "--archs",
        ",".join(ARCHS),
        "--local-epochs",
        "1",
        "--distill-steps",
        "5",
        "--no-baseline",
        "-c",
        "max-private=80",
        "-c",
        "subset-size=100",
    ]
    if strategy == "fedmd":
        flags += ["-c", "pretrain-epochs=1", "-c", "finetune-epochs=1", "-c", "digest-epochs=1"]
    return [*flags, *extra]


def arch_of(client_id: str) -> str:
    return ARCHS[CLIENT_IDS.index(client_id) % len(ARCHS)]


def started(cls, *args, **kwargs):
    """`cls(*args)` for the emulator classes, whose constructors spawn a process and then wait
    for it: if the wait fails, the spawned process is stopped instead of left running."""
    obj = cls.__new__(cls)
    try:
        obj.__init__(*args, **kwargs)
    except BaseException:
        proc = getattr(obj, "proc", None)
        if proc is not None:
            proc.stop()
        raise
    return obj


def restart(fn: FunctionProcess) -> None:
    """Start a stopped or killed function process again, on the same port."""
    fn.stop()
    try:
        fn.start()
    except BaseException:
        fn.stop()
        raise


def start_all(factories: list) -> list:
    """Call `started(*factory)` for each factory in parallel (each start mostly waits for a
    Python process to import torch); on any failure stop the ones that started, and raise."""
    with ThreadPoolExecutor(max_workers=len(factories)) as pool:
        futures = [pool.submit(started, *factory) for factory in factories]
    errors = [f.exception() for f in futures if f.exception() is not None]
    objs = [f.result() for f in futures if f.exception() is None]
    if errors:
        for obj in objs:
            obj.stop()
        raise errors[0]
    return objs


# ------------------------------------------------------------------------------ emulators


@dataclass
class Emulators:
    storage: StorageEmulator
    firestore: FirestoreEmulator
    log_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.storage.url,
            "FIRESTORE_EMULATOR_HOST": self.firestore.host,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
        }


@pytest.fixture(scope="session")
def gcp_emulators(tmp_path_factory):
    """fake-gcs-server and the Firestore emulator on ports of 127.0.0.1, for the session."""
    log_dir = tmp_path_factory.mktemp("emulator-logs")
    firestore, storage = start_all(
        [(FirestoreEmulator, PROJECT, log_dir), (StorageEmulator, log_dir)]
    )
    try:
        yield Emulators(storage, firestore, log_dir)
    finally:
        storage.stop()
        firestore.stop()


@pytest.fixture(scope="module")
def cloud_env(gcp_emulators):
    """The emulators named by environment (as `cloud emulate` and the Google clients read
    them), for one module; also restores what in-process driver runs change globally (the
    server's task identity, Flower's log level)."""
    saved_identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    flwr_logger = logging.getLogger("flwr")
    saved_level = flwr_logger.level
    with pytest.MonkeyPatch.context() as mp:
        for key, value in gcp_emulators.env.items():
            mp.setenv(key, value)
        mp.setenv("OMP_NUM_THREADS", "1")
        yield gcp_emulators
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved_identity
    flwr_logger.setLevel(saved_level)


def storage_client():
    from google.cloud import storage

    return storage.Client(project=PROJECT)


def ensure_bucket(name: str) -> None:
    client = storage_client()
    if client.lookup_bucket(name) is None:
        client.create_bucket(name)


def list_objects(bucket: str, prefix: str = "") -> list[str]:
    return sorted(b.name for b in storage_client().list_blobs(bucket, prefix=prefix))


@dataclass
class GatedStack:
    """The session's emulated stack and the `terraform output -json` that `cloud run` reads."""

    stack: object  # flwr_kd.serverless.emulate.EmulatedStack
    outputs: Path

    @property
    def bucket(self) -> str:
        return self.stack.bucket


@pytest.fixture(scope="session")
def gated_stack(gcp_emulators, tmp_path_factory):
    """`cloud emulate`'s stack (4 one-instance client functions, supervised, an aggregator per
    architecture), each function acting as its own service account through the storage and
    Firestore gates, without the Cloud Run front ends (so `cloud run --no-auth` reaches the
    functions). Shared by test_reliability and test_forgery; this process stays on the plain
    emulators (the driver's own permissions are bucket-wide anyway)."""
    from flwr_kd.experiment import ExperimentConfig
    from flwr_kd.serverless.emulate import EmulatedStack

    cfg = ExperimentConfig(num_clients=STACK_CLIENTS, archs=",".join(ARCHS))
    with pytest.MonkeyPatch.context() as mp:  # the stack points this process at the gates
        for key, value in gcp_emulators.env.items():
            mp.setenv(key, value)
        stack = EmulatedStack(cfg, log_dir=tmp_path_factory.mktemp("stack-logs"), front_end=False)
        stack.__enter__()
    try:
        dep = stack.deployment()
        outputs = tmp_path_factory.mktemp("stack") / "outputs.json"
        clients = {c.client_id: (c.url, c.arch) for c in dep.clients}
        outputs.write_text(json.dumps(terraform_outputs(clients, dep.aggregators, dep.bucket)))
        yield GatedStack(stack, outputs)
    finally:
        with pytest.MonkeyPatch.context() as mp:  # closing puts the gates' environment back
            for key in gcp_emulators.env:
                mp.setenv(key, os.environ.get(key, ""))
            stack.__exit__(None, None, None)


def invocation_docs(run: str, rounds: int) -> dict[int, dict[str, dict]]:
    """{round: {document id: document}} of `runs/<run>/rounds/<r>/invocations` for r <= rounds
    (round 0 has invocations but no round document, so rounds are asked one by one)."""
    from flwr_kd.serverless.roundstore import RoundStore

    store = RoundStore()
    out = {}
    for r in range(rounds + 1):
        docs = {d["id"]: d for d in store.invocations(run, r)}
        if docs:
            out[r] = docs
    return out


def wait_for(condition, timeout: float, what: str, interval: float = 0.05, alive=None):
    """Poll `condition()` until it returns something truthy; `alive()` False fails early."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if alive is not None and not alive():
            raise AssertionError(f"gave up waiting for {what}: the process exited")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# ----------------------------------------------------------------------------- deployment


def terraform_outputs(
    clients: dict[str, tuple[str, str]], aggregators: dict[str, str], bucket: str
) -> dict:
    """What `terraform output -json` prints (the part `flwr-kd cloud run` reads), for clients
    {id: (URL, architecture)} and aggregators {architecture: URL}."""
    return {
        "client_function_urls": {"value": {cid: url for cid, (url, _) in clients.items()}},
        "client_architectures": {"value": {cid: arch for cid, (_, arch) in clients.items()}},
        "aggregator_function_urls": {"value": dict(aggregators)},
        "arrays_bucket": {"value": bucket},
    }


@dataclass
class FunctionDeployment:
    """Client functions `client-0..2` and one aggregator function per architecture, on the
    bucket `DEPLOY_BUCKET`, as `terraform apply` would leave them."""

    bucket: str
    clients: dict[str, FunctionProcess]
    aggregators: dict[str, FunctionProcess]

    def processes(self) -> list[FunctionProcess]:
        return [*self.clients.values(), *self.aggregators.values()]

    def outputs(self) -> dict:
        return terraform_outputs(
            {cid: (fn.url, arch_of(cid)) for cid, fn in self.clients.items()},
            {arch: fn.url for arch, fn in self.aggregators.items()},
            self.bucket,
        )

    def write_outputs(self, path: Path) -> Path:
        path.write_text(json.dumps(self.outputs()))
        return path

    def ensure_running(self) -> None:
        """Restart function processes that an earlier test killed."""
        for fn in self.processes():
            if fn.proc.process.poll() is not None:
                restart(fn)

    def stop(self) -> None:
        """Stop every process (in parallel: gunicorn takes ~3 s to stop gracefully)."""
        with ThreadPoolExecutor(max_workers=len(self.processes())) as pool:
            list(pool.map(lambda fn: fn.stop(), self.processes()))


def function_env(bucket: str, **extra: str) -> dict[str, str]:
    """The environment of a function process, as docs/serverless.md names it (and
    `EmulatedStack` builds it): the current one, with the emulators in it."""
    return {
        **os.environ,
        "FLWR_KD_BUCKET": bucket,
        "FLWR_KD_FIRESTORE_DATABASE": "(default)",
        "THREADS": "1",  # one request at a time, like a deployed function with concurrency 1
        "WORKERS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
        **extra,
    }


@pytest.fixture(scope="module")
def deployment(cloud_env, tmp_path_factory):
    """The module's deployment, started in parallel; the clients' data is uploaded for the
    configuration of `experiment_flags()` (client i holds partition i)."""
    from flwr_kd.cli import _parser, config_from_args
    from flwr_kd.data import load_federated
    from flwr_kd.serverless.arraystore import GcsArrayStore
    from flwr_kd.serverless.deployment import Deployment
    from flwr_kd.serverless.driver import upload_client_data
    from flwr_kd.serverless.names import data_fingerprint

    ensure_bucket(DEPLOY_BUCKET)
    log_dir = tmp_path_factory.mktemp("function-logs")
    factories = []
    for cid in CLIENT_IDS:
        extra = {"FLWR_KD_MAX_BODY_BYTES": str(MAX_BODY_BYTES)} if cid == "client-0" else {}
        env = function_env(
            DEPLOY_BUCKET,
            FLWR_KD_CLIENT_ID=cid,
            FLWR_KD_ARCH=arch_of(cid),
            FLWR_KD_DATA_PREFIX=f"clients/{cid}/data/",
            **extra,
        )
        factories.append((FunctionProcess, CLOUD_MAIN, "client", env, cid, log_dir))
    for arch in ARCHS:
        env = function_env(DEPLOY_BUCKET, FLWR_KD_ARCH=arch)
        factories.append(
            (FunctionProcess, CLOUD_MAIN, "aggregator", env, f"aggregator-{arch}", log_dir)
        )
    procs = start_all(factories)
    dep = FunctionDeployment(
        DEPLOY_BUCKET,
        clients=dict(zip(CLIENT_IDS, procs[: len(CLIENT_IDS)])),
        aggregators=dict(zip(ARCHS, procs[len(CLIENT_IDS) :])),
    )
    try:
        cfg = config_from_args(_parser().parse_args(["cloud", "run", *experiment_flags()]))
        upload_client_data(
            GcsArrayStore(DEPLOY_BUCKET),
            load_federated(cfg.data_spec),
            Deployment.from_terraform_outputs(dep.outputs()),
            data_fingerprint(cfg.data_spec.to_config()),
        )
        yield dep
    finally:
        dep.stop()


@pytest.fixture
def live_deployment(deployment):
    """The module deployment with every function process running."""
    deployment.ensure_running()
    return deployment
