"""A private SuperLink in simulation mode, `flwr run` against it, and nothing left behind.

Flower's supported way to simulate is `flwr run` on a SuperLink started with `--simulation`.
Its own local SuperLink (the `local` connection) listens on fixed ports, keeps state under
`~/.flwr` and keeps running after the run by design. `LocalSuperLink` instead starts one per
run on a port it picks on 127.0.0.1, with `FLWR_HOME` in the run's work directory, and stops
every process the run started when it exits: each of them (SuperLink, SuperExec, the
simulation process, Ray's processes and workers) inherits a marker in its environment
(`FLWR_KD_RUN=<token>`), which also finds those whose parent has already exited.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w

if TYPE_CHECKING:  # Self is in typing only from Python 3.11
    from typing_extensions import Self

#: The environment variable whose value marks every process of one run.
MARKER = "FLWR_KD_RUN"
#: The name of the SuperLink connection in the run's own `$FLWR_HOME/config.toml`.
CONNECTION = "flwr-kd"


class SuperLinkError(RuntimeError):
    """The SuperLink, or `flwr run`, did not start."""


class LocalSuperLink:
    """`with LocalSuperLink(workdir) as link: link.run(app_dir, {...}).wait()`; `env` adds to
    the environment of every process of the run (e.g. `RAY_ADDRESS`)."""

    def __init__(
        self, workdir: Path, startup_timeout: float = 180.0, env: dict[str, str] | None = None
    ) -> None:
        self.workdir = Path(workdir)
        self.port = _free_port()
        self.token = uuid.uuid4().hex
        self.env = {**runtime_env(self.workdir / "flwr-home", self.token), **(env or {})}
        self.log_path = self.workdir / "superlink.log"
        self.startup_timeout = startup_timeout
        self._processes: list[subprocess.Popen] = []

    def __enter__(self) -> Self:
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        connection = {"address": f"127.0.0.1:{self.port}", "insecure": True}
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        (home / "config.toml").write_text(tomli_w.dumps(config))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        command = [
            *("flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess"),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            "--disable-runtime-dependency-installation",  # this environment runs the app
        ]
        process = self._spawn(command, self.log_path, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SuperLinkError(
                    f"flower-superlink exited with code {process.returncode}; see {self.log_path}"
                )
            if self._healthy():
                return
            time.sleep(0.2)
        raise SuperLinkError(
            f"flower-superlink did not answer within {self.startup_timeout:.0f}s; "
            f"see {self.log_path}"
        )

    def _healthy(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.port}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def run(
        self, app_dir: Path, federation_config: dict, log_path: Path | None = None
    ) -> subprocess.Popen:
        """Submit `app_dir` with `flwr run --stream`; the process ends when the run has ended.
        Its output (the run's streamed logs) goes to `log_path`, or to this process's."""
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())
        command = ["flwr", "run", str(app_dir), CONNECTION, "--federation-config", overrides]
        return self._spawn([*command, "--stream"], log_path)

    def _spawn(self, command: list[str], log_path: Path | None, **kwargs) -> subprocess.Popen:
        # The run's relative paths (out-dir, cache-dir, local datasets) mean the same there.
        output = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed below
        try:
            process = subprocess.Popen(
                command,
                env=self.env,
                cwd=os.getcwd(),
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                **kwargs,
            )
        except OSError as exc:  # e.g. Flower's commands are not installed beside this Python
            raise SuperLinkError(f"cannot start {command[0]}: {exc}") from exc
        finally:
            if output:
                output.close()
        self._processes.append(process)
        return process

    def stop(self) -> None:
        """Stop what this SuperLink started: its own children gracefully, then every process
        that carries the run's marker (SIGTERM, SIGKILL after a grace period)."""
        for process in reversed(self._processes):  # `flwr run` first, the SuperLink last
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        stop_marked(MARKER, self.token)


def runtime_env(flwr_home: Path, token: str) -> dict[str, str]:
    """The environment of the run's processes: contained, quiet, and marked with `token`."""
    env = dict(os.environ)
    env.update(
        {
            MARKER: token,
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "NO_PROXY": ",".join(filter(None, ["127.0.0.1", env.get("NO_PROXY")])),
        }
    )
    # Ray's FutureWarning at ray.init ("Tip: In future versions of Ray, Ray will no longer
    # override accelerator visible devices env var if num_gpus=0"), silenced while keeping
    # today's behaviour, which the device choice relies on: a client that asks Ray for no GPU
    # sees none. (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 would silence it by showing it all.)
    env["PYTHONWARNINGS"] = ",".join(
        filter(None, [env.get("PYTHONWARNINGS"), "ignore:Tip:FutureWarning"])
    )
    # Ray's socket paths must stay short: not under the run's work directory by default.
    env.setdefault("RAY_TMPDIR", str(Path(tempfile.gettempdir()) / "flwr-kd-ray"))
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    Path(env["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    # Flower's commands beside this Python (a venv need not be activated), and flwr_kd
    # importable there even from a source tree that is not installed.
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    root = Path(__file__).resolve().parents[1]
    if root.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def stop_marked(name: str, value: str, grace: float = 5.0) -> None:
    """SIGTERM every process of this user whose environment has `name=value`, then SIGKILL
    those still there after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = marked_pids(name, value)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = marked_pids(name, value)
        if not pids:
            return


def marked_pids(name: str, value: str) -> list[int]:
    """PIDs of this user's live processes whose environment has `name=value` (Linux's /proc,
    else psutil when installed)."""
    needle = f"{name}={value}".encode()
    proc = Path("/proc")
    if not (proc / "self" / "environ").exists():
        return _marked_pids_psutil(name, value)
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()  # empty for a zombie
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _marked_pids_psutil(name: str, value: str) -> list[int]:
    try:
        import psutil
    except ImportError:  # then the SuperLink's own shutdown is all there is
        return []
    pids = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(name) == value:
                pids.append(process.pid)
        except psutil.Error:
            continue
    return pids


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))
