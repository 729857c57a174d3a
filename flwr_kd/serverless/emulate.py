"""`flwr-kd cloud emulate`: the whole serverless stack on this machine, against real emulators.

Starts fake-gcs-server and the Firestore emulator (unless `STORAGE_EMULATOR_HOST` and
`FIRESTORE_EMULATOR_HOST` name running ones, which are then used and left with their data;
see `emulators.start_emulators`), one functions-framework process per client and per
architecture's aggregator (restarted when it dies, as the platform replaces a crashed
instance), runs the driver, and stops everything it started.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Self

from flwr_kd.experiment import ExperimentConfig
from flwr_kd.serverless import names
from flwr_kd.serverless.deployment import Deployment
from flwr_kd.serverless.driver import drive
from flwr_kd.serverless.emulators import DEFAULT_PROJECT, FunctionProcess, start_emulators
from flwr_kd.serverless.grid import ClientEndpoint, GridOptions

CLOUD_SOURCE = Path(__file__).resolve().parents[2] / "cloud" / "main.py"
#: The arrays bucket of the emulated stack.
DEFAULT_BUCKET = "flwr-kd-arrays"


class EmulatedStack:
    """Emulators and function processes for one experiment config; a context manager."""

    def __init__(
        self, cfg: ExperimentConfig, bucket: str = DEFAULT_BUCKET, log_dir: Path | None = None
    ) -> None:
        self.cfg, self.bucket = cfg, bucket
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="flwr-kd-emulate-"))
        self._stack = ExitStack()
        self.started: list[str] = []
        self.clients: dict[str, FunctionProcess] = {}
        self.aggregators: dict[str, FunctionProcess] = {}

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
        os.environ.setdefault("GOOGLE_CLOUD_PROJECT", DEFAULT_PROJECT)
        self.project = os.environ["GOOGLE_CLOUD_PROJECT"]
        self.started += start_emulators(self._stack, self.project, self.log_dir)
        from google.cloud import storage as gcs

        client = gcs.Client(project=self.project)
        if client.lookup_bucket(self.bucket) is None:
            client.create_bucket(self.bucket)
        base_env = {
            **os.environ,
            "FLWR_KD_BUCKET": self.bucket,
            "FLWR_KD_FIRESTORE_DATABASE": "(default)",
            "THREADS": "1",  # one request at a time per instance, like a deployed function
            "WORKERS": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(
                [str(CLOUD_SOURCE.parents[1]), os.environ.get("PYTHONPATH", "")]
            ),
        }
        procs = []
        for pid in range(self.cfg.num_clients):
            cid, arch = f"client-{pid}", self.cfg.arch_of_partition(pid)
            env = {
                **base_env,
                "FLWR_KD_CLIENT_ID": cid,
                "FLWR_KD_ARCH": arch,
                "FLWR_KD_DATA_PREFIX": names.client_data_prefix(cid),
                "FLWR_KD_ONE_INSTANCE": "1",
            }
            procs.append(("client", cid, arch, env))
        for arch in self.cfg.arch_list:
            procs.append(
                ("aggregator", f"aggregator-{arch}", arch, {**base_env, "FLWR_KD_ARCH": arch})
            )
        with ThreadPoolExecutor(max_workers=len(procs)) as pool:  # each start mostly imports torch
            futures = [
                pool.submit(FunctionProcess, CLOUD_SOURCE, target, env, name, self.log_dir, True)
                for target, name, _, env in procs
            ]
        for (target, name, arch, _), future in zip(procs, futures):
            if future.exception() is None:
                fn = future.result()
                self._stack.callback(fn.stop)
                (self.clients if target == "client" else self.aggregators)[
                    name if target == "client" else arch
                ] = fn
        failed = [f.exception() for f in futures if f.exception() is not None]
        if failed:
            raise failed[0]
        self.started.append(
            f"{len(self.clients)} client and {len(self.aggregators)} aggregator functions"
        )

    def deployment(self) -> Deployment:
        return Deployment(
            bucket=self.bucket,
            clients=[
                ClientEndpoint(cid, fn.url, self.cfg.arch_of_partition(i))
                for i, (cid, fn) in enumerate(self.clients.items())
            ],
            aggregators={arch: fn.url for arch, fn in self.aggregators.items()},
        )


def emulate(
    cfg: ExperimentConfig,
    run_id: str | None = None,
    resume: bool = False,
    options: GridOptions | None = None,
) -> dict:
    """`drive` on a stack started for this run, then where to find what it left behind."""
    run_id = run_id or f"run-{uuid.uuid4().hex[:8]}"
    with EmulatedStack(cfg) as stack:
        for line in stack.started:
            print(f"started {line}", file=sys.stderr)
        result = drive(cfg, stack.deployment(), run_id, resume=resume, options=options)
        replies = names.client_replies_prefix(run_id, "<r>", "<client>")
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
