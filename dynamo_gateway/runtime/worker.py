"""One engine worker as a process of its own (`dynamo-gateway worker`).

Start-up: connect to discovery and the event plane, start the engine, serve it
on the request plane, then register a `WorkerRecord` (model, role, request-plane
address, KV block size and capacity, status endpoint). While running, KV events
and load reports go out on the event plane.

Shutdown on SIGTERM/SIGINT is a drain: the record is re-registered with
``draining=True`` (frontends route nothing new here) and new calls that still
arrive are refused retryably; in-flight requests get up to
``runtime.drain_timeout_s`` to finish; whatever is left is ended retryably
(frontends resume it elsewhere); then the worker deregisters and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from dynamo_gateway.disagg.agent import LATENCY_BUCKETS, KvTransferAgent
from dynamo_gateway.engines.base import Engine, EngineContext
from dynamo_gateway.errors import ConfigError
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.protocol.engine import WorkerRole
from dynamo_gateway.protocol.kv_events import KvEvent
from dynamo_gateway.runtime.connect import connect_discovery, connect_events
from dynamo_gateway.runtime.discovery import Discovery, WorkerRecord
from dynamo_gateway.runtime.events import EventPlane, kv_events_topic, load_topic
from dynamo_gateway.runtime.local import report_load_of
from dynamo_gateway.runtime.rpc_server import RequestPlaneServer
from dynamo_gateway.runtime.status import StatusServer, json_body
from dynamo_gateway.telemetry import tracing

if TYPE_CHECKING:
    from dynamo_gateway.kvbm.manager import TieredCache
    from dynamo_gateway.plugins import Plugins
    from dynamo_gateway.settings import Settings

log = logging.getLogger(__name__)


class Worker:
    """A running worker; `run_worker()` drives one from start to drained exit."""

    def __init__(self, settings: Settings, plugins: Plugins) -> None:
        if len(settings.models) != 1:
            raise ConfigError("a worker serves exactly one --model")
        self.settings = settings
        self.plugins = plugins
        served = settings.models[0]
        self.card = ModelCard.load(
            served.path, served_name=served.name, max_model_len=settings.max_model_len
        )
        ws = settings.worker
        self.worker_id = ws.worker_id or (
            f"{self.card.served_name}-{settings.engine}-{uuid.uuid4().hex[:8]}"
        )
        self.role = WorkerRole(ws.role)
        self.discovery: Discovery | None = None
        self.events: EventPlane | None = None
        self.engine: Engine | None = None
        self.server: RequestPlaneServer | None = None
        self.status: StatusServer | None = None
        self.record: WorkerRecord | None = None
        self._load_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self.settings
        rt = settings.runtime
        self.discovery = await connect_discovery(self.plugins.registry, rt.discovery, settings)
        self.events = await connect_events(self.plugins.registry, rt.events, settings)
        events = self.events
        topic = kv_events_topic(self.card.served_name)

        def publish(event: KvEvent) -> None:
            events.publish(topic, event)

        factory = self.plugins.registry.engines.get(settings.engine)
        self.engine = factory(
            EngineContext(
                settings,
                self.card,
                self.worker_id,
                role=self.role,
                publish_kv_event=publish,
                registry=self.plugins.registry,
            )
        )
        await self.engine.start()
        tracing.instrument_kv_transfers(self.engine)  # tracing on: kv_transfer spans
        ws = settings.worker
        self.server = RequestPlaneServer(
            self.engine, host=ws.host, port=ws.port, worker_id=self.worker_id
        )
        await self.server.start()
        status_address = ""
        if ws.status_port is not None:
            self.status = StatusServer(
                {"/health": self._health, "/live": self._live, "/metrics": self._metrics},
                host=ws.host,
                port=ws.status_port,
            )
            await self.status.start()
            status_address = self._advertised(self.status.address)
        self.record = WorkerRecord(
            worker_id=self.worker_id,
            model=self.card.served_name,
            model_path=str(self.card.path),
            address=self._advertised(self.server.address),
            role=self.role,
            block_size=self.engine.block_size,
            kv_blocks_total=self.engine.load().kv_blocks_total,
            max_model_len=self.card.max_model_len,
            status_address=status_address,
        )
        self._load_task = asyncio.get_running_loop().create_task(self._report_load())
        await self.discovery.register(self.record)
        log.info("worker %s registered at %s", self.worker_id, self.record.address)

    def _advertised(self, address: str) -> str:
        host = self.settings.worker.advertise_host
        if not host:
            return address
        scheme, _, rest = address.partition("://")
        return f"{scheme}://{host}:{rest.rpartition(':')[2]}"

    async def drain_and_stop(self) -> None:
        """Drain (see the module docstring), deregister and release everything."""
        timeout = self.settings.runtime.drain_timeout_s
        if self.server is not None and self.discovery is not None and self.record is not None:
            self.server.begin_drain()
            draining = msgspec.structs.replace(self.record, draining=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.discovery.register(draining), 5.0)
            if self.server.inflight:
                log.info(
                    "worker %s draining %d requests (up to %.0f s)",
                    self.worker_id,
                    self.server.inflight,
                    timeout,
                )
            if not await self.server.wait_idle(timeout):
                log.warning(
                    "worker %s: %d requests still running after %.0f s; handing them back",
                    self.worker_id,
                    self.server.inflight,
                    timeout,
                )
        await self.aclose()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.stopping = True
        if self.engine is not None:
            await self.engine.aclose()
        if self.server is not None:
            await self.server.aclose()
        if self._load_task is not None:
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
        if self.discovery is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.discovery.deregister(self.worker_id), 5.0)
            await self.discovery.aclose()
        if self.status is not None:
            await self.status.aclose()
        if self.events is not None:
            await self.events.aclose()

    # -- load reports ---------------------------------------------------------------------

    async def _report_load(self) -> None:
        assert self.engine is not None and self.events is not None
        topic = load_topic(self.card.served_name)
        await report_load_of(self.engine, self.worker_id, self.events, topic)

    # -- status endpoint ------------------------------------------------------------------

    async def _health(self) -> tuple[int, str, bytes]:
        assert self.engine is not None and self.server is not None
        try:
            await self.engine.check_health()
        except Exception as exc:
            return json_body(503, {"status": "unhealthy", "error": str(exc)})
        state = "draining" if self.server.draining else "healthy"
        return json_body(
            200 if not self.server.draining else 503,
            {"status": state, "worker_id": self.worker_id, "model": self.card.served_name},
        )

    async def _live(self) -> tuple[int, str, bytes]:
        return json_body(200, {"status": "live"})

    async def _metrics(self) -> tuple[int, str, bytes]:
        assert self.engine is not None and self.server is not None
        registry = CollectorRegistry()
        labels = {"worker_id": self.worker_id, "model": self.card.served_name}
        load = self.engine.load()
        agent = getattr(self.engine, "kv_transfer_agent", None)
        if agent is not None:
            registry.register(_TransferCollector(agent, labels))
        tiers = getattr(self.engine, "kv_tiers", None)
        if tiers is not None:
            registry.register(_TierCollector(tiers, labels))
        for name, doc, value in (
            ("active_requests", "Requests running in the engine", load.active_requests),
            ("waiting_requests", "Requests waiting for a batch slot", load.waiting_requests),
            ("kv_blocks_used", "KV blocks referenced by live requests", load.kv_blocks_used),
            ("kv_blocks_total", "KV capacity in blocks", load.kv_blocks_total),
            ("streams", "Request-plane streams open", self.server.inflight),
            ("requests_served", "Request-plane streams finished", self.server.requests_served),
            ("draining", "1 while the worker drains", int(self.server.draining)),
        ):
            gauge = Gauge(f"dynamo_gateway_worker_{name}", doc, list(labels), registry=registry)
            gauge.labels(**labels).set(value)
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)


class _TransferCollector(Collector):
    """A worker's KV-transfer counters, read at scrape time."""

    def __init__(self, agent: KvTransferAgent, labels: dict[str, str]) -> None:
        self._agent = agent
        self._labels = labels

    def collect(self) -> Iterable[Metric]:
        stats = self._agent.stats
        names = list(self._labels)
        values = list(self._labels.values())
        moved = CounterMetricFamily(
            "dynamo_gateway_worker_kv_transfer_bytes",
            "KV bytes pulled from prefill workers, by transport",
            labels=[*names, "transport"],
        )
        pulls = CounterMetricFamily(
            "dynamo_gateway_worker_kv_transfers",
            "KV transfers pulled, by transport",
            labels=[*names, "transport"],
        )
        for transport, nbytes in stats.bytes_by_transport.items():
            moved.add_metric([*values, transport], nbytes)
            pulls.add_metric([*values, transport], stats.pulls_by_transport[transport])
        failed = CounterMetricFamily(
            "dynamo_gateway_worker_kv_transfer_failures",
            "KV pulls that failed or were refused (the request prefilled here instead)",
            labels=[*names, "kind"],
        )
        failed.add_metric([*values, "failed"], stats.failed_pulls)
        failed.add_metric([*values, "refused"], stats.refused_pulls)
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(
            [*(str(b) for b in LATENCY_BUCKETS), "+Inf"], stats.latency_buckets, strict=True
        ):
            total += count
            buckets.append((bound, total))
        latency = HistogramMetricFamily(
            "dynamo_gateway_worker_kv_transfer_seconds",
            "Time to pull one request's KV blocks and release them at the source",
            labels=names,
        )
        latency.add_metric(values, buckets, stats.latency_sum_s)
        pinned = GaugeMetricFamily(
            "dynamo_gateway_worker_kv_pinned_blocks",
            "KV blocks held for decode workers to pull",
            labels=names,
        )
        pinned.add_metric(values, self._agent.pinned_blocks)
        exports = CounterMetricFamily(
            "dynamo_gateway_worker_kv_exports",
            "Prefills whose KV was kept for a decode worker, by how they ended",
            labels=[*names, "outcome"],
        )
        for why, n in stats.released.items():
            exports.add_metric([*values, why], n)
        return [moved, pulls, failed, latency, pinned, exports]


class _TierCollector(Collector):
    """A worker's KV tier counters (`dynamo_gateway.kvbm`), read at scrape time."""

    def __init__(self, tiers: TieredCache, labels: dict[str, str]) -> None:
        self._tiers = tiers
        self._labels = labels

    def collect(self) -> Iterable[Metric]:
        names = [*self._labels, "tier"]
        prefix = "dynamo_gateway_worker_kv_tier"
        blocks = CounterMetricFamily(
            f"{prefix}_blocks",
            "KV blocks moved, by tier and direction",
            labels=[*names, "direction"],
        )
        moved = CounterMetricFamily(
            f"{prefix}_bytes", "KV bytes moved, by tier and direction", labels=[*names, "direction"]
        )
        seconds = CounterMetricFamily(
            f"{prefix}_io_seconds", "Time spent in tier reads and writes", labels=[*names, "op"]
        )
        ops = CounterMetricFamily(
            f"{prefix}_io_ops", "Tier reads and writes", labels=[*names, "op"]
        )
        looked = CounterMetricFamily(
            f"{prefix}_lookup_blocks",
            "Prefix blocks looked for, by outcome",
            labels=[*names, "outcome"],
        )
        problems = CounterMetricFamily(
            f"{prefix}_problems",
            "Blocks rejected (checksum, truncation, stale), failed operations, dropped writes",
            labels=[*names, "kind"],
        )
        held = GaugeMetricFamily(f"{prefix}_held_blocks", "Blocks a tier holds", labels=names)
        capacity = GaugeMetricFamily(
            f"{prefix}_capacity_blocks",
            "Blocks a tier holds at most (0: store-managed)",
            labels=names,
        )
        hit_rate = GaugeMetricFamily(
            f"{prefix}_hit_rate", "Share of looked-for blocks a tier held", labels=names
        )
        values = list(self._labels.values())
        for tier in self._tiers.tiers:
            s = self._tiers.stats[tier.name]
            v = [*values, tier.name]
            blocks.add_metric([*v, "offloaded"], s.offloaded_blocks)
            blocks.add_metric([*v, "onboarded"], s.onboarded_blocks)
            moved.add_metric([*v, "offloaded"], s.offloaded_bytes)
            moved.add_metric([*v, "onboarded"], s.onboarded_bytes)
            seconds.add_metric([*v, "read"], s.read_seconds)
            seconds.add_metric([*v, "write"], s.write_seconds)
            ops.add_metric([*v, "read"], s.reads)
            ops.add_metric([*v, "write"], s.writes)
            looked.add_metric([*v, "hit"], s.hit_blocks)
            looked.add_metric([*v, "miss"], s.miss_blocks)
            problems.add_metric([*v, "rejected"], s.rejected_blocks)
            problems.add_metric([*v, "error"], s.errors)
            problems.add_metric([*v, "dropped_write"], s.dropped_writes)
            held.add_metric(v, len(tier) if not tier.shared else 0)
            capacity.add_metric(v, tier.capacity_blocks or 0)
            hit_rate.add_metric(v, s.hit_rate)
        return [blocks, moved, seconds, ops, looked, problems, held, capacity, hit_rate]


async def run_worker(
    settings: Settings,
    plugins: Plugins,
    *,
    ready: Callable[[Worker], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT (or `stop`), then drain and exit."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    worker = Worker(settings, plugins)
    try:
        await worker.start()
    except BaseException:
        await worker.aclose()
        raise
    if ready is not None:
        ready(worker)
    try:
        await stop.wait()
    finally:
        log.info("worker %s (pid %d) stopping", worker.worker_id, os.getpid())
        await worker.drain_and_stop()
