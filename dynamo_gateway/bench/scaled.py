"""A replay's fleet scaled by the planner, and what a scaled run is judged on.

`scaled_fleet()` runs the real `Planner` (its policy from the registry, its
decisions, cool-downs and budget) over an embedded gateway: the frontend's own
metrics are its traffic, the fleet's load reports its load, and the
`InprocessConnector` adds engines to the fleet and drains them. On a virtual
clock (`dynamo_gateway.bench.vclock`) all of it runs on simulated time, so an
hour of trace with its scaling decisions replays in minutes.

The judging is pure: `worker_seconds()` integrates the workers' lifetimes over
the measured window; `sla_attainment()` counts requests within TTFT and ITL
targets (a failed request is within neither).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from pydantic import ValidationError

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.frontend.app import Gateway
from dynamo_gateway.planner.config import PlannerConfig, read_config_file
from dynamo_gateway.planner.connector import WorkerState
from dynamo_gateway.planner.connectors.inprocess import InprocessConnector
from dynamo_gateway.planner.loop import Planner

__all__ = [
    "ScaledFleet",
    "replay_planner_config",
    "scaled_fleet",
    "sla_attainment",
    "worker_seconds",
]

log = logging.getLogger(__name__)


def replay_planner_config(
    path: Path, *, model: str, model_path: Path, engine: str
) -> PlannerConfig:
    """A planner TOML for a replay: its settings, and at most one ``[[models]]`` entry
    whose pools and targets size the replayed model (name, path, engine are the replay's)."""
    data = dict(read_config_file(path))
    models = data.get("models") or [{}]
    if len(models) != 1:
        raise ConfigError(f"{path}: a replay serves one model; the file has {len(models)}")
    entry = {**models[0], "name": model, "path": model_path, "engine": engine}
    data["models"] = [entry]
    try:
        return PlannerConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid planner config {path}: {exc}") from exc


@dataclass
class ScaledFleet:
    """A running planner over a replay's fleet, sampled for the report."""

    planner: Planner
    connector: InprocessConnector
    # (loop time, live, starting, draining) every sample interval
    timeline: list[tuple[float, int, int, int]] = field(default_factory=list)

    def sample(self, now: float) -> None:
        states = [w.state for w in self.connector.managed()]
        self.timeline.append(
            (
                now,
                states.count(WorkerState.RUNNING),
                states.count(WorkerState.STARTING),
                states.count(WorkerState.DRAINING),
            )
        )

    def lifetimes(self) -> list[tuple[float, float | None]]:
        """(asked at, gone at or None) of every worker the connector had, loop time."""
        asked: dict[str, float] = {}
        gone: dict[str, float] = {}
        for t, worker_id, what in self.connector.history:
            if what == "asked":
                asked[worker_id] = t
            elif what == "gone":
                gone[worker_id] = t
        return [(t, gone.get(w)) for w, t in asked.items()]

    def report(self, start: float, end: float, time_scale: float = 1.0) -> dict[str, Any]:
        """Figures over the window ``[start, end]`` (loop time), in trace time."""
        decisions = [
            {
                "t": (t - start) * time_scale,
                "pool": str(d.pool),
                "current": d.current,
                "target": d.target,
                "reason": d.reason,
            }
            for t, ds in self.planner.history
            for d in ds
            if d.change
        ]
        return {
            "worker_seconds": worker_seconds(self.lifetimes(), start, end) * time_scale,
            "max_workers": max(
                (live + starting for _, live, starting, _ in self.timeline), default=0
            ),
            "timeline": [
                [(t - start) * time_scale, live, starting, draining]
                for t, live, starting, draining in self.timeline
                if start <= t <= end
            ],
            "decisions": decisions,
        }


@contextlib.asynccontextmanager
async def scaled_fleet(
    gateway: Gateway,
    config: PlannerConfig,
    *,
    startup_s: float = 0.0,
    drain_timeout_s: float = 600.0,
    sample_interval_s: float = 1.0,
    ready_timeout_s: float = 120.0,
) -> AsyncIterator[ScaledFleet]:
    """Run the planner over `gateway`'s (empty) fleet; yields once every model has a
    live worker; on exit stops the planner and drains the workers."""
    fleet = gateway.fleet
    if fleet is None:
        raise ConfigError("the planner needs an embedded gateway's fleet")
    loop = asyncio.get_running_loop()
    policy = fleet.registry.planner_policies.get(config.policy)(config)
    connector = InprocessConnector(fleet, startup_s=startup_s, drain_timeout_s=drain_timeout_s)

    async def scrape() -> list[str]:
        return [generate_latest(gateway.metrics.registry).decode()]

    planner = Planner(
        config, policy, connector, discovery=fleet.discovery, events=fleet.events,
        clock=loop.time, scrape=scrape, own_planes=False,
    )  # fmt: skip
    run = ScaledFleet(planner, connector)
    stop = asyncio.Event()
    await planner.start()
    stepping = loop.create_task(planner.run(stop))

    async def sampler() -> None:
        while True:
            run.sample(loop.time())
            await asyncio.sleep(sample_interval_s)

    sampling = loop.create_task(sampler())
    try:
        names = [m.name for m in config.models]
        async with asyncio.timeout(ready_timeout_s + startup_s):
            while not all(_serving(gateway, name) for name in names):
                await asyncio.sleep(0.05)
        yield run
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await stepping
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
        await planner.aclose(stop_workers=True)


def _serving(gateway: Gateway, model: str) -> bool:
    pool = gateway.manager.pools.get(model)
    return pool is not None and pool.live_workers() > 0


def worker_seconds(
    lifetimes: Iterable[tuple[float, float | None]], start: float, end: float
) -> float:
    """Worker time inside ``[start, end]``: each (from, to) lifetime clipped to the
    window; a lifetime without an end runs to `end`."""
    total = 0.0
    for born, died in lifetimes:
        lo, hi = max(born, start), min(end if died is None else died, end)
        total += max(0.0, hi - lo)
    return total


def sla_attainment(
    per_request: Sequence[Mapping[str, Any]], ttft_ms: float, itl_ms: float
) -> dict[str, float]:
    """Shares of requests with TTFT within `ttft_ms`, mean ITL within `itl_ms`, and both.

    A request with a single output token has no ITL and meets that target; a
    failed one meets neither.
    """
    n = len(per_request)
    if not n:
        return {"ttft": 0.0, "itl": 0.0, "both": 0.0, "requests": 0.0}
    ttft_ok = itl_ok = both = 0
    for r in per_request:
        ok = bool(r.get("ok"))
        t = r.get("ttft_ms")
        i = r.get("itl_ms")
        a = ok and t is not None and t <= ttft_ms
        b = ok and (i is None or i <= itl_ms)
        ttft_ok += a
        itl_ok += b
        both += a and b
    return {"ttft": ttft_ok / n, "itl": itl_ok / n, "both": both / n, "requests": float(n)}
