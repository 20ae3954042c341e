"""Planner decisions on recorded metric series: the load policy, limits, cool-down, budget."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.planner.config import PlannerConfig, load_config
from dynamo_gateway.planner.observe import Observation, PoolKey, PoolLoad
from dynamo_gateway.planner.policies.load import LoadPolicy
from dynamo_gateway.planner.policy import Decision, Stabilizer, allocate, decide
from dynamo_gateway.protocol.engine import WorkerRole

AGG = WorkerRole.AGGREGATED


def config(**extra: Any) -> PlannerConfig:
    models = extra.pop(
        "models",
        [{"name": "a", "path": "m", "pools": {"aggregated": {"min": 1, "max": 6}}}],
    )
    return load_config(None, models=models, interval_s=1.0, cooldown_s=5.0, **extra)


class Fleet:
    """A simulated pool: carries out decisions at once, load spread over its workers."""

    def __init__(self, cfg: PlannerConfig, workers: dict[PoolKey, int]) -> None:
        self.cfg = cfg
        self.policy = LoadPolicy(cfg.load)
        self.state = Stabilizer()
        self.workers = dict(workers)
        self.log: list[list[Decision]] = []

    def step(self, t: float, requests: dict[PoolKey, int], kv: float = 0.1) -> list[Decision]:
        pools = {}
        for key, n in self.workers.items():
            r = requests.get(key, 0)
            waiting = max(0, r - 16 * n)  # 16 running per worker at most
            pools[key] = PoolLoad(
                live=n,
                active_requests=r - waiting,
                waiting_requests=waiting,
                kv_blocks_used=int(kv * 1000 * n),
                kv_blocks_total=1000 * n,
            )
        obs = Observation(t, pools)
        decisions = decide(obs, self.policy.demand(obs), self.cfg, self.state)
        for d in decisions:
            self.workers[d.pool] = d.target
        self.log.append(decisions)
        return decisions


KEY = PoolKey("a", AGG)


def test_a_step_up_adds_workers_within_a_bounded_number_of_intervals() -> None:
    fleet = Fleet(config(), {KEY: 1})
    for t in range(3):
        fleet.step(t, {KEY: 2})
    assert fleet.workers[KEY] == 1
    # 40 requests, over above 0.9 * 8 per worker: 6 workers, reached 2 at a time.
    sizes = [fleet.step(3 + t, {KEY: 40})[0].target for t in range(8)]
    assert sizes[0] == 1  # one over-interval is not a trend
    assert sizes[1] == 3  # max_step = 2
    assert 6 in sizes[:6]
    assert fleet.workers[KEY] == 6
    assert sizes == sorted(sizes)  # and it stays there


def test_the_step_down_waits_for_the_streak_and_the_cool_down() -> None:
    fleet = Fleet(config(), {KEY: 5})
    fleet.state.last_change[KEY] = 0.0
    sizes = [fleet.step(1 + t, {KEY: 2})[0].target for t in range(40)]
    # Held by the cool-down until t >= 5, then one worker at a time, each change
    # restarting the cool-down: never two removals within 5 s.
    assert sizes[:4] == [5, 5, 5, 5]
    assert sizes[-1] == 1
    changes = [t for t in range(1, 40) if sizes[t] != sizes[t - 1]]
    assert all(b - a >= 5 for a, b in itertools.pairwise(changes))
    assert all(a - b in (0, 1) for a, b in itertools.pairwise(sizes))


def test_noise_around_a_threshold_does_not_flap() -> None:
    rng = random.Random(7)
    fleet = Fleet(config(), {KEY: 3})
    # Hovering around 3 workers' worth of load (target 8/worker, up at 90%): 19-25 requests.
    for t in range(300):
        fleet.step(t, {KEY: 22 + rng.randint(-3, 3)})
    sizes = [log[0].target for log in fleet.log]
    changes = sum(1 for a, b in itertools.pairwise(sizes) if a != b)
    reversals = sum(
        1 for a, b, c in zip(sizes, sizes[1:], sizes[2:], strict=False) if (b - a) * (c - b) < 0
    )
    assert changes <= 4, sizes
    assert reversals == 0


def test_waiting_requests_and_kv_usage_each_scale_up() -> None:
    fleet = Fleet(config(), {KEY: 2})
    for t in range(2):
        fleet.step(t, {KEY: 4}, kv=0.95)  # few requests but a full KV cache
    assert fleet.workers[KEY] > 2
    fleet = Fleet(config(load={"target_requests": 100, "up_at": 0.9, "down_at": 0.5}), {KEY: 1})
    for t in range(2):
        fleet.step(t, {KEY: 20})  # under the request target, but 4 wait (16 run per worker)
    assert fleet.workers[KEY] == 2


def test_pools_are_sized_separately_and_the_budget_is_shared() -> None:
    models = [
        {
            "name": "a",
            "path": "m",
            "pools": {"prefill": {"min": 0, "max": 6}, "decode": {"min": 1, "max": 6}},
        },
        {"name": "b", "path": "m", "pools": {"aggregated": {"min": 1, "max": 6}}},
    ]
    cfg = config(models=models, budget=6)
    p, d, b = PoolKey("a", WorkerRole.PREFILL), PoolKey("a", WorkerRole.DECODE), PoolKey("b", AGG)
    fleet = Fleet(cfg, {p: 1, d: 1, b: 1})
    for t in range(10):
        fleet.step(t, {p: 30, d: 4, b: 60})
        assert sum(fleet.workers.values()) <= 6
        assert fleet.workers[d] >= 1 and fleet.workers[b] >= 1
    # The prefill pool is loaded, the decode pool is not: they differ.
    assert fleet.workers[p] > fleet.workers[d]
    # b wanted more than the budget left; it got a fair share, not all of it.
    assert fleet.workers[b] >= 2
    last = {x.pool: x for x in fleet.log[-1]}
    assert any("budget" in x.reason for x in last.values())


def test_allocate_shares_in_proportion_to_demand_and_keeps_minimums() -> None:
    a, b, c = PoolKey("a", AGG), PoolKey("b", AGG), PoolKey("c", AGG)
    assert allocate({a: 4, b: 4}, {a: 1, b: 1}, 4) == {a: 2, b: 2}
    assert allocate({a: 1, b: 8}, {a: 1, b: 1}, 5) == {a: 1, b: 4}
    assert allocate({a: 3, b: 1, c: 1}, {a: 1, b: 1, c: 1}, 10) == {a: 3, b: 1, c: 1}
    # Each pool gets the same share of its demand: half of 6, 2 and 6.
    assert allocate({a: 6, b: 2, c: 6}, {a: 1, b: 1, c: 1}, 7) == {a: 3, b: 1, c: 3}


def test_limits_clamp_demands_and_an_empty_pool_gets_its_minimum() -> None:
    cfg = config()
    fleet = Fleet(cfg, {KEY: 0})
    assert fleet.step(0, {})[0].target == 1  # min 1
    fleet = Fleet(cfg, {KEY: 6})
    for t in range(4):
        fleet.step(t, {KEY: 500})
    assert fleet.workers[KEY] == 6  # max 6


@pytest.mark.parametrize(
    ("models", "extra", "message"),
    [
        ([{"name": "a", "path": "m", "pools": {"aggregated": {"min": 0}}}], {}, "min >= 1"),
        ([{"name": "a", "path": "m", "pools": {"prefill": {}}}], {}, "needs a decode pool"),
        ([{"name": "a", "path": "m", "pools": {"agg": {}}}], {}, "unknown roles"),
        ([{"name": "a", "path": "m", "pools": {"aggregated": {"min": 3, "max": 2}}}], {}, "above"),
        (
            [{"name": "a", "path": "m"}, {"name": "b", "path": "m"}],
            {"budget": 1},
            "exceed the budget",
        ),
        ([], {}, "at least one model"),
        ([{"name": "a", "path": "m"}], {"load": {"up_at": 0.5, "down_at": 0.6}}, "hysteresis"),
    ],
)
def test_bad_configs_are_refused(models: Any, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, models=models, **extra)


def test_a_config_file_covers_several_models(tmp_path: Path) -> None:
    path = tmp_path / "planner.toml"
    path.write_text(
        """
budget = 5
policy = "load"
[[models]]
name = "a"
path = "models/a"
engine = "mocker"
worker_args = ["--speedup", "10"]
pools = { aggregated = { min = 1, max = 3 } }
[[models]]
name = "b"
path = "models/b"
ttft_ms = 200
pools = { prefill = { min = 0, max = 2 }, decode = { min = 1, max = 2 } }
"""
    )
    cfg = load_config(path, interval_s=2.0)
    assert cfg.effective_budget == 5 and cfg.interval_s == 2.0
    assert [str(k) for m in cfg.models for k in m.pool_keys()] == [
        "a/aggregated",
        "b/prefill",
        "b/decode",
    ]
    assert cfg.model("b").ttft_ms == 200
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
