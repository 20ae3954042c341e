"""Tests for the pure statistics helpers of the load generator."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from dynamo_gateway.bench.stats import mean, percentile, percentiles, summarize


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 101, 1000])
def test_percentile_matches_numpy(n: int) -> None:
    rng = random.Random(n)
    values = [rng.expovariate(1.0) for _ in range(n)]
    for q in (0.0, 1.0, 25.0, 50.0, 90.0, 95.5, 99.0, 99.9, 100.0):
        expected = float(np.percentile(values, q))
        got = percentile(values, q)
        assert got is not None
        assert math.isclose(got, expected, rel_tol=1e-12, abs_tol=1e-12), (n, q)


def test_percentile_with_ties_and_integers() -> None:
    values = [5, 1, 1, 1, 9, 9]
    for q in range(0, 101, 5):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentiles_sorts_once_and_matches() -> None:
    values = [3.0, 1.0, 2.0, 10.0]
    assert percentiles(values, [50, 90, 99]) == pytest.approx(
        [float(x) for x in np.percentile(values, [50, 90, 99])]
    )


def test_empty_input() -> None:
    assert percentile([], 50) is None
    assert percentiles([], [50, 99]) == [None, None]
    assert mean([]) is None
    assert summarize([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_bad_percentile() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0, 2.0], -1)


def test_summarize_scales_and_orders() -> None:
    rng = random.Random(0)
    values = [rng.random() for _ in range(500)]
    s = summarize(values, scale=1000.0)
    assert set(s) == {"mean", "p50", "p90", "p99"}
    assert s["mean"] == pytest.approx(float(np.mean(values)) * 1000.0)
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert s[key] == pytest.approx(float(np.percentile(values, q)) * 1000.0)
    p50, p90, p99 = s["p50"], s["p90"], s["p99"]
    assert p50 is not None and p90 is not None and p99 is not None
    assert p50 <= p90 <= p99


def test_summarize_accepts_generators_and_custom_percentiles() -> None:
    s = summarize((x for x in range(11)), qs=(10.0, 99.9))
    assert s == {"mean": 5.0, "p10": 1.0, "p99.9": pytest.approx(9.99)}


def test_mean() -> None:
    assert mean([1.0, 2.0, 6.0]) == 3.0
    assert mean(iter([4])) == 4.0
