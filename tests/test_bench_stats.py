"""benchmarks/stats.py against hand-computed values: the arithmetic behind `make bench`'s
headlines (mean +- std over seeds, paired differences with a 95% interval, curve slopes)."""

import json
import math

import pytest
from benchmark_modules import load_benchmark

stats = load_benchmark("stats")


def test_summarize_uses_the_sample_std():
    # values 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, / 3
    s = stats.summarize([1.0, 2.0, 3.0, 4.0])
    assert s == {"n": 4, "mean": 2.5, "std": round(math.sqrt(5 / 3), 4), "min": 1.0, "max": 4.0}
    assert s["std"] == 1.291


def test_summarize_of_one_value_has_no_std_and_of_none_is_refused():
    assert stats.summarize([0.7]) == {"n": 1, "mean": 0.7, "std": None, "min": 0.7, "max": 0.7}
    with pytest.raises(ValueError, match="at least one"):
        stats.summarize([])


def test_paired_differences_and_their_t_interval():
    # diffs 0.01, 0.03, 0.05: mean 0.03, std 0.02; t(0.975, 2) = 4.3027
    p = stats.paired([0.61, 0.53, 0.75], [0.60, 0.50, 0.70])
    half = 4.302653 * 0.02 / math.sqrt(3)  # 0.04968
    assert p["n"] == 3
    assert p["diffs"] == [0.01, 0.03, 0.05]
    assert p["mean"] == 0.03
    assert p["std"] == 0.02
    assert p["min"] == 0.01
    assert p["ci95"] == [round(0.03 - half, 4), round(0.03 + half, 4)] == [-0.0197, 0.0797]


def test_paired_with_two_seeds_uses_one_degree_of_freedom():
    # diffs 0.02, 0.04: mean 0.03, std sqrt(0.0002) = 0.014142; t(0.975, 1) = 12.7062
    p = stats.paired([0.52, 0.54], [0.5, 0.5])
    half = 12.706205 * math.sqrt(0.0002) / math.sqrt(2)  # 0.127062
    assert p["ci95"] == [round(0.03 - half, 4), round(0.03 + half, 4)]


def test_paired_refuses_fewer_than_two_pairs_and_unequal_lengths():
    with pytest.raises(ValueError, match="at least 2 pairs"):
        stats.paired([0.5], [0.4])
    with pytest.raises(ValueError, match="equally long"):
        stats.paired([0.5, 0.6], [0.4])


def test_slope_over_the_last_three_points():
    # last three points 0.6, 0.7, 0.9 at x = 0, 1, 2: slope = sum((x - 1)(y - 0.7333)) / 2
    assert stats.slope([0.1, 0.5, 0.6, 0.7, 0.9]) == 0.15
    assert stats.slope([0.8, 0.8, 0.8]) == 0.0
    assert stats.slope([0.5, 0.7]) == 0.2  # a shorter curve: all its points
    assert stats.slope([0.5]) is None


def _result(final: dict, *, transfer_only: dict | None = None, down: int = 1000) -> dict:
    """A result.json of two rounds: the last one's accuracies are `final`."""
    row = {"bytes": {"down": down * 2, "up": 50}, "replies": 2, "client_compute": [1.0, 3.0]}
    first = {a: v - 0.1 for a, v in final.items()}
    rows = [
        {**row, "accuracy": acc, "mean_accuracy": sum(acc.values()) / len(acc)}
        for acc in (first, final)
    ]
    rows[0]["distill"] = {"a": {"validation_seconds": 1.0, "seconds": 10.0}}
    return {"rounds": rows, "baselines": {"transfer_only": transfer_only or {}}}


def test_the_study_pairs_methods_per_seed_into_the_headline_keys(tmp_path):
    evidence = load_benchmark("evidence")
    mode = {
        "dataset": "digits",
        "clients": 2,
        "rounds": 2,
        "archs": "a,b",
        "extra": [],
        "study": {
            "alpha0.1": {
                "flags": ["--alpha", "0.1"],
                "methods": {"feddf": ["feddf"], "fedavg": ["fedavg"]},
                "paired": {"feddf_minus_fedavg_alpha0.1": ["feddf", "fedavg"]},
            },
            "paper_regime": {
                "flags": [],
                "methods": {"fedmd": ["fedmd"]},
                "paired": {"fedmd_minus_transfer_only_paper_regime": ["fedmd", "transfer_only"]},
            },
        },
    }
    results = {
        ("alpha0.1", "feddf", 0): _result({"a": 0.6, "b": 0.8}),
        ("alpha0.1", "feddf", 1): _result({"a": 0.5, "b": 0.7}),
        ("alpha0.1", "fedavg", 0): _result({"a": 0.6, "b": 0.7}),
        ("alpha0.1", "fedavg", 1): _result({"a": 0.4, "b": 0.6}, down=800),
        ("paper_regime", "fedmd", 0): _result(
            {"a": 0.5, "b": 0.5}, transfer_only={"a": 0.4, "b": 0.4}
        ),
        ("paper_regime", "fedmd", 1): _result(
            {"a": 0.5, "b": 0.5}, transfer_only={"a": 0.5, "b": 0.4}
        ),
    }
    centralized = {
        "alpha0.1": {
            "configs": ["alpha0.1"],
            "epochs": 4,
            "samples": 100,
            "batch_size": 32,
            "per_seed": {"0": {"mean": 0.9}, "1": {"mean": 0.9}},
            "summary": {"mean": 0.9, "std": 0.0},
        }
    }
    ev = evidence.build_evidence(mode, [0, 1], results, centralized)
    s = ev["summary"]
    # feddf - fedavg: seed 0 0.70 - 0.65 = 0.05, seed 1 0.60 - 0.50 = 0.10
    assert s["seeds"] == 2
    assert s["feddf_minus_fedavg_alpha0.1_mean"] == 0.075
    assert s["feddf_minus_fedavg_alpha0.1_min"] == 0.05
    # fedmd - transfer-only (mean over the architectures): 0.5 - 0.4 = 0.1, 0.5 - 0.45 = 0.05
    assert s["fedmd_minus_transfer_only_paper_regime_mean"] == 0.075
    assert s["fedmd_minus_transfer_only_paper_regime_min"] == 0.05
    # down bytes per reply: feddf 1000 (both seeds), fedavg 1000 and 800
    assert s["feddf_bytes_down_over_fedavg"] == round(1000 / 900, 4)
    assert s["feddf_client_compute_over_fedavg_in_study"] == 1.0
    assert s["distill_validation_share"] == 0.1  # feddf runs only: 2 x 1 s of 2 x 10 s
    assert s["slope_last3_max"] == 0.1  # every curve rises 0.1 in its one step
    assert ev["configs"]["alpha0.1"]["centralized"] == "alpha0.1"
    feddf = ev["configs"]["alpha0.1"]["methods"]["feddf"]
    assert feddf["mean_curve"] == [0.55, 0.65]
    assert feddf["per_arch"]["a"]["mean"] == 0.55
    assert "--seed S" in feddf["command"]
    evidence.plot_evidence(ev, tmp_path / "evidence.png")
    assert (tmp_path / "evidence.png").stat().st_size > 0
    text = "\n".join(load_benchmark("report").evidence_lines("quick", ev))
    assert "| `feddf_minus_fedavg_alpha0.1` (alpha0.1: A = feddf, B = fedavg) | 2 |" in text
    assert "+0.0750 | [" in text


def test_bounds_join_a_stored_study_without_its_runs(tmp_path):
    """`--sections bounds`: the centralized bounds of the study in evidence.json, trained on the
    split alone, each config pointing at its regime's; a study of other settings is refused."""
    evidence = load_benchmark("evidence")
    mode = {
        "dataset": "digits",
        "clients": 2,
        "rounds": 1,
        "archs": "test_vit",
        "extra": ["-c", "max-private=80", "-c", "max-test=60", "-c", "local-epochs=1"],
        "seeds": 1,
        "study": {
            "alpha0.1": {
                "flags": ["--alpha", "0.1"],
                "methods": {"feddf": ["feddf"], "fedavg": ["fedavg"]},
                "paired": {},
            },
        },
    }
    results = {("alpha0.1", m, 0): _result({"test_vit": 0.5}) for m in ("feddf", "fedavg")}
    evidence.save(tmp_path, "evidence", evidence.build_evidence(mode, [0], results, {}))
    with pytest.raises(SystemExit, match="other settings"):
        evidence.bounds_section({**mode, "rounds": 2}, tmp_path)

    bounds = evidence.bounds_section(mode, tmp_path)
    stored = json.loads((tmp_path / "evidence.json").read_text())
    assert stored["configs"]["alpha0.1"]["centralized"] == "alpha0.1"
    bound = bounds["alpha0.1"]
    assert stored["centralized"]["alpha0.1"] == bound
    assert bound["epochs"] == 1 and bound["configs"] == ["alpha0.1"]
    # the private pool (80), the capped validation set and the public set
    assert bound["samples"] > 80
    accuracy = bound["per_seed"]["0"]["per_arch"]["test_vit"]
    assert 0.0 <= accuracy <= 1.0 and bound["summary"]["mean"] == bound["per_seed"]["0"]["mean"]
    assert (tmp_path / "evidence.png").stat().st_size > 0
