"""Worker pools: the frontend's view of every model and the workers serving it.

`ModelManager` follows discovery: the first worker of a model creates its
`ModelPool` (tokenizer, chat template, router), the last one leaving removes it.
`ModelPool.stream()` routes one engine request and keeps the router's and the
worker view's in-flight bookkeeping right however the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Protocol

from dynamo_gateway.engines.base import Engine
from dynamo_gateway.errors import ConfigError, ModelNotFoundError, UnavailableError
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.preprocess import ChatTemplate, Tokenizer
from dynamo_gateway.protocol.engine import EngineOutput, EngineRequest, LoadMetrics
from dynamo_gateway.protocol.kv_events import KvEvent
from dynamo_gateway.router.base import (
    NoWorkerError,
    Router,
    RouterContext,
    RouteRequest,
    WorkerView,
)
from dynamo_gateway.runtime.discovery import ChangeKind, Discovery, DiscoveryEvent, WorkerRecord
from dynamo_gateway.runtime.events import EventPlane, kv_events_topic

if TYPE_CHECKING:
    from dynamo_gateway.registry import Registry
    from dynamo_gateway.settings import Settings

log = logging.getLogger(__name__)


class WorkerHandle(Protocol):
    """A worker the frontend can send requests to (in-process or remote)."""

    record: WorkerRecord
    view: WorkerView

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def refresh_load(self) -> None:
        """Bring `view.load` up to date (cheap: a local call or the last report)."""

    async def check_health(self) -> None: ...


class LocalWorker:
    """A worker whose engine runs in this process."""

    def __init__(self, record: WorkerRecord, engine: Engine) -> None:
        self.record = record
        self.engine = engine
        self.view = WorkerView(
            record.worker_id,
            role=record.role,
            block_size=record.block_size,
            load=LoadMetrics(kv_blocks_total=record.kv_blocks_total),
        )

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        return self.engine.generate(request)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def refresh_load(self) -> None:
        self.view.load = self.engine.load()

    async def check_health(self) -> None:
        await self.engine.check_health()


# Resolves a discovered record's address to a handle; raises ConfigError if it cannot.
WorkerResolver = Callable[[WorkerRecord], WorkerHandle]


class InprocResolver:
    """Resolves ``inproc://<worker_id>`` addresses to engines started in this process."""

    def __init__(self) -> None:
        self.engines: dict[str, Engine] = {}

    def add(self, worker_id: str, engine: Engine) -> str:
        self.engines[worker_id] = engine
        return f"inproc://{worker_id}"

    def __call__(self, record: WorkerRecord) -> WorkerHandle:
        scheme, _, key = record.address.partition("://")
        if scheme != "inproc" or key not in self.engines:
            raise ConfigError(f"cannot reach worker {record.worker_id} at {record.address}")
        return LocalWorker(record, self.engines[key])


class Routed:
    """A request in flight on one worker, with the bookkeeping to undo when it ends.

    The caller iterates `outputs` (the engine's own stream: no wrapper on the
    per-token path), calls `first_token()` once, and `close()` however it exits.
    """

    __slots__ = ("_closed", "_router", "outputs", "request_id", "worker")

    def __init__(
        self,
        router: Router,
        worker: WorkerHandle,
        request_id: str,
        outputs: AsyncIterator[EngineOutput],
    ) -> None:
        self._router = router
        self.worker = worker
        self.request_id = request_id
        self.outputs = outputs
        self._closed = False

    def first_token(self) -> None:
        self._router.on_first_token(self.request_id)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.worker.view.inflight -= 1
        self._router.on_finished(self.request_id)
        # Close the engine stream now, not whenever it is garbage-collected, so an
        # abandoned request frees its KV blocks right away.
        aclose = getattr(self.outputs, "aclose", None)
        if aclose is not None:
            await aclose()


class ModelPool:
    """One model: its preprocessing and the workers that serve it."""

    def __init__(
        self,
        card: ModelCard,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate | None,
        router: Router,
    ) -> None:
        self.card = card
        self.name = card.served_name
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.router = router
        self.workers: dict[str, WorkerHandle] = {}
        self._views: list[WorkerView] = []
        self._router_uses_load = bool(getattr(router, "uses_load", True))
        self.kv_events_task: asyncio.Task[None] | None = None

    def add(self, worker: WorkerHandle) -> None:
        self.workers[worker.record.worker_id] = worker
        self._views = [w.view for w in self.workers.values()]

    def remove(self, worker_id: str) -> None:
        if self.workers.pop(worker_id, None) is not None:
            self._views = [w.view for w in self.workers.values()]
            self.router.remove_worker(worker_id)

    def select(self, request: RouteRequest) -> WorkerHandle:
        if not self.workers:
            raise UnavailableError(f"no live worker serves model {self.name!r}", retry_after=1)
        if self._router_uses_load:
            for worker in self.workers.values():
                worker.refresh_load()
        try:
            view = self.router.select(request, self._views)
        except NoWorkerError:
            raise UnavailableError(f"no live worker serves model {self.name!r}") from None
        return self.workers[view.worker_id]

    def route(self, route: RouteRequest, request: EngineRequest) -> Routed:
        """Pick a worker and start `request` there; the caller must `close()` it."""
        worker = self.select(route)
        worker.view.inflight += 1
        self.router.on_routed(route, worker.view)
        return Routed(self.router, worker, request.request_id, worker.generate(request))

    async def stream(
        self, route: RouteRequest, request: EngineRequest
    ) -> AsyncGenerator[EngineOutput, None]:
        """`route()` as one generator, for callers that don't need the hot path."""
        routed = self.route(route, request)
        try:
            first = True
            async for out in routed.outputs:
                if first:
                    first = False
                    routed.first_token()
                yield out
        finally:
            await routed.close()

    def live_workers(self) -> int:
        return len(self.workers)


class ModelManager:
    """All models this frontend serves, kept in step with discovery."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        resolver: WorkerResolver,
        events: EventPlane | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.resolver = resolver
        self.events = events
        self.pools: dict[str, ModelPool] = {}
        self.changed = asyncio.Event()

    def get(self, model: str) -> ModelPool:
        pool = self.pools.get(model)
        if pool is None:
            raise ModelNotFoundError(
                f"The model `{model}` does not exist.", param="model", code="model_not_found"
            )
        return pool

    async def follow(self, discovery: Discovery) -> None:
        """Apply discovery changes until the watch ends (run as a task)."""
        async for event in discovery.watch():
            try:
                self.apply(event)
            except ConfigError as exc:
                log.error("ignoring worker %s: %s", event.record.worker_id, exc)

    def apply(self, event: DiscoveryEvent) -> None:
        record = event.record
        if event.kind is ChangeKind.PUT:
            pool = self.pools.get(record.model) or self._new_pool(record)
            pool.add(self.resolver(record))
            log.info("worker %s joined model %s", record.worker_id, record.model)
        else:
            leaving = self.pools.get(record.model)
            if leaving is not None:
                leaving.remove(record.worker_id)
                log.info("worker %s left model %s", record.worker_id, record.model)
                if not leaving.workers:
                    self._drop_pool(leaving)
        self.changed.set()
        self.changed.clear()

    def _new_pool(self, record: WorkerRecord) -> ModelPool:
        card = ModelCard.load(
            record.model_path,
            served_name=record.model,
            max_model_len=record.max_model_len or self.settings.max_model_len,
        )
        tokenizer = Tokenizer.from_dir(card.path)
        template = ChatTemplate.from_dir(card.path)
        router_factory = self.registry.routers.get(self.settings.router)
        router = router_factory(RouterContext(self.settings, record.model, record.block_size))
        pool = ModelPool(card, tokenizer, template, router)
        if self.events is not None:
            pool.kv_events_task = asyncio.get_running_loop().create_task(
                self._feed_kv_events(pool), name=f"kv-events-{record.model}"
            )
        self.pools[record.model] = pool
        return pool

    def _drop_pool(self, pool: ModelPool) -> None:
        self.pools.pop(pool.name, None)
        if pool.kv_events_task is not None:
            pool.kv_events_task.cancel()

    async def _feed_kv_events(self, pool: ModelPool) -> None:
        assert self.events is not None
        async for message in self.events.subscribe(kv_events_topic(pool.name), KvEvent):
            pool.router.on_kv_event(message)

    async def aclose(self) -> None:
        for pool in list(self.pools.values()):
            self._drop_pool(pool)
            if pool.kv_events_task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await pool.kv_events_task
