"""Starting engine workers inside this process (the embedded `serve`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dynamo_gateway.engines.base import Engine, EngineContext
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.protocol.engine import WorkerRole
from dynamo_gateway.protocol.kv_events import KvEvent
from dynamo_gateway.runtime.discovery import Discovery, WorkerRecord
from dynamo_gateway.runtime.events import EventPlane, kv_events_topic
from dynamo_gateway.runtime.pool import InprocResolver

if TYPE_CHECKING:
    from dynamo_gateway.registry import Registry
    from dynamo_gateway.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class LocalWorkers:
    """Engines started here, and how to stop them."""

    discovery: Discovery
    engines: dict[str, Engine] = field(default_factory=dict)

    async def stop(self) -> None:
        for worker_id, engine in list(self.engines.items()):
            await self.discovery.deregister(worker_id)
            await engine.aclose()
        self.engines.clear()


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
) -> LocalWorkers:
    """Build, start and register `count` engines of `settings.engine` for `card`."""
    factory = registry.engines.get(settings.engine)
    topic = kv_events_topic(card.served_name)
    workers = LocalWorkers(discovery)

    def publish(event: KvEvent) -> None:
        events.publish(topic, event)

    try:
        for i in range(count):
            suffix = f"{role.value}-{i}" if role is not WorkerRole.AGGREGATED else str(i)
            worker_id = f"{card.served_name}-{settings.engine}-{suffix}"
            engine = factory(
                EngineContext(
                    settings,
                    card,
                    worker_id,
                    role=role,
                    publish_kv_event=publish,
                    registry=registry,
                )
            )
            await engine.start()
            workers.engines[worker_id] = engine
            load = engine.load()
            record = WorkerRecord(
                worker_id=worker_id,
                model=card.served_name,
                model_path=str(card.path),
                address=resolver.add(worker_id, engine),
                role=role,
                block_size=engine.block_size,
                kv_blocks_total=load.kv_blocks_total,
                max_model_len=card.max_model_len,
            )
            await discovery.register(record)
            log.info("started worker %s (%s)", worker_id, settings.engine)
    except BaseException:
        await workers.stop()
        raise
    return workers
