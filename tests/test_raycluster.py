"""`flwr-kd simulate` on an existing Ray cluster: a real head and a second Ray node, both on
127.0.0.1 with one CPU each, so that Flower's actor pool (one client actor per CPU) puts a client
actor on each node. The test watches both nodes' process trees while a 2-round FedDF runs and
checks that each node ran client messages, and that the run leaves the cluster running."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

from flwr_kd.cli import main
from flwr_kd.superlink import stop_marked

if TYPE_CHECKING:  # Self is in typing only from Python 3.11
    from typing_extensions import Self

#: Marks every process of the test's cluster (raylets, GCS, workers), to stop them by PID.
CLUSTER_MARKER = "FLWR_KD_TEST_RAY_CLUSTER"
#: Ray's process title of a client actor, and of one running a client message.
ACTOR_TITLE, RUNNING_TITLE = "ray::ClientAppActor", "ray::ClientAppActor.run"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNode:
    """One `ray start --block` node; its own temp dir, one CPU, ports picked here (another Ray
    on this machine keeps its own), its processes marked with `token`."""

    def __init__(self, name: str, root: Path, token: str, *args: str) -> None:
        self.name = name
        self.log = root / f"{name}.log"
        ports = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")
        ports += ("--metrics-export-port", "--runtime-env-agent-port")
        command = [str(Path(sys.executable).parent / "ray"), "start", *args, "--block"]
        command += ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0"]
        command += ["--temp-dir", str(root / name)]
        for flag in ports:
            command += [flag, str(_free_port())]
        env = {**os.environ, CLUSTER_MARKER: token, "RAY_USAGE_STATS_ENABLED": "0"}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_started(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Ray node {self.name} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def titles(self) -> set[str]:
        """Process titles of the node's Ray actors right now."""
        found = set()
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return found
        for child in children:
            try:
                title = (child.cmdline() or [""])[0]
            except psutil.Error:
                continue
            if title.startswith(ACTOR_TITLE):
                found.add(title.strip())
        return found

    def stop(self) -> None:
        """SIGTERM: `ray start --block` stops the node's processes itself."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ActorWatcher:
    """Samples the actor titles of every node until stopped: which node ran client messages."""

    def __init__(self, nodes: list[RayNode], interval: float = 0.05) -> None:
        self.nodes, self.interval = nodes, interval
        self.seen: dict[str, set[str]] = {node.name: set() for node in nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for node in self.nodes:
                self.seen[node.name] |= node.titles()
            time.sleep(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _wait_for_nodes(address: str, count: int, timeout: float = 120.0) -> None:
    """Until the cluster lists `count` alive nodes (Ray's public `ray.nodes()`, in a driver
    process of its own, so that this one never joins the cluster)."""
    script = (
        "import sys, time, ray\n"
        "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
        "deadline = time.monotonic() + float(sys.argv[3])\n"
        "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]):\n"
        "    assert time.monotonic() < deadline, ray.nodes()\n"
        "    time.sleep(0.5)\n"
    )
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    args = [sys.executable, "-c", script, address, str(count), str(timeout)]
    subprocess.run(args, env=env, check=True, timeout=timeout + 60, capture_output=True)


@pytest.fixture
def ray_cluster(monkeypatch):
    """A head and a second node. Their temp dirs live under a short directory of their own:
    Ray's socket paths (temp dir + session name + socket) must stay under 107 characters."""
    root = Path(tempfile.mkdtemp(prefix="fkd-rc-"))
    monkeypatch.setenv("RAY_TMPDIR", str(root / "driver"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    token, port = uuid.uuid4().hex, _free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[RayNode] = []
    try:
        head_ports = ["--port", str(port), "--dashboard-port", str(_free_port())]
        head_ports += ["--ray-client-server-port", str(_free_port())]
        nodes.append(RayNode("head", root, token, "--head", *head_ports))
        nodes[0].wait_started()
        nodes.append(RayNode("worker", root, token, "--address", address))
        nodes[1].wait_started()
        _wait_for_nodes(address, 2)
        yield address, nodes
    finally:
        for node in reversed(nodes):
            node.stop()
        stop_marked(CLUSTER_MARKER, token)  # anything a node left behind, by PID
        shutil.rmtree(root, ignore_errors=True)


def test_feddf_runs_its_clients_on_both_nodes_of_an_existing_ray_cluster(ray_cluster, tmp_path):
    address, nodes = ray_cluster
    out = tmp_path / "out"
    with ActorWatcher(nodes) as watcher:
        code = main(
            [
                "simulate",
                "--ray-address", address,
                "--strategy", "feddf",
                "--clients", "3",
                "--rounds", "2",
                "--archs", "test_resnet",
                "--local-epochs", "1",
                "--distill-steps", "5",
                "--no-baseline",
                "--out", str(out),
            ]
        )  # fmt: skip
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert [row["replies"] for row in result["rounds"]] == [3, 3]
    for node in nodes:  # one client actor per node (one CPU each), and it ran client messages
        assert any(t.startswith(RUNNING_TITLE) for t in watcher.seen[node.name]), watcher.seen
    # the run stopped what it started, not the cluster it ran on
    assert all(node.process.poll() is None for node in nodes)
    assert all(any(p.name() == "raylet" for p in _descendants(node)) for node in nodes)


def _descendants(node: RayNode) -> list[psutil.Process]:
    return psutil.Process(node.process.pid).children(recursive=True)
