"""The policy interface, and what turns its wishes into decisions (pure).

A policy (`load`, `sla`, or a plugin's) looks at an `Observation` and says how
many workers each pool should have, with a reason (`Demand`). `decide()` then
applies what holds for every policy: each pool within its min/max, scale-down
only after the pool's cool-down and at most `max_down_step` at a time, and the
global budget shared across models (`allocate`). Nothing here does I/O or
reads a clock: time comes in with the observation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from dynamo_gateway.planner.config import PlannerConfig
from dynamo_gateway.planner.observe import Observation, PoolKey


@dataclass(frozen=True)
class Demand:
    workers: int
    reason: str
    predicted: Mapping[str, float] = field(default_factory=dict)


class PlannerPolicy(Protocol):
    def demand(self, observation: Observation) -> dict[PoolKey, Demand]:
        """Workers each pool should have next; a pool left out keeps its size."""
        ...


PolicyFactory = Callable[[PlannerConfig], PlannerPolicy]


@dataclass(frozen=True)
class Decision:
    pool: PoolKey
    current: int  # live + starting
    wanted: int  # the policy's demand, before limits, cool-down and budget
    target: int  # what the planner asks the connector for
    reason: str
    predicted: Mapping[str, float] = field(default_factory=dict)

    @property
    def change(self) -> int:
        return self.target - self.current


def allocate(
    wanted: Mapping[PoolKey, int], minimum: Mapping[PoolKey, int], budget: int
) -> dict[PoolKey, int]:
    """Share `budget` workers among pools: every pool gets its minimum, then one
    worker at a time goes to the pool with the largest unmet share of its demand,
    so every pool ends near the same fraction of what it wanted (ties by pool
    name, so the result is deterministic)."""
    order = sorted(wanted)
    alloc = {k: min(minimum.get(k, 0), wanted[k]) for k in order}
    left = budget - sum(alloc.values())
    while left > 0:
        open_ = [k for k in order if alloc[k] < wanted[k]]
        if not open_:
            break
        # max() keeps the first of equals: the earliest pool in name order.
        pick = max(open_, key=lambda k: (wanted[k] - alloc[k]) / wanted[k])
        alloc[pick] += 1
        left -= 1
    return alloc


@dataclass
class Stabilizer:
    """Cool-down bookkeeping per pool (the only state `decide()` keeps)."""

    last_change: dict[PoolKey, float] = field(default_factory=dict)


def decide(
    observation: Observation,
    demands: Mapping[PoolKey, Demand],
    config: PlannerConfig,
    state: Stabilizer,
) -> list[Decision]:
    """Decisions for every configured pool, in pool order."""
    now = observation.time
    wanted: dict[PoolKey, int] = {}
    minimum: dict[PoolKey, int] = {}
    current: dict[PoolKey, int] = {}
    reasons: dict[PoolKey, str] = {}
    for model in config.models:
        for key in model.pool_keys():
            limits = config.limits(key)
            load = observation.pools.get(key)
            size = load.size if load is not None else 0
            current[key] = size
            demand = demands.get(key)
            want = demand.workers if demand is not None else size
            reason = demand.reason if demand is not None else "no demand from the policy"
            bounded = min(max(want, limits.min), limits.max)
            if bounded < size:
                since = now - state.last_change.get(key, -float("inf"))
                if since < config.cooldown_s:
                    reason += (
                        f"; scale-down held: cool-down ({since:.0f}/{config.cooldown_s:.0f} s)"
                    )
                    bounded = size
                else:
                    bounded = max(bounded, size - config.max_down_step)
            wanted[key] = bounded
            minimum[key] = limits.min
            reasons[key] = reason
    targets = allocate(wanted, minimum, config.effective_budget)
    out: list[Decision] = []
    for key in sorted(wanted):
        target = targets[key]
        reason = reasons[key]
        if target < wanted[key]:
            reason += f"; budget: {target} of {wanted[key]} wanted"
        demand = demands.get(key)
        out.append(
            Decision(
                pool=key,
                current=current[key],
                wanted=demand.workers if demand is not None else current[key],
                target=target,
                reason=reason,
                predicted=demand.predicted if demand is not None else {},
            )
        )
        if target != current[key]:
            state.last_change[key] = now
    return out
