"""`flwr-kd cloud emulate`: the whole serverless stack on this machine, against real emulators.

Starts fake-gcs-server and the Firestore emulator (or uses running ones that
`STORAGE_EMULATOR_HOST` and `FIRESTORE_EMULATOR_HOST` name: `emulators.start_emulators`), then
the services terraform/ deploys for the experiment (`policy`: its `local.services`): isolated,
a function per client; pooled, one per architecture pool serving each client of it under the
client's own root in the pool's folder; aggregators in both. Each is one functions-framework
process (restarted when it dies, as the platform replaces a crashed instance) acting as its
service account through the IAM gates (`storagegate`, `firestoregate`), behind an emulated
Cloud Run front end (`frontend`) that admits only ID tokens of its invokers, minted by a local
token service (`tokenservice`); the functions verify the tokens too, as deployed. Then it runs
the driver, and stops everything it started.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Self

from flwr_kd.experiment import ExperimentConfig
from flwr_kd.serverless import names
from flwr_kd.serverless.deployment import Deployment
from flwr_kd.serverless.driver import drive
from flwr_kd.serverless.emulators import (
    DEFAULT_PROJECT,
    FunctionProcess,
    set_env_until_close,
    start_emulators,
)
from flwr_kd.serverless.firestoregate import FirestoreGate
from flwr_kd.serverless.frontend import FrontEnd, ServiceSettings
from flwr_kd.serverless.grid import ClientEndpoint, GridOptions
from flwr_kd.serverless.policy import (
    AccessLog,
    DeploymentPolicy,
    Service,
    deployment_policy,
    experiment_tfvars,
)
from flwr_kd.serverless.storagegate import StorageGate
from flwr_kd.serverless.tokenservice import TokenService

CLOUD_SOURCE = Path(__file__).resolve().parents[2] / "cloud" / "main.py"
#: The arrays bucket of the emulated stack (Terraform's is named after the project).
DEFAULT_BUCKET = "flwr-kd-arrays"
#: Terraform's default `name_prefix`, which the service accounts' ids start with.
NAME_PREFIX = "flwr-kd"
#: Terraform's `deployment_mode`s.
MODES = ("isolated", "pooled")
#: Each emulated service is one process serving one request at a time: its front end admits no
#: more, whatever Terraform's max instances (pools: `pool_max_instances`); the rest wait or 429.
EMULATED_INSTANCES = 1


def stack_policy(cfg: ExperimentConfig, project: str, mode: str = "isolated") -> DeploymentPolicy:
    """terraform/'s locals for the emulated deployment of `cfg`: its identities (and their
    e-mails), grants and services."""
    return deployment_policy(experiment_tfvars(cfg, project, NAME_PREFIX, mode))


def front_end_settings(service: Service, identities: Mapping[str, str]) -> ServiceSettings:
    """What Cloud Run enforces in front of `service`, as terraform/ sets it: who holds
    run.invoker (e-mails), concurrency, timeout, max instances (`EMULATED_INSTANCES` at most)."""
    return ServiceSettings(
        invokers=frozenset(identities[key] for key in service.invokers),
        max_instances=min(service.max_instances, EMULATED_INSTANCES),
        concurrency=service.concurrency,
        timeout_seconds=float(service.timeout_seconds),
    )


def pool_slug(service: Service) -> str:
    """The architecture pool a pool service serves (Terraform's FLWR_KD_POOL)."""
    return service.identity.removeprefix("pool:")


def client_endpoints(
    cfg: ExperimentConfig, policy: DeploymentPolicy, urls: Mapping[str, str]
) -> list[ClientEndpoint]:
    """Client `client-<i>` (partition i; as terraform/ names pooled clients) at the URL
    (`urls`: service name -> URL) of its own function, or of its architecture's pool, with its
    root: its own, or its own in the pool's folder."""
    by_identity = {s.identity: s for s in policy.services.values()}
    pools = {s.arch: s for s in policy.services.values() if s.kind == "pool"}
    endpoints = []
    for pid in range(cfg.num_clients):
        cid = f"client-{pid}"
        service = by_identity.get(f"client:{cid}") or pools.get(cfg.arch_of_partition(pid))
        if service is None:
            raise RuntimeError(f"terraform/ deploys no function that serves {cid}")
        root = service.client_root
        if service.kind == "pool":
            root = names.client_root(cid, pool_slug(service))
            if not root.startswith(service.client_root):
                raise RuntimeError(f"{cid}'s root {root} lies outside its pool's folder")
        endpoints.append(ClientEndpoint(cid, urls[service.name], service.arch, root))
    return endpoints


class EmulatedStack:
    """Emulators, IAM gates, the function processes of terraform/'s services for one
    experiment config and deployment mode, and (with `front_end`, the default) the token
    service and a Cloud Run front end per function; a context manager."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        bucket: str = DEFAULT_BUCKET,
        log_dir: Path | None = None,
        front_end: bool = True,
        mode: str = "isolated",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"deployment mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.cfg, self.bucket, self.front_end, self.mode = cfg, bucket, front_end, mode
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="flwr-kd-emulate-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._stack = ExitStack()
        self.started: list[str] = []
        self.functions: dict[str, FunctionProcess] = {}  # service name -> its process
        self.front_ends: dict[str, FrontEnd] = {}  # service name -> its front end
        self.urls: dict[str, str] = {}  # service name -> the URL the driver calls
        self.tokens: TokenService | None = None
        self.driver_email = ""

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _start(self) -> None:
        self._start_emulators()
        self.policy = stack_policy(self.cfg, self.project, self.mode)
        self.driver_email = self.policy.identities["driver"]
        self._start_gates()
        if self.front_end:
            self.tokens = self._stack.enter_context(TokenService())
            self.started.append(f"token service at {self.tokens.certs_url}")
        self._start_functions()
        if self.front_end:
            self._start_front_ends()

    def _start_emulators(self) -> None:
        os.environ.setdefault("GOOGLE_CLOUD_PROJECT", DEFAULT_PROJECT)
        self.project = os.environ["GOOGLE_CLOUD_PROJECT"]
        self.started += start_emulators(self._stack, self.project, self.log_dir)
        from google.cloud import storage as gcs

        client = gcs.Client(project=self.project)
        if client.lookup_bucket(self.bucket) is None:
            client.create_bucket(self.bucket)

    def _start_gates(self) -> None:
        """Every identity reaches the emulators through its own ports of gates that enforce
        terraform/'s grants (`storagegate`, `firestoregate`); this process acts as the driver.
        What each identity did is in `access_log` (and access.jsonl in the log directory)."""
        self.access_log = AccessLog(self.log_dir / "access.jsonl")
        upstream = os.environ["STORAGE_EMULATOR_HOST"], os.environ["FIRESTORE_EMULATOR_HOST"]
        storage = StorageGate(upstream[0], self.bucket, self.policy, self.access_log)
        firestore = FirestoreGate(upstream[1], self.policy, self.access_log)
        self._stack.callback(storage.close)
        self._stack.callback(firestore.close)
        self.identity_env = {
            key: {**storage.serve(key), **firestore.serve(key)} for key in self.policy.identities
        }
        for name, value in self.identity_env["driver"].items():
            set_env_until_close(self._stack, name, value)
        self.started.append(f"IAM gates for {len(self.identity_env)} identities (terraform/)")

    def _function_env(self, service: Service) -> dict:
        """The environment Terraform gives the service, pointed at its identity's gates."""
        env = {
            **os.environ,
            "FLWR_KD_BUCKET": self.bucket,
            "FLWR_KD_FIRESTORE_DATABASE": "(default)",
            "FLWR_KD_ARCH": service.arch,
            "THREADS": "1",  # one request at a time per instance, like a deployed function
            "WORKERS": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(
                [str(CLOUD_SOURCE.parents[1]), os.environ.get("PYTHONPATH", "")]
            ),
            **self.identity_env[service.identity],
        }
        if service.kind == "client":
            env["FLWR_KD_CLIENT_ID"] = service.identity.removeprefix("client:")
            env["FLWR_KD_DATA_PREFIX"] = f"{service.client_root}data/"  # local.client_data_prefix
            env["FLWR_KD_ONE_INSTANCE"] = "1"
        elif service.kind == "pool":
            env["FLWR_KD_POOL"] = pool_slug(service)
        if self.tokens is not None:  # behind the front end, as on Cloud Run
            env["K_SERVICE"] = service.name
            env["FLWR_KD_VERIFY_TOKENS"] = "1"
            env["FLWR_KD_INVOKER"] = self.driver_email
            env["FLWR_KD_TOKEN_CERTS_URL"] = self.tokens.certs_url
        return env

    def _start_functions(self) -> None:
        """One supervised process per service, started in parallel (each mostly imports
        torch); every one that started is stopped with the stack, also when another failed."""
        services = self.policy.services
        with ThreadPoolExecutor(max_workers=len(services)) as pool:
            futures = {
                name: pool.submit(
                    FunctionProcess,
                    CLOUD_SOURCE,
                    "aggregator" if service.kind == "aggregator" else "client",
                    self._function_env(service),
                    name,
                    self.log_dir,
                    True,
                )
                for name, service in services.items()
            }
        for name, future in futures.items():
            if future.exception() is None:
                fn = self.functions[name] = future.result()
                self._stack.callback(fn.stop)
                self.urls[name] = fn.url
        failed = [f.exception() for f in futures.values() if f.exception() is not None]
        if failed:
            raise failed[0]
        kinds = [service.kind for service in services.values()]
        counts = ", ".join(f"{kinds.count(k)} {k}" for k in ("client", "pool") if k in kinds)
        self.started.append(f"{counts} and {kinds.count('aggregator')} aggregator functions")

    def _start_front_ends(self) -> None:
        """A Cloud Run front end per service; the driver calls these URLs instead."""
        for name, service in self.policy.services.items():
            settings = front_end_settings(service, self.policy.identities)
            front = FrontEnd(name, self.urls[name], settings, self.tokens.certs_url)
            self._stack.callback(self._write_request_log, front)
            self.front_ends[name] = self._stack.enter_context(front)
            self.urls[name] = front.url
        self.started.append(
            f"{len(self.front_ends)} Cloud Run front ends (ID tokens of {self.driver_email})"
        )

    def _write_request_log(self, front: FrontEnd) -> None:
        """What Cloud Logging would show of the front end's requests, beside the function's."""
        with open(self.log_dir / f"{front.name}.requests.log", "a") as f:
            f.writelines(entry.line() for entry in front.log)

    @property
    def auth(self) -> Callable[[str], dict] | None:
        """The driver's ID-token headers (`GridOptions.auth`); None without front ends."""
        return self.tokens.auth(self.driver_email) if self.tokens is not None else None

    def deployment(self) -> Deployment:
        """What the driver is handed: every client's URL and root, and the aggregators'."""
        aggregators = [s for s in self.policy.services.values() if s.kind == "aggregator"]
        return Deployment(
            bucket=self.bucket,
            clients=client_endpoints(self.cfg, self.policy, self.urls),
            aggregators={s.arch: self.urls[s.name] for s in aggregators},
        )


def emulate(
    cfg: ExperimentConfig,
    run_id: str | None = None,
    resume: bool = False,
    options: GridOptions | None = None,
    mode: str = "isolated",
) -> dict:
    """`drive` on a stack started for this run (the driver authenticating as its service
    account), then where to find what it left behind. The functions' logs are kept beside
    `result.json`, in `<out-dir>/function-logs/` (a temporary folder without an out dir)."""
    run_id = run_id or f"run-{uuid.uuid4().hex[:8]}"
    options = options or GridOptions()
    log_dir = Path(cfg.out_dir) / "function-logs" if cfg.out_dir else None
    with EmulatedStack(cfg, log_dir=log_dir, mode=mode) as stack:
        for line in stack.started:
            print(f"started {line}", file=sys.stderr)
        options.auth = options.auth or stack.auth
        result = drive(cfg, stack.deployment(), run_id, resume=resume, options=options)
        root = names.client_root("<client>", "<pool>" if mode == "pooled" else None)
        replies = names.outbox_prefix(root, run_id, "<r>")
        invocations = names.invocations_collection(run_id, "<r>")
        print(
            f"\nlogits and weights: gs://{stack.bucket}/{replies} "
            f"(STORAGE_EMULATOR_HOST={os.environ['STORAGE_EMULATOR_HOST']})\n"
            f"round records: Firestore {names.round_document(run_id, '<r>')} and {invocations} "
            f"(FIRESTORE_EMULATOR_HOST={os.environ['FIRESTORE_EMULATOR_HOST']})\n"
            f"function logs: {stack.log_dir}",
            file=sys.stderr,
        )
    return result
