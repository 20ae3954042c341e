"""The planner process: observe, decide, act, every interval.

Each interval it reads the pools from discovery and the workers' load reports
(event plane), the traffic from the frontends' ``/metrics``, asks the policy
for demands, turns them into decisions (`policy.decide`: limits, cool-down,
budget) and has the connector carry them out - adding workers, or draining the
least busy of its own. Every decision is logged with its inputs and shown as
``dynamo_gateway_planner_*`` metrics; with ``dry_run`` nothing is carried out.
Decisions that change a pool also go out on the event plane
(`PlannerDecision` on ``planner.decisions``) for the frontends' /status page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dynamo_gateway.planner.config import PlannerConfig
from dynamo_gateway.planner.connector import (
    ManagedWorker,
    PlannerConnector,
    WorkerSpec,
    WorkerState,
)
from dynamo_gateway.planner.observe import (
    Observation,
    PoolKey,
    PoolLoad,
    Samples,
    Traffic,
    merge_samples,
    parse_samples,
    pool_load,
    traffic_between,
)
from dynamo_gateway.planner.policy import Decision, PlannerPolicy, Stabilizer, decide
from dynamo_gateway.protocol.engine import LoadMetrics
from dynamo_gateway.runtime.connect import connect_discovery, connect_events
from dynamo_gateway.runtime.discovery import ChangeKind, Discovery, WorkerRecord
from dynamo_gateway.runtime.events import (
    PLANNER_DECISIONS_TOPIC,
    EventPlane,
    LoadReport,
    PlannerDecision,
    load_topic,
)
from dynamo_gateway.runtime.status import StatusServer

log = logging.getLogger(__name__)

REPORT_STALE_S = 5.0  # a load report older than this counts as no report


def pools_now(
    config: PlannerConfig,
    records: Iterable[WorkerRecord],
    loads: Mapping[str, LoadMetrics],
    managed: Iterable[ManagedWorker],
) -> dict[PoolKey, PoolLoad]:
    """Every configured pool's size and load (pure)."""
    records = list(records)
    registered = {r.worker_id for r in records}
    out: dict[PoolKey, PoolLoad] = {}
    managed = list(managed)
    for model in config.models:
        for key in model.pool_keys():
            mine = [r for r in records if r.model == key.model and r.role == key.role]
            live = [r for r in mine if not r.draining]
            reports = [
                loads.get(r.worker_id, LoadMetrics(kv_blocks_total=r.kv_blocks_total)) for r in live
            ]
            ours = [w for w in managed if w.pool == key]
            starting = sum(
                1
                for w in ours
                if w.state is not WorkerState.DRAINING and w.worker_id not in registered
            )
            draining = len(
                {r.worker_id for r in mine if r.draining}
                | {w.worker_id for w in ours if w.state is WorkerState.DRAINING}
            )
            out[key] = pool_load(reports, starting=starting, draining=draining)
    return out


def victims(
    pool: PoolKey,
    count: int,
    managed: Iterable[ManagedWorker],
    registered: set[str],
    loads: Mapping[str, LoadMetrics],
) -> list[str]:
    """Which of the connector's workers of `pool` to drain: not yet registered ones
    first (they hold no request), then the fewest requests, then the newest."""
    mine = [w for w in managed if w.pool == pool and w.state is not WorkerState.DRAINING]

    def cost(w: ManagedWorker) -> tuple[int, int, float]:
        m = loads.get(w.worker_id)
        busy = m.active_requests + m.waiting_requests if m is not None else 0
        return (w.worker_id in registered, busy, -w.started_at)

    return [w.worker_id for w in sorted(mine, key=cost)[:count]]


@dataclass
class _Metrics:
    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r, p = self.registry, "dynamo_gateway_planner"
        pool = ["model", "role"]

        def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(f"{p}_{name}", doc, labels, registry=r)

        self.workers = gauge("workers", "Workers per pool, by state", [*pool, "state"])
        self.desired = gauge("desired_workers", "Workers the planner asks for", pool)
        self.wanted = gauge("policy_workers", "Workers the policy wanted, before limits", pool)
        self.predicted = gauge("predicted", "Predicted next-interval load", ["model", "quantity"])
        self.rate = gauge("request_rate", "Requests per second, last interval", ["model"])
        self.attainment = gauge(
            "sla_attainment", "Share of requests within target, last interval", ["model", "metric"]
        )
        self.actions = Counter(
            f"{p}_scaling_actions", "Workers added or drained", [*pool, "direction"], registry=r
        )
        self.decisions = Counter(f"{p}_decisions", "Planning intervals run", registry=r)
        self.worker_seconds = gauge("worker_seconds", "Worker time used by the connector", [])
        self.budget = Gauge(f"{p}_budget_workers", "The global worker budget", registry=r)


class Planner:
    def __init__(
        self,
        config: PlannerConfig,
        policy: PlannerPolicy,
        connector: PlannerConnector,
        *,
        discovery: Discovery,
        events: EventPlane,
        clock: Callable[[], float] = time.monotonic,
        scrape: Callable[[], Awaitable[list[str]]] | None = None,
        own_planes: bool = True,
    ) -> None:
        """`scrape` returns the frontends' metrics texts (default: GET each of
        ``config.frontends``' /metrics); an in-process gateway passes its own.
        With `own_planes` the planner closes `discovery` and `events` in `aclose()`."""
        self.config = config
        self.policy = policy
        self.connector = connector
        self.discovery = discovery
        self.events = events
        self.clock = clock
        self._own_planes = own_planes
        self._scrape_texts = scrape if scrape is not None else self._get_frontends
        self.records: dict[str, WorkerRecord] = {}
        self.loads: dict[str, tuple[LoadMetrics, float]] = {}
        self.history: list[tuple[float, list[Decision]]] = []
        self.metrics = _Metrics(CollectorRegistry())
        self.metrics.budget.set(config.effective_budget)
        self._stabilizer = Stabilizer()
        self._tasks: list[asyncio.Task[None]] = []
        self._scrape: tuple[float, Samples] | None = None
        self._status: StatusServer | None = None

    async def start(self, *, metrics_port: int | None = None, host: str = "127.0.0.1") -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch()))
        for model in self.config.models:
            self._tasks.append(loop.create_task(self._follow_load(model.name)))
        await self.connector.start()
        if metrics_port is not None:
            self._status = StatusServer(
                {"/metrics": self._serve_metrics}, host=host, port=metrics_port
            )
            await self._status.start()
        await asyncio.sleep(0)  # let the subscriptions start

    @property
    def metrics_address(self) -> str:
        return self._status.address if self._status is not None else ""

    async def _watch(self) -> None:
        async for event in self.discovery.watch():
            if event.kind is ChangeKind.PUT:
                self.records[event.record.worker_id] = event.record
            else:
                self.records.pop(event.record.worker_id, None)
                self.loads.pop(event.record.worker_id, None)

    async def _follow_load(self, model: str) -> None:
        async for report in self.events.subscribe(load_topic(model), LoadReport):
            self.loads[report.worker_id] = (report.metrics, self.clock())

    def _fresh_loads(self) -> dict[str, LoadMetrics]:
        now = self.clock()
        return {w: m for w, (m, t) in self.loads.items() if now - t <= REPORT_STALE_S}

    async def _get_frontends(self) -> list[str]:
        texts = await asyncio.gather(
            *(
                asyncio.to_thread(_get, f"{url.rstrip('/')}/metrics")
                for url in self.config.frontends
            ),
            return_exceptions=True,
        )
        out = []
        for url, text in zip(self.config.frontends, texts, strict=True):
            if isinstance(text, BaseException):
                raise OSError(f"cannot scrape {url}/metrics: {text}")
            out.append(text)
        return out

    async def _traffic(self) -> dict[str, Traffic]:
        try:
            texts = await self._scrape_texts()
        except OSError as exc:
            log.warning("planner: %s", exc)
            return {}  # a partial sum would read as a traffic drop
        if not texts:
            return {}
        now, samples = self.clock(), merge_samples(parse_samples(t) for t in texts)
        before, self._scrape = self._scrape, (now, samples)
        if before is None:
            return {}
        seconds = now - before[0]
        return {
            m.name: traffic_between(
                before[1],
                samples,
                m.name,
                seconds,
                ttft_target_s=m.ttft_ms / 1000,
                itl_target_s=m.itl_ms / 1000,
            )
            for m in self.config.models
        }

    async def step(self) -> list[Decision]:
        """One interval: observe, decide, act. Returns the decisions."""
        traffic = await self._traffic()
        loads = self._fresh_loads()
        managed = self.connector.managed()
        pools = pools_now(self.config, self.records.values(), loads, managed)
        observation = Observation(self.clock(), pools, traffic)
        demands = self.policy.demand(observation)
        decisions = decide(observation, demands, self.config, self._stabilizer)
        self.history.append((observation.time, decisions))
        self._record(observation, decisions)
        if not self.config.dry_run:
            await self._act(decisions, managed, loads)
        return decisions

    async def _act(
        self,
        decisions: list[Decision],
        managed: list[ManagedWorker],
        loads: Mapping[str, LoadMetrics],
    ) -> None:
        for d in decisions:
            if d.change > 0:
                spec = WorkerSpec.for_pool(self.config, self.config.model(d.pool.model), d.pool)
                await self.connector.add(spec, d.change)
                self.metrics.actions.labels(d.pool.model, d.pool.role.value, "up").inc(d.change)
            elif d.change < 0:
                chosen = victims(d.pool, -d.change, managed, set(self.records), loads)
                if len(chosen) < -d.change:
                    log.warning(
                        "planner: %s should lose %d workers but the connector runs only %d of them",
                        d.pool, -d.change, len(chosen),
                    )  # fmt: skip
                if chosen:
                    await self.connector.remove(d.pool, chosen)
                    labels = (d.pool.model, d.pool.role.value, "down")
                    self.metrics.actions.labels(*labels).inc(len(chosen))

    def _record(self, observation: Observation, decisions: list[Decision]) -> None:
        m = self.metrics
        m.decisions.inc()
        m.worker_seconds.set(self.connector.worker_seconds())
        for d in decisions:
            load = observation.pools.get(d.pool, PoolLoad())
            labels = (d.pool.model, d.pool.role.value)
            for state, count in (
                ("live", load.live),
                ("starting", load.starting),
                ("draining", load.draining),
            ):
                m.workers.labels(*labels, state).set(count)
            m.desired.labels(*labels).set(d.target)
            m.wanted.labels(*labels).set(d.wanted)
            for quantity, value in d.predicted.items():
                m.predicted.labels(d.pool.model, quantity).set(value)
            verb = "add" if d.change > 0 else "drain" if d.change < 0 else "keep"
            what = f"{verb} {abs(d.change)}" if d.change else "keep"
            log.log(
                logging.INFO if d.change else logging.DEBUG,
                "planner%s: %s %s -> %d workers (%s; live %d, starting %d, draining %d, "
                "running %d, waiting %d, kv %.0f%%): %s",
                " (dry run)" if self.config.dry_run else "", d.pool, what, d.target,
                f"policy wanted {d.wanted}", load.live, load.starting, load.draining,
                load.active_requests, load.waiting_requests, 100 * load.kv_usage, d.reason,
            )  # fmt: skip
            if d.change:
                self.events.publish(
                    PLANNER_DECISIONS_TOPIC,
                    PlannerDecision(
                        time=time.time(), model=d.pool.model, role=d.pool.role.value,
                        current=d.current, target=d.target, wanted=d.wanted, reason=d.reason,
                        live=load.live, starting=load.starting, draining=load.draining,
                        dry_run=self.config.dry_run,
                    ),
                )  # fmt: skip
        for model, t in observation.traffic.items():
            m.rate.labels(model).set(t.request_rate)
            if t.ttft_attainment is not None:
                m.attainment.labels(model, "ttft").set(t.ttft_attainment)
            if t.itl_attainment is not None:
                m.attainment.labels(model, "itl").set(t.itl_attainment)

    async def _serve_metrics(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)

    async def run(self, stop: asyncio.Event) -> None:
        """Step every interval until `stop` is set."""
        while not stop.is_set():
            started = self.clock()
            try:
                await self.step()
            except Exception:
                log.exception("planner step failed; trying again next interval")
            wait = max(0.0, self.config.interval_s - (self.clock() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def aclose(self, *, stop_workers: bool = True) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.connector.aclose(stop_workers=stop_workers)
        if self._own_planes:
            await self.discovery.aclose()
            await self.events.aclose()
        if self._status is not None:
            await self._status.aclose()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


async def connect_planner(
    config: PlannerConfig, registry: object, policy: PlannerPolicy, connector: PlannerConnector
) -> Planner:
    """A `Planner` over the discovery and event plane its config names."""
    from dynamo_gateway.registry import Registry
    from dynamo_gateway.settings import load_settings

    assert isinstance(registry, Registry)
    settings = load_settings(runtime={"discovery": config.discovery, "events": config.events})
    discovery = await connect_discovery(registry, config.discovery, settings)
    events = await connect_events(registry, config.events, settings)
    return Planner(config, policy, connector, discovery=discovery, events=events)
