"""The parts of `flwr-kd simulate` around Flower, without Ray: the app it writes, what the
ServerApp hands back across processes, and stopping every process a run started."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from flwr.common.config import validate_config

from flwr_kd.cli import _parser
from flwr_kd.experiment import ExperimentConfig
from flwr_kd.handoff import HANDOFF_KEY, Handoff, RemoteTraceback
from flwr_kd.simulation import federation_config, write_app
from flwr_kd.strategy import TooFewReplies
from flwr_kd.superlink import MARKER, LocalSuperLink, marked_pids, runtime_env, stop_marked

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def test_the_written_app_is_a_valid_flower_app_whose_config_is_the_experiment(tmp_path):
    cfg = ExperimentConfig(num_clients=3, archs="resnet10t,test_vit", out_dir="runs/x")
    app = write_app(tmp_path / "app", cfg, tmp_path / "handoff")
    with (app / "pyproject.toml").open("rb") as f:
        document = tomllib.load(f)
    valid, errors, _ = validate_config(document, check_module=True, project_dir=app)
    assert valid, errors
    config = dict(document["tool"]["flwr"]["app"]["config"])
    assert config.pop(HANDOFF_KEY) == str(tmp_path / "handoff")
    assert ExperimentConfig.from_run_config(config) == cfg  # relative out-dir kept: same cwd
    assert federation_config(cfg, verbose=False)["num-supernodes"] == 3


def test_the_server_app_hands_back_its_report_and_result(tmp_path):
    handoff = Handoff(tmp_path)
    handoff.console.touch()  # a quiet run
    with handoff.capture():
        print("round 1")
        logging.getLogger("flwr").warning("a reply was left out")
    handoff.write_result({"rounds": [1]})
    assert handoff.console.read_text() == "round 1\nWARNING : a reply was left out\n"
    assert handoff.outcome() == {"rounds": [1]}


def test_an_exception_in_the_server_app_is_raised_again_with_its_traceback(tmp_path):
    handoff = Handoff(tmp_path)
    assert handoff.outcome() is None  # neither result nor error yet
    with pytest.raises(TooFewReplies), handoff.capture():
        raise TooFewReplies("round 1: 0 valid replies, fewer than min_replies=2")
    with pytest.raises(TooFewReplies, match="round 1: 0 valid replies") as info:
        handoff.outcome()
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "test_superlink.py" in str(info.value.__cause__)


def test_every_marked_process_is_stopped_even_an_orphan(tmp_path):
    """A process whose parent has exited (as Ray's do when the simulation process ends) still
    carries the run's marker and is stopped by it; an unmarked one is left alone."""
    env = runtime_env(tmp_path / "home", token="test-token")
    pid_file = tmp_path / "orphan.pid"
    launcher = "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
    launcher += "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(p.pid))"
    subprocess.run([sys.executable, "-c", launcher, str(pid_file)], env=env, check=True)
    orphan = int(pid_file.read_text())
    unmarked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert marked_pids(MARKER, "test-token") == [orphan]
        stop_marked(MARKER, "test-token")
        assert marked_pids(MARKER, "test-token") == []  # gone, or a zombie: nothing runs
        assert unmarked.poll() is None
    finally:
        unmarked.kill()
        unmarked.wait()


def test_on_a_ray_cluster_the_run_joins_it_by_address_and_leaves_resources_to_it(
    tmp_path, monkeypatch
):
    """Flower's federation config has no Ray address: the run's processes get RAY_ADDRESS,
    which Flower's `ray.init()` joins, and no CPU count (Ray refuses one from a joining
    driver); `--ray-address` defaults to the RAY_ADDRESS of the caller's environment."""
    cfg = ExperimentConfig(num_clients=3)
    alone = federation_config(cfg, verbose=False)
    on_cluster = federation_config(cfg, verbose=False, on_cluster=True)
    assert alone.pop("init-args-num-cpus") >= 1
    assert on_cluster == alone
    link = LocalSuperLink(tmp_path, env={"RAY_ADDRESS": "10.0.0.7:6379"})
    assert link.env["RAY_ADDRESS"] == "10.0.0.7:6379" and link.env[MARKER] == link.token

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _parser().parse_args(["simulate"]).ray_address is None
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert _parser().parse_args(["simulate"]).ray_address == "auto"
    assert _parser().parse_args(["simulate", "--ray-address", "h:1"]).ray_address == "h:1"
