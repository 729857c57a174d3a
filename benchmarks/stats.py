"""The statistics `make bench` reports over seeds: summaries, paired differences, curve slopes.

Kept apart from the runs so that the arithmetic behind every headline is small, pure and tested
against hand-computed values (tests/test_bench_stats.py). Every figure is rounded to 4 decimals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats

DECIMALS = 4


def _r(value: float) -> float:
    return round(float(value), DECIMALS)


def summarize(values: Sequence[float]) -> dict:
    """n, mean, sample std (ddof=1; None for a single value), min and max of `values`."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("summarize needs at least one value")
    return {
        "n": int(a.size),
        "mean": _r(a.mean()),
        "std": _r(a.std(ddof=1)) if a.size > 1 else None,
        "min": _r(a.min()),
        "max": _r(a.max()),
    }


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """Per-seed differences a - b (same seed, same split) with a Student-t 95% interval of
    their mean: mean +- t(0.975, n-1) * std / sqrt(n). Needs at least 2 pairs."""
    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_.shape != b_.shape or a_.ndim != 1:
        raise ValueError(f"paired needs two equally long sequences, got {len(a)} and {len(b)}")
    n = a_.size
    if n < 2:
        raise ValueError(f"paired needs at least 2 pairs (seeds) for an interval, got {n}")
    diffs = a_ - b_
    mean, std = float(diffs.mean()), float(diffs.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {
        "n": int(n),
        "diffs": [_r(d) for d in diffs],
        "mean": _r(mean),
        "std": _r(std),
        "min": _r(diffs.min()),
        "ci95": [_r(mean - half), _r(mean + half)],
    }


def slope(curve: Sequence[float], last: int = 3) -> float | None:
    """Least-squares slope per round over the curve's last `last` points (fewer if the curve is
    shorter): near 0 once the curve has flattened. None for a curve of fewer than 2 points."""
    y = np.asarray(curve, dtype=float)[-last:]
    if y.size < 2:
        return None
    return _r(np.polyfit(np.arange(y.size, dtype=float), y, 1)[0])
