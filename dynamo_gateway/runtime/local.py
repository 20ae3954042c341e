"""Engine workers inside this process: the embedded `serve`, and replays.

A `LocalFleet` starts engines, registers them in the process's discovery (the
frontend's `ModelManager` follows it, as it follows etcd in a cluster) and takes
them away again: `stop()` at once, `drain()` the way a worker process drains on
SIGTERM (no new requests, the running ones finish, then it leaves). With
``report_load`` a worker also publishes `LoadReport`s on the event plane, as a
worker process does, for consumers such as the planner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from dynamo_gateway.engines.base import Engine, EngineContext
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.protocol.engine import WorkerRole
from dynamo_gateway.protocol.kv_events import KvEvent
from dynamo_gateway.runtime.discovery import Discovery, WorkerRecord
from dynamo_gateway.runtime.events import EventPlane, kv_events_topic, load_topic, report_load
from dynamo_gateway.runtime.pool import InprocResolver
from dynamo_gateway.telemetry import tracing

if TYPE_CHECKING:
    from dynamo_gateway.registry import Registry
    from dynamo_gateway.settings import Settings

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05  # how often a draining worker is checked for being idle


@dataclass
class LocalFleet:
    """Engines started here, and how to add, drain and stop them."""

    settings: Settings
    registry: Registry
    discovery: Discovery
    events: EventPlane
    resolver: InprocResolver
    cards: dict[str, ModelCard] = field(default_factory=dict)  # served name -> card
    engines: dict[str, Engine] = field(default_factory=dict)
    records: dict[str, WorkerRecord] = field(default_factory=dict)
    _reporters: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    async def start(
        self,
        card: ModelCard,
        worker_id: str,
        *,
        role: WorkerRole = WorkerRole.AGGREGATED,
        report_load: bool = False,
    ) -> Engine:
        """Build, start and register one engine of `settings.engine` for `card`."""
        events = self.events
        topic = kv_events_topic(card.served_name)

        def publish(event: KvEvent) -> None:
            events.publish(topic, event)

        engine = self.registry.engines.get(self.settings.engine)(
            EngineContext(
                self.settings, card, worker_id, role=role, publish_kv_event=publish,
                registry=self.registry,
            )
        )  # fmt: skip
        await engine.start()
        tracing.instrument_kv_transfers(engine)  # tracing on: kv_transfer spans
        self.engines[worker_id] = engine
        record = WorkerRecord(
            worker_id=worker_id,
            model=card.served_name,
            model_path=str(card.path),
            address=self.resolver.add(worker_id, engine),
            role=role,
            block_size=engine.block_size,
            kv_blocks_total=engine.load().kv_blocks_total,
            max_model_len=card.max_model_len,
        )
        self.records[worker_id] = record
        if report_load:
            self._reporters[worker_id] = asyncio.get_running_loop().create_task(
                report_load_of(engine, worker_id, events, load_topic(card.served_name))
            )
        await self.discovery.register(record)
        log.info("started worker %s (%s)", worker_id, self.settings.engine)
        return engine

    async def drain(self, worker_id: str, timeout_s: float) -> bool:
        """Route nothing new to the worker, wait up to `timeout_s` for its requests to
        finish, then stop it. False when requests were still running at the timeout
        (they are aborted: in-process workers have nowhere to hand them)."""
        record, engine = self.records.get(worker_id), self.engines.get(worker_id)
        if record is None or engine is None:
            return True
        await self.discovery.register(msgspec.structs.replace(record, draining=True))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        idle = False
        while not (idle := _idle(engine)) and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if not idle:
            log.warning("worker %s still busy after a %.0f s drain: stopped", worker_id, timeout_s)
        await self.stop(worker_id)
        return idle

    async def stop(self, worker_id: str) -> None:
        """Deregister and close one worker now."""
        self.records.pop(worker_id, None)
        engine = self.engines.pop(worker_id, None)
        reporter = self._reporters.pop(worker_id, None)
        await self.discovery.deregister(worker_id)
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        if engine is not None:
            await engine.aclose()

    async def stop_all(self) -> None:
        for worker_id in list(self.engines):
            await self.stop(worker_id)


def _idle(engine: Engine) -> bool:
    load = engine.load()
    return load.active_requests + load.waiting_requests == 0


async def report_load_of(engine: Engine, worker_id: str, events: EventPlane, topic: str) -> None:
    """`report_load` for an engine: its load and the id of its last KV event."""
    await report_load(
        events, topic, worker_id,
        lambda: (engine.load(), getattr(engine, "last_kv_event_id", None)),
    )  # fmt: skip


def local_worker_id(card: ModelCard, engine: str, role: WorkerRole, index: int) -> str:
    suffix = f"{role.value}-{index}" if role is not WorkerRole.AGGREGATED else str(index)
    return f"{card.served_name}-{engine}-{suffix}"


async def start_local_workers(
    settings: Settings,
    registry: Registry,
    card: ModelCard,
    *,
    discovery: Discovery,
    events: EventPlane,
    resolver: InprocResolver,
    count: int,
    role: WorkerRole = WorkerRole.AGGREGATED,
) -> LocalFleet:
    """A fleet of `count` engines of `settings.engine` for `card`, started and registered."""
    fleet = LocalFleet(settings, registry, discovery, events, resolver)
    try:
        for i in range(count):
            await fleet.start(card, local_worker_id(card, settings.engine, role, i), role=role)
    except BaseException:
        await fleet.stop_all()
        raise
    return fleet
