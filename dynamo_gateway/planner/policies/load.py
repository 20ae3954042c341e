"""The `load` policy: react to what the workers report, without flapping.

A pool is *over* when its requests per worker (running + waiting) pass
``up_at * target_requests``, more than ``waiting_up`` requests wait per worker,
or its KV usage passes ``kv_up_at``. It is *under* when one worker fewer would
still stay below ``down_at * target_requests`` and ``kv_down_at`` with nothing
waiting. Only ``up_intervals`` consecutive over-intervals add workers (enough
to bring the load back under ``up_at``, at most ``max_step`` at once), and only
``down_intervals`` consecutive under-intervals remove one; the gap between the
up and down thresholds, the streaks and the planner's cool-down keep noise from
flapping the pool. Starting workers count as present, so a pool is not grown
again while its new workers load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dynamo_gateway.planner.config import LoadPolicyConfig, PlannerConfig
from dynamo_gateway.planner.observe import Observation, PoolKey, PoolLoad
from dynamo_gateway.planner.policy import Demand


@dataclass
class _Streak:
    over: int = 0
    under: int = 0


@dataclass
class LoadPolicy:
    config: LoadPolicyConfig
    _streaks: dict[PoolKey, _Streak] = field(default_factory=dict)

    def demand(self, observation: Observation) -> dict[PoolKey, Demand]:
        return {key: self._pool(key, load) for key, load in observation.pools.items()}

    def _pool(self, key: PoolKey, load: PoolLoad) -> Demand:
        c = self.config
        streak = self._streaks.setdefault(key, _Streak())
        n = load.size
        if n == 0:
            streak.over = streak.under = 0
            return Demand(0, "no worker in the pool: its minimum applies")
        per = load.requests / n
        waiting = load.waiting_requests / n
        # KV usage is over the live workers only (starting ones report nothing yet).
        kv = load.kv_usage * load.live / n if load.live else 0.0
        facts = f"{per:.1f} requests/worker, {waiting:.1f} waiting/worker, kv {kv:.0%}"
        over = per > c.up_at * c.target_requests or waiting > c.waiting_up or kv > c.kv_up_at
        under = (
            n > 1
            and load.waiting_requests == 0
            and load.requests / (n - 1) < c.down_at * c.target_requests
            and kv * n / (n - 1) < c.kv_down_at
        )
        streak.over = streak.over + 1 if over else 0
        streak.under = streak.under + 1 if under else 0
        if streak.over >= c.up_intervals:
            streak.over = 0
            need = max(
                math.ceil(load.requests / (c.up_at * c.target_requests)),
                math.ceil(n * kv / c.kv_down_at) if kv > c.kv_up_at else 0,
                n + 1,
            )
            return Demand(
                min(need, n + c.max_step), f"over for {c.up_intervals} intervals: {facts}"
            )
        if streak.under >= c.down_intervals:
            streak.under = 0
            return Demand(n - 1, f"under for {c.down_intervals} intervals: {facts}")
        state = "over" if over else "under" if under else "steady"
        return Demand(n, f"{state}: {facts}")


def make_load_policy(config: PlannerConfig) -> LoadPolicy:
    return LoadPolicy(config.load)
