"""The study's in-process engine (benchmarks/inprocess.py): `flwr-kd simulate`'s arguments run
without Ray, stored with their engine so that a Ray run is never answered by an in-process one."""

import json
import subprocess
import sys

from benchmark_modules import BENCHMARKS, load_benchmark

SIMULATE = [
    *("simulate", "--strategy", "fedavg", "--dataset", "digits", "--clients", "2"),
    *("--rounds", "1", "--archs", "test_vit", "-c", "max-private=80", "-c", "max-test=60"),
    *("--seed", "3", "--no-baseline"),
]


def test_inprocess_run_is_stored_with_its_engine_and_reused(tmp_path):
    evidence = load_benchmark("evidence")
    run_out = tmp_path / "run"
    result, reused = evidence.cached_run(SIMULATE, run_out, "code", engine="inprocess", threads=1)
    assert not reused
    assert [row["round"] for row in result["rounds"]] == [1]
    assert result["config"]["seed"] == 3 and result["config"]["num-clients"] == 2
    assert result["rounds"][0]["replies"] == 2  # both clients trained, on the in-process grid
    assert json.loads((run_out / "args.json").read_text())["key"]["engine"] == "inprocess"

    again, reused = evidence.cached_run(SIMULATE, run_out, "code", engine="inprocess")
    assert reused and again["rounds"] == result["rounds"]
    # the same arguments on Ray, or after a code change, are not answered by this run
    assert evidence._stored(run_out, {"args": SIMULATE, "code": "code"}) is None
    key = {"args": SIMULATE, "code": "other", "engine": "inprocess"}
    assert evidence._stored(run_out, key) is None


def test_side_by_side_runs_need_the_inprocess_engine():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--workers", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "--workers N > 1 needs --engine inprocess" in proc.stderr
