"""`flwr-kd simulate`: input errors before anything runs, and tiny runs through `flwr run` on
a SuperLink of its own (Ray): the report, the files, quiet output, an error from inside the
ServerApp as one line, and no process left behind."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from flwr_kd.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: When the running test's runtime was set up (`contained_runtime`).
TEST_STARTED = {"at": 0.0}


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--strategy", "fedsgd"], ["unknown strategy 'fedsgd'"]),
        (["--dataset", "mnist-1d"], ["unknown dataset 'mnist-1d'"]),
        (["--archs", "resnet10t,resnet10"], ["unknown architecture 'resnet10'", "resnet10t"]),
        (["--alpha", "-1"], ["alpha", "-1"]),
        (["--clients", "1"], ["need at least 2 clients, got 1"]),
        (["--clients", "5000"], ["5000 clients but only", "use fewer clients"]),
        (["--archs", "convnext_atto"], ["'convnext_atto' needs images of at least 32px"]),
    ],
    ids=[
        "strategy",
        "dataset",
        "architecture",
        "alpha",
        "one-client",
        "too-many-clients",
        "convnext",
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, flags, names):
    out = tmp_path / "run"
    code = main(["simulate", *flags, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    err = captured.err.strip()
    assert err.startswith("flwr-kd: error: ")
    assert "\n" not in err, err  # one line
    for name in names:
        assert name in err
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()


def test_malformed_flag_value_exits_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--clients", "three", "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--clients" in err and "three" in err
    assert not out.exists()


@pytest.fixture
def contained_runtime(tmp_path, monkeypatch):
    """Flower and Ray files under temporary directories (Ray's socket paths must stay short),
    and the environment and Flower's log level restored afterwards."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="fkd-ray-"))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    TEST_STARTED["at"] = time.time() - 1  # process start times are rounded
    yield tmp_path
    flwr_logger.setLevel(level)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def assert_quiet(output: str) -> None:
    """No deprecation banner (Flower's run_simulation) and no Ray FutureWarning."""
    assert "DEPRECATED" not in output, output
    assert "FutureWarning" not in output, output


def assert_nothing_left_running() -> None:
    """No process of the run is alive: every process it started (SuperLink, SuperExec, the
    simulation process, Ray's processes and workers) inherited this test's RAY_TMPDIR, even
    those whose parent exited; and no Flower or Ray process started during this test is left
    below this one (emulators that a session fixture of the same worker started earlier are
    not the run's)."""
    ray_tmp = os.environ["RAY_TMPDIR"]
    assert (Path(ray_tmp) / "ray").is_dir()  # Ray ran with it: its processes carried it
    left = []
    for proc in psutil.process_iter(["pid", "name", "environ", "status"]):
        info = proc.info
        if info["pid"] == os.getpid() or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if (info["environ"] or {}).get("RAY_TMPDIR") == ray_tmp:
            left.append(f"{info['pid']} {info['name']}")
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            command = " ".join(child.cmdline())
            if (
                child.status() != psutil.STATUS_ZOMBIE
                and child.create_time() >= TEST_STARTED["at"]
                and any(n in command for n in ("flower-", "flwr", "ray", "gcs_server"))
            ):
                children.append(f"{child.pid} {command[:80]}")
        except psutil.NoSuchProcess:
            continue
    assert left == [] and children == [], (left, children)


def test_simulate_end_to_end(contained_runtime, capfd):
    out = contained_runtime / "out"
    archs = ["resnet10t", "test_vit"]
    code = main(
        [
            "simulate",
            "--clients", "3",
            "--rounds", "2",
            "--archs", ",".join(archs),
            "--local-epochs", "1",
            "--distill-steps", "10",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    captured = capfd.readouterr()  # file descriptors: what Flower's and Ray's processes print too
    assert "final test accuracy" in captured.out
    assert_quiet(captured.out + captured.err)
    assert_nothing_left_running()

    result = json.loads((out / "result.json").read_text())
    assert result["config"]["num-clients"] == 3 and result["config"]["strategy"] == "feddf"
    assert result["architectures"] == {"resnet10t": 2, "test_vit": 1}
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for row in result["rounds"]:
        assert set(row["accuracy"]) == set(archs)
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
        assert row["bytes"]["down"] > 0 and row["bytes"]["up"] > 0
        assert row["replies"] == 3 and row["dropped"] == []
        assert set(row["distill"]) == set(archs)
        assert all(0 < d["steps"] <= 10 for d in row["distill"].values())
    local_only = result["baselines"]["local_only"]
    assert set(local_only) == set(archs)
    assert all(0.0 <= a <= 1.0 for a in local_only.values())

    png = out / "accuracy.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    # nothing else left in the output directory (no half-written temporary files)
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "final_models", "result.json"]
    final_models = sorted(p.name for p in (out / "final_models").iterdir())
    assert final_models == ["models.json", "resnet10t.safetensors", "test_vit.safetensors"]


def test_an_error_inside_the_server_app_is_one_line_exit_1(contained_runtime, capfd):
    """TooFewReplies raised by the strategy in Flower's simulation process: the CLI's one-line
    error and exit code 1, as when the ServerApp ran in this process, and nothing left."""
    code = main(
        [
            "simulate",
            "--clients", "2",
            "--rounds", "1",
            "--archs", "resnet10t",
            "--local-epochs", "1",
            "--fail-rate", "1",
            "--fail-kinds", "exception",
            "--no-baseline",
            "--out", str(contained_runtime / "out"),
        ]
    )  # fmt: skip
    captured = capfd.readouterr()
    assert code == 1
    err = captured.err.strip()
    assert err.startswith("flwr-kd: error: round 1: 0 valid replies, fewer than min_replies=2")
    assert "\n" not in err, err
    assert "Traceback" not in captured.out + captured.err
    assert_quiet(captured.out + captured.err)
    assert_nothing_left_running()
