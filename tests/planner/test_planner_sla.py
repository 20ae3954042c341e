"""The sla policy's parts: predictors, the profile, the sizing rule, the policy on a series."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.planner.config import load_config
from dynamo_gateway.planner.observe import Observation, PoolKey, Traffic
from dynamo_gateway.planner.policies.sla import aggregated_workers, make_sla_policy, size
from dynamo_gateway.planner.predict import Holt, MovingAverage, make_predictor
from dynamo_gateway.planner.profile import DecodePoint, Profile
from dynamo_gateway.protocol.engine import WorkerRole

# A made-up but engine-shaped profile: prefill 10 ms + 0.1 ms/token; ITL grows with the
# batch (5 ms + 0.5 ms per sequence) and with the context (x1.5 at 4096 tokens).
PROFILE = Profile(
    engine="mocker",
    model="m",
    prefill=[(128, 0.0228), (1024, 0.1124), (4096, 0.4196)],
    decode=[
        DecodePoint(b, c, (0.005 + 0.0005 * b) * (1.5 if c == 4096 else 1.0))
        for b in (1, 8, 32, 64)
        for c in (512, 4096)
    ],
)


def test_holt_follows_a_ramp_that_a_moving_average_lags() -> None:
    holt, avg = Holt(), MovingAverage(5)
    errors_h, errors_a = [], []
    for t in range(40):
        value = 2.0 * t
        if t > 10:
            errors_h.append(abs(holt.predict() - value))
            errors_a.append(abs(avg.predict() - value))
        holt.observe(value)
        avg.observe(value)
    assert sum(errors_h) < 0.5 * sum(errors_a)
    assert make_predictor("constant").predict() == 0.0
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("oracle")


def test_holt_never_predicts_negative_load() -> None:
    holt = Holt()
    for v in (100, 50, 10, 0, 0):
        holt.observe(v)
    assert holt.predict() >= 0.0


def test_profile_interpolates_and_round_trips(tmp_path: Path) -> None:
    assert PROFILE.prefill_s(576) == pytest.approx(0.0676, rel=1e-3)
    assert PROFILE.prefill_s(8192) > PROFILE.prefill_s(4096)  # extrapolated
    assert PROFILE.itl_s(8, 512) == pytest.approx(0.009)
    assert PROFILE.itl_s(8, 2304) == pytest.approx(0.009 * 1.25)  # halfway in context
    assert PROFILE.max_batch(0.021, 512) == 32
    assert PROFILE.max_batch(0.001, 512) == 1  # never below one
    path = tmp_path / "p.json"
    PROFILE.save(path)
    assert Profile.load(path) == PROFILE
    path.write_text("{}")
    with pytest.raises(ConfigError, match="not a valid profile"):
        Profile.load(path)


def test_sizing_follows_rate_lengths_and_targets() -> None:
    s = size(PROFILE, rate=10, isl=1024, osl=100, ttft_s=1.0, itl_s=0.021, max_utilisation=0.8)
    # prefill: 10 req/s * 0.1124 s at 80% = 1.405 workers
    assert s.prefill == pytest.approx(10 * 0.1124 / 0.8)
    # decode: at context 1074 ITL is above the 512-token row, so fewer than 32 fit
    # in 21 ms; 10 req/s * 100 tokens * itl(batch) requests decode at once.
    assert s.batch == PROFILE.max_batch(0.021, 1074) and 16 < s.batch < 32 and s.feasible
    assert s.decode == pytest.approx(10 * 100 * PROFILE.itl_s(s.batch, 1074) / s.batch)
    tight = size(PROFILE, 10, 1024, 100, ttft_s=0.2, itl_s=0.021, max_utilisation=0.8)
    assert tight.utilisation == pytest.approx(1 - 0.1124 / 0.2)
    assert tight.prefill > s.prefill
    assert not size(PROFILE, 10, 4096, 100, 0.3, 0.021, 0.8).feasible
    double = size(PROFILE, 20, 1024, 100, 1.0, 0.021, 0.8)
    assert double.prefill == pytest.approx(2 * s.prefill)


def test_the_policy_sizes_prefill_and_decode_pools_apart(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    PROFILE.save(path)
    cfg = load_config(
        None,
        policy="sla",
        sla={"predictor": "constant"},
        models=[
            {
                "name": "m",
                "path": "m",
                "ttft_ms": 1000,
                "itl_ms": 21,
                "profile": path,
                "pools": {"prefill": {"min": 0, "max": 8}, "decode": {"min": 1, "max": 8}},
            }
        ],
    )
    policy = make_sla_policy(cfg)
    p, d = PoolKey("m", WorkerRole.PREFILL), PoolKey("m", WorkerRole.DECODE)
    # Long prompts, short answers: prefill-heavy.
    long_prompts = Traffic(
        seconds=10, requests=100, input_tokens=100 * 4096, output_tokens=100 * 20
    )
    got = policy.demand(Observation(0.0, {}, {"m": long_prompts}))
    busy = PROFILE.prefill_s(4096)  # 0.42 s of a 1 s TTFT: planned at most 58% busy
    assert got[p].workers == math.ceil(10 * busy / min(0.8, 1 - busy))
    assert got[p].workers > got[d].workers
    # Short prompts, long answers: decode-heavy.
    chatty = Traffic(seconds=10, requests=100, input_tokens=100 * 128, output_tokens=100 * 2000)
    got = policy.demand(Observation(10.0, {}, {"m": chatty}))
    assert got[d].workers > got[p].workers
    assert got[d].predicted["request_rate"] == pytest.approx(10)
    # No traffic sample (no frontend reachable): no demand, the pools keep their size.
    assert policy.demand(Observation(20.0, {}, {})) == {}


def test_the_sla_policy_needs_a_profile() -> None:
    cfg = load_config(None, policy="sla", models=[{"name": "m", "path": "m"}])
    with pytest.raises(ConfigError, match="needs a profile"):
        make_sla_policy(cfg)


def test_an_aggregated_pool_is_sized_for_prefill_stalling_decode() -> None:
    n, u, itl = aggregated_workers(PROFILE, 10, 1024, 100, ttft_s=1.0, itl_s=0.021,
                                   max_utilisation=0.8)  # fmt: skip
    assert itl <= 0.021 and u == pytest.approx(10 * PROFILE.prefill_s(1024) / n)
    # One worker fewer misses a target: its prefills stall decoding too long.
    fewer = aggregated_workers(PROFILE, 10, 1024, 100, 1.0, 0.021 * 0.999, 0.8)[0]
    assert fewer >= n
    # Prefill stalls count: the plain sum of separate prefill and decode pools is not enough
    # once a prefill takes a fifth of every second.
    s = size(PROFILE, 10, 1024, 100, 1.0, 0.021, 0.8)
    assert n >= math.ceil(s.prefill + s.decode)
    assert aggregated_workers(PROFILE, 20, 1024, 100, 1.0, 0.021, 0.8)[0] > n
    assert aggregated_workers(PROFILE, 10, 1024, 100, 1.0, 0.012, 0.8)[0] > n
    assert aggregated_workers(PROFILE, 0, 1024, 100, 1.0, 0.021, 0.8) == (0, 0.0, 0.0)


def test_a_pool_shrinks_only_when_its_peak_leaves_the_window(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    PROFILE.save(path)
    cfg = load_config(
        None, policy="sla", sla={"predictor": "constant", "down_window": 3},
        models=[{"name": "m", "path": "m", "ttft_ms": 1000, "itl_ms": 21, "profile": path,
                 "pools": {"aggregated": {"min": 1, "max": 64}}}],
    )  # fmt: skip
    policy = make_sla_policy(cfg)
    key = PoolKey("m", WorkerRole.AGGREGATED)

    def at(t: float, rate: float) -> int:
        traffic = Traffic(seconds=10, requests=10 * rate, input_tokens=10 * rate * 1024,
                          output_tokens=10 * rate * 100)  # fmt: skip
        return policy.demand(Observation(t, {}, {"m": traffic}))[key].workers

    high = at(0, 20)
    assert high > 1
    seen = [at(10 * i, 2) for i in range(1, 5)]
    low = seen[-1]
    assert seen[:2] == [high, high]  # the peak is still in the 3-interval window
    assert low < high and seen[2] == low  # it left the window: down at once to the need
    assert at(50, 20) == high  # up again at once
