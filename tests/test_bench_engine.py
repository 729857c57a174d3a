"""The study's in-process engine (benchmarks/inprocess.py): `flwr-kd simulate`'s arguments run
without Ray, stored with their engine so that a Ray run is never answered by an in-process one;
and the measurements beside the study: a client's round (run.py), the teachers
(teacher_accuracy.py) and longer curves (longer_curves.py)."""

import json
import subprocess
import sys

import numpy as np
import torch
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
    # a later code reuses it only when told that this earlier code gives the same results
    kept, made_by = evidence.cached_run(
        SIMULATE, run_out, "later", engine="inprocess", reuse_codes=("code",)
    )
    assert made_by == "code" and kept["rounds"] == result["rounds"]


def test_side_by_side_runs_need_the_inprocess_engine():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--workers", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "--workers N > 1 needs --engine inprocess" in proc.stderr


def _tiny_mode(run) -> dict:
    """Quick mode's study, at 2 clients of one small architecture and 1 local epoch."""
    extra = [*run.MODES["quick"]["extra"], "-c", "local-epochs=1", "-c", "max-private=80"]
    return dict(run.MODES["quick"], clients=2, archs="test_vit", extra=extra)


def test_the_float32_run_shares_the_study_workers_and_the_soak_starts_before_the_bounds(
    tmp_path, monkeypatch
):
    """make bench's scheduling: the communication section's float32-logits run is one more job
    on the study's workers, stored so that the section reuses it, and `after_runs` (where the
    soak starts) comes after every run and before the bounds train."""
    evidence, run = load_benchmark("evidence"), load_benchmark("run")
    study = {"alpha0.1": run.MODES["quick"]["study"]["alpha0.1"]}
    study["alpha0.1"] = {**study["alpha0.1"], "methods": {"feddf": ["feddf"], "fedavg": ["fedavg"]}}
    mode = dict(
        _tiny_mode(run), seeds=1, rounds=1, engine="inprocess", workers=2, study=study, bounds=True
    )
    events = []
    monkeypatch.setattr(evidence, "centralized_bounds", lambda *args: events.append("bounds") or {})
    [(folder, args)] = evidence.float32_logits_run(mode).items()
    stored = tmp_path / "runs" / folder / "result.json"

    def after_runs():
        runs = [evidence.run_dir(tmp_path, "alpha0.1", m, 0) for m in ("feddf", "fedavg")]
        events.append(
            ("after_runs", stored.exists(), all((r / "result.json").exists() for r in runs))
        )

    summary = evidence.evidence_section(mode, tmp_path, {folder: args}, after_runs)
    assert events == [("after_runs", True, True), "bounds"]
    assert summary["seeds"] == 1
    result = json.loads(stored.read_text())
    assert result["config"]["logits-dtype"] == "float32" and result["config"]["seed"] == 0
    code = evidence.code_fingerprint()
    _, reused = evidence.cached_run(args, stored.parent, code, engine="inprocess")
    assert reused == code  # the communication section finds it made, not a run to wait for
    study_runs = json.loads((tmp_path / "evidence.json").read_text())["configs"]["alpha0.1"]
    assert sorted(study_runs["methods"]) == ["fedavg", "feddf"]  # the extra run is no method


def test_client_round_times_the_same_clients_training_with_and_without_logits(tmp_path):
    run = load_benchmark("run")
    result = run.client_round_section(_tiny_mode(run), tmp_path, repeats=1)
    times = result["per_arch"]["test_vit"]
    assert times["train_seconds"] > 0 and times["logits_seconds"] > 0
    expected = (times["train_seconds"] + times["logits_seconds"]) / times["train_seconds"]
    assert abs(result["feddf_client_round_over_fedavg"] - expected) < 1e-3
    assert "2 clients" in result["config"] and "subset of 200" in result["config"]
    assert json.loads((tmp_path / "client_round.json").read_text()) == result


def test_teachers_centred_and_label_weighted_against_the_plain_average():
    teacher_accuracy = load_benchmark("teacher_accuracy")
    # two clients, two samples, three classes; client 1 never saw class 2 and pushes it down
    logits = np.array(
        [[[2.0, 0.0, 1.0], [0.0, 2.0, 1.5]], [[1.0, 0.0, -9.0], [0.0, 1.0, -8.0]]], np.float32
    )
    counts = np.array([[5, 5, 5], [5, 5, 0]], np.float32)
    t = teacher_accuracy.teachers(logits, counts)
    np.testing.assert_allclose(t["uniform"], logits.mean(axis=0))
    np.testing.assert_allclose(t["centred"].mean(axis=0), 0.0, atol=1e-6)
    # class 2 comes from client 0 alone; classes 0 and 1 from both, equally
    np.testing.assert_allclose(t["label_weighted"][:, 2], logits[0, :, 2])
    np.testing.assert_allclose(t["label_weighted"][:, :2], logits[:, :, :2].mean(axis=0))


def test_longer_curves_compares_two_methods_per_round_paired_over_seeds():
    longer_curves = load_benchmark("longer_curves")
    by_method = {  # method -> seed -> mean accuracy per round
        "feddf": {0: [0.2, 0.4, 0.5, 0.5], 1: [0.1, 0.3, 0.4, 0.6]},
        "fedavg": {0: [0.2, 0.3, 0.3, 0.3], 1: [0.2, 0.2, 0.2, 0.4]},
    }
    rows = longer_curves.compare(by_method, "feddf", "fedavg")
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    assert rows[0]["feddf"]["slope_last3"] is None  # one point: no slope yet
    # round 2: slopes over 2 points are 0.2 (both seeds) and 0.1, 0.0
    assert rows[1]["feddf"]["slope_last3"] == 0.2 and rows[1]["fedavg"]["slope_last3"] == 0.05
    last = rows[3]
    assert last["feddf"]["mean"] == 0.55 and last["fedavg"]["mean"] == 0.35
    # last 3 rounds: seed 0 (0.4, 0.5, 0.5) -> 0.05/round, seed 1 (0.3, 0.4, 0.6) -> 0.15/round
    assert last["feddf"]["slope_last3"] == 0.1
    diff = last["feddf_minus_fedavg"]
    assert diff["diffs"] == [0.2, 0.2] and diff["mean"] == 0.2 and diff["ci95"] == [0.2, 0.2]
    assert rows[0]["feddf_minus_fedavg"]["diffs"] == [0.0, -0.1]


def test_cpu_kernels_times_the_three_ways_side_by_side_and_restores_the_threads(monkeypatch):
    cpu_kernels = load_benchmark("cpu_kernels")
    torch.set_num_threads(2)
    picked = []  # the flwr_kd variant is whatever run_on makes of the model
    real_run_on = cpu_kernels.run_on
    monkeypatch.setattr(
        cpu_kernels,
        "run_on",
        lambda model, config: picked.append(config) or real_run_on(model, config),
    )
    spec = cpu_kernels.ModelSpec(num_classes=10, in_chans=1, img_size=16)
    result = cpu_kernels.measure(
        ["test_vit"], spec, batches=(4,), blocks=2, steps=1, also=("test_resnet", "test_vit")
    )
    assert torch.get_num_threads() == 2
    assert [c.device for c in picked] == ["cpu", "cpu"]  # each architecture timed once
    assert list(result["ms_per_step"]) == ["test_vit", "test_resnet"]
    assert result["speedups_over"] == ["test_vit"]  # `also` is timed, not summed in
    times = result["ms_per_step"]["test_vit"]["batch4"]
    assert sorted(times) == sorted(cpu_kernels.VARIANTS) and min(times.values()) > 0
    assert result["cpu_step_speedup_b4"] == round(times["adam_nchw"] / times["flwr_kd"], 3)


def test_timing_sums_the_clients_of_the_in_process_grid_and_not_those_on_ray(tmp_path):
    """The in-process grid trains one client after another, so the clients' critical path is
    their sum; Ray's actors train side by side on the machine's cores."""
    run = load_benchmark("run")
    row = {
        "round": 2,
        "seconds": 20.0,
        "client_compute": [3.0, 5.0],
        "distill": {"a": {"seconds": 6.0, "teacher_seconds": 0.0}},
        "time": {"fedavg": 1.0},
    }
    result = {"rounds": [{**row, "round": 1}, row]}
    overhead = {}
    for engine in ("inprocess", "ray"):
        run_out = tmp_path / "runs" / engine
        run_out.mkdir(parents=True)
        (run_out / "result.json").write_text(json.dumps(result))
        key = {"args": [], "code": "c", **({"engine": engine} if engine != "ray" else {})}
        (run_out / "args.json").write_text(json.dumps({"key": key}))
        timing = run.timing_section(run_out, tmp_path)
        assert timing["run"] == engine and timing["engine"] == engine
        [measured] = timing["rounds"]  # round 1 (start-up) is left out
        overhead[engine] = measured
    # in-process: 3 + 5 summed, + FedAvg 1 + distillation 6 = 15
    assert overhead["inprocess"]["critical_path"] == 15.0
    assert overhead["inprocess"]["overhead"] == round(20 / 15, 3)
    # Ray: max(5, 8 / cores) + 1 + 6
    expected = max(5.0, 8.0 / run.CORES) + 1.0 + 6.0
    assert overhead["ray"]["critical_path"] == round(expected, 3)
    saved = json.loads((tmp_path / "timing.json").read_text())
    assert saved["engine"] == "ray"  # the last one written
