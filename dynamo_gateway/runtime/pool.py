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
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import msgspec

from dynamo_gateway.disagg.flow import DisaggRouted
from dynamo_gateway.disagg.policy import Decision, LocalReason, PrefillLoad, decide
from dynamo_gateway.engines.base import Engine
from dynamo_gateway.errors import (
    ConfigError,
    EngineError,
    ModelNotFoundError,
    UnavailableError,
    WorkerLostError,
)
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.preprocess import ChatTemplate, Tokenizer
from dynamo_gateway.protocol.engine import EngineOutput, EngineRequest, LoadMetrics, WorkerRole
from dynamo_gateway.protocol.kv_events import KvEvent, KvSnapshot
from dynamo_gateway.router.base import (
    NoWorkerError,
    Router,
    RouterContext,
    RouteRequest,
    WorkerView,
)
from dynamo_gateway.runtime.discovery import ChangeKind, Discovery, DiscoveryEvent, WorkerRecord
from dynamo_gateway.runtime.events import (
    PLANNER_DECISIONS_TOPIC,
    EventPlane,
    LoadReport,
    PlannerDecision,
    kv_events_topic,
    load_topic,
)
from dynamo_gateway.runtime.kv_sync import KvEventSync, engine_kv_snapshot
from dynamo_gateway.telemetry import tracing

if TYPE_CHECKING:
    from dynamo_gateway.registry import Registry
    from dynamo_gateway.settings import Settings

from dynamo_gateway.settings import DisaggSettings

log = logging.getLogger(__name__)

PLANNER_DECISIONS_KEPT = 20  # the planner's recent decisions a frontend keeps for /status


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
        # Tracing on: the call's span, whose context the request carries (else as is).
        return tracing.worker_call(self.record.worker_id, request, self.engine.generate)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def refresh_load(self) -> None:
        self.view.load = self.engine.load()

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def kv_snapshot(self) -> KvSnapshot:
        snapshot = engine_kv_snapshot(self.engine)
        if snapshot is None:
            raise EngineError(f"engine of worker {self.record.worker_id} takes no KV snapshots")
        return snapshot


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


class RouterSync(msgspec.Struct, frozen=True, kw_only=True):
    """One routing lifecycle step of a frontend, for the other frontends' routers.

    Router replica sync: with several frontends over the same workers, each
    router's own bookkeeping (load in flight, approximate-mode cache guesses,
    session affinity) would see only its own requests. Every frontend publishes
    these on the event plane and replays the others' into its router, with the
    request id prefixed by the publishing frontend's id.
    """

    ROUTED: ClassVar[str] = "routed"
    FIRST_TOKEN: ClassVar[str] = "first_token"
    FINISHED: ClassVar[str] = "finished"

    frontend: str
    kind: str
    request_id: str
    worker_id: str = ""
    token_ids: list[int] = []
    session_id: str | None = None


def router_sync_topic(model: str) -> str:
    return f"router.{model}"


class ReplicaPublisher:
    """Publishes one pool's `RouterSync` steps on the event plane."""

    def __init__(self, events: EventPlane, model: str, frontend_id: str) -> None:
        self._events = events
        self._topic = router_sync_topic(model)
        self.frontend_id = frontend_id

    def publish_routed(self, route: RouteRequest, worker_id: str) -> None:
        self._events.publish(
            self._topic,
            RouterSync(
                frontend=self.frontend_id,
                kind=RouterSync.ROUTED,
                request_id=route.request_id,
                worker_id=worker_id,
                token_ids=list(route.token_ids),
                session_id=route.session_id,
            ),
        )

    def publish(self, kind: str, request_id: str) -> None:
        self._events.publish(
            self._topic, RouterSync(frontend=self.frontend_id, kind=kind, request_id=request_id)
        )


class Routed:
    """A request in flight, with the bookkeeping to undo when it ends.

    The caller iterates `outputs`, calls `first_token()` once, and `close()`
    however it exits. Without migration `outputs` is the worker's own stream (no
    wrapper on the per-token path). With it, `outputs` is this object: when the
    worker is lost mid-stream (`WorkerLostError`) it resends the prompt plus the
    tokens generated so far to another worker, up to `migrations_left` times, and
    the caller sees one uninterrupted stream.
    """

    __slots__ = (
        "_closed",
        "_generated",
        "_pool",
        "_request",
        "_route",
        "_tried",
        "migrations",
        "migrations_left",
        "outputs",
        "request_id",
        "started",
        "stream",
        "worker",
    )

    def __init__(
        self,
        pool: ModelPool,
        route: RouteRequest,
        request: EngineRequest,
        worker: WorkerHandle,
        migrations_left: int = 0,
    ) -> None:
        self._pool = pool
        self._route = route
        self._request = request
        self.worker = worker
        self.request_id = request.request_id
        self.stream: AsyncIterator[EngineOutput] = worker.generate(request)
        self.migrations_left = migrations_left
        self.migrations = 0
        self._generated: list[int] = []
        self._tried: set[str] = {worker.record.worker_id}
        self._closed = False
        self.started = False  # set by DisaggRouted once it reads this stream
        self.outputs: AsyncIterator[EngineOutput] = self if migrations_left > 0 else self.stream

    def first_token(self) -> None:
        self._pool.first_token(self.request_id)

    @property
    def request_params(self) -> dict[str, Any] | None:
        """The request's `kv_transfer_params` (a decode leg's handoff), if any."""
        return self._request.kv_transfer_params

    def __aiter__(self) -> Routed:
        return self

    async def __anext__(self) -> EngineOutput:
        while True:
            try:
                out = await self.stream.__anext__()
            except (WorkerLostError, OSError) as exc:  # OSError: a socket error got through
                if self.migrations_left <= 0:
                    raise
                await self._migrate(exc)
                continue
            if out.token_ids:
                self._generated.extend(out.token_ids)
            if self.migrations and out.cached_tokens is not None:
                out.cached_tokens = None  # the client's first chunk already reported them
            return out

    async def _migrate(self, exc: WorkerLostError | OSError) -> None:
        pool = self._pool
        lost = self.worker
        await self._release()
        worker = await pool.select_or_wait(self._route, self._tried, pool.migration_wait_s)
        if worker is None:
            raise exc
        self.migrations_left -= 1
        self.migrations += 1
        pool.migrations += 1
        request = self._request
        resumed = [*request.resumed_token_ids, *self._generated]
        log.warning(
            "request %s: worker %s lost after %d tokens (%s); resuming on %s",
            self.request_id,
            lost.record.worker_id,
            len(resumed),
            exc,
            worker.record.worker_id,
        )
        self._tried.add(worker.record.worker_id)
        self.worker = worker
        worker.view.inflight += 1
        pool.routed(self._route, worker.view)
        self._closed = False
        # A handoff from a prefill worker was for the lost worker: this one prefills.
        self.stream = worker.generate(
            msgspec.structs.replace(request, resumed_token_ids=resumed, kv_transfer_params=None)
        )

    async def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.worker.view.inflight -= 1
        self._pool.finished(self.request_id)
        # Close the engine stream now, not whenever it is garbage-collected, so an
        # abandoned request frees its KV blocks right away.
        aclose = getattr(self.stream, "aclose", None)
        if aclose is not None:
            await aclose()

    async def close(self) -> None:
        await self._release()


class ModelPool:
    """One model: its preprocessing and the workers that serve it.

    `workers` are the ones new requests may go to; a draining worker leaves that
    set at once but keeps its handle (in `draining`) until it deregisters, so its
    in-flight requests finish.
    """

    def __init__(
        self,
        card: ModelCard,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate | None,
        router: Router,
        *,
        migration_limit: int = 0,
        migration_wait_s: float = 0.0,
        prefill_router: Router | None = None,
        disagg: DisaggSettings | None = None,
    ) -> None:
        self.card = card
        self.name = card.served_name
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.router = router
        self.migration_limit = migration_limit
        self.migration_wait_s = migration_wait_s
        self._joined = asyncio.Event()  # pulsed when a worker becomes routable
        self.migrations = 0  # requests moved to another worker so far
        self.workers: dict[str, WorkerHandle] = {}
        self.draining: dict[str, WorkerHandle] = {}
        self._views: list[WorkerView] = []
        self._router_uses_load = bool(getattr(router, "uses_load", True))
        self.tasks: list[asyncio.Task[None]] = []  # event-plane feeds of this model
        self.kv_sync: KvEventSync | None = None
        self.replica: ReplicaPublisher | None = None  # set with router replica sync
        # Disaggregation: prefill-only workers have their own set and router.
        self.prefill_router = prefill_router or router
        self.disagg = disagg or DisaggSettings()
        self.prefill_workers: dict[str, WorkerHandle] = {}
        self._prefill_views: list[WorkerView] = []
        self._has_disagg = False  # prefill or decode workers: `route()` decides per request
        self.prefill_load = PrefillLoad()
        self.remote_prefills = 0
        self.local_prefills: dict[str, int] = {}

    def add(self, worker: WorkerHandle) -> None:
        wid = worker.record.worker_id
        if worker.record.role is WorkerRole.PREFILL:
            self.prefill_workers[wid] = worker
            self._refresh()
            return
        self.workers[wid] = worker
        self._refresh()
        self._joined.set()
        self._joined.clear()

    def get_worker(self, worker_id: str) -> WorkerHandle | None:
        return (
            self.workers.get(worker_id)
            or self.prefill_workers.get(worker_id)
            or self.draining.get(worker_id)
        )

    def router_of(self, worker_id: str) -> Router:
        """The router that places requests on this worker (prefill or decode)."""
        return self.prefill_router if worker_id in self.prefill_workers else self.router

    def on_kv_event(self, event: KvEvent) -> None:
        self.router_of(event.worker_id).on_kv_event(event)

    def drain(self, worker_id: str) -> None:
        """Route nothing new to the worker; its in-flight requests go on."""
        prefill = self.prefill_workers.pop(worker_id, None)
        if prefill is not None:
            self.draining[worker_id] = prefill
            self._refresh()
            return
        worker = self.workers.pop(worker_id, None)
        if worker is not None:
            # The router keeps its state of the worker (its requests still run, its
            # cache is real) until the worker leaves; it just is not eligible.
            self.draining[worker_id] = worker
            self._refresh()

    def remove(self, worker_id: str) -> WorkerHandle | None:
        """Forget the worker; returns its handle (the caller closes it)."""
        prefill = self.prefill_workers.pop(worker_id, None)
        if prefill is not None:
            self._refresh()
            self.prefill_router.remove_worker(worker_id)
            self.prefill_load.remove_worker(worker_id)
            return prefill
        worker = self.workers.pop(worker_id, None)
        if worker is not None:
            self._refresh()
            self.router.remove_worker(worker_id)
            return worker
        worker = self.draining.pop(worker_id, None)
        if worker is not None and worker.record.role is WorkerRole.PREFILL:
            self.prefill_router.remove_worker(worker_id)
            self.prefill_load.remove_worker(worker_id)
        return worker

    @property
    def empty(self) -> bool:
        return not self.workers and not self.draining and not self.prefill_workers

    def select(self, request: RouteRequest, exclude: set[str] | None = None) -> WorkerHandle:
        views = self._views
        if exclude:
            views = [v for v in views if v.worker_id not in exclude]
        if not views:
            raise UnavailableError(f"no live worker serves model {self.name!r}", retry_after=1)
        if self._router_uses_load:
            for view in views:
                self.workers[view.worker_id].refresh_load()
        try:
            view = self.router.select(request, views)
        except NoWorkerError:
            raise UnavailableError(f"no live worker serves model {self.name!r}") from None
        return self.workers[view.worker_id]

    # -- router lifecycle, mirrored to other frontends with replica sync -------------------

    def routed(self, route: RouteRequest, view: WorkerView) -> None:
        self.router.on_routed(route, view)
        if self.replica is not None:
            self.replica.publish_routed(route, view.worker_id)

    def first_token(self, request_id: str) -> None:
        self.router.on_first_token(request_id)
        if self.replica is not None:
            self.replica.publish(RouterSync.FIRST_TOKEN, request_id)

    def finished(self, request_id: str) -> None:
        self.router.on_finished(request_id)
        if self.replica is not None:
            self.replica.publish(RouterSync.FINISHED, request_id)

    def apply_sync(self, sync: RouterSync) -> None:
        """Replay another frontend's routing decision into this pool's router."""
        rid = f"{sync.frontend}/{sync.request_id}"
        if sync.kind == RouterSync.ROUTED:
            worker = self.workers.get(sync.worker_id)
            if worker is not None:
                self.router.on_routed(
                    RouteRequest(rid, sync.token_ids, sync.session_id), worker.view
                )
        elif sync.kind == RouterSync.FIRST_TOKEN:
            self.router.on_first_token(rid)
        else:
            self.router.on_finished(rid)

    async def select_or_wait(
        self, request: RouteRequest, exclude: set[str], timeout: float
    ) -> WorkerHandle | None:
        """A worker not in `exclude`, waiting up to `timeout` for one to join; or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                return self.select(request, exclude=exclude)
            except UnavailableError:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._joined.wait(), remaining)

    def route(self, route: RouteRequest, request: EngineRequest) -> Routed | DisaggRouted:
        """Pick a worker and start `request` there; the caller must `close()` it.

        With prefill workers the decode worker is picked first, then
        `disagg.policy.decide` says whether a prefill worker computes the prompt
        (a `DisaggRouted`) or the decode worker does (a `Routed`).
        """
        worker = self.select(route)
        decision = self._decide(route, request, worker) if self._has_disagg else None
        prefill: WorkerHandle | None = None
        if decision is not None and decision.remote:
            try:
                prefill = self._select_prefill(route)
            except UnavailableError:
                decision = Decision(False, LocalReason.NO_PREFILL_WORKERS)
        worker.view.inflight += 1
        self.routed(route, worker.view)
        if prefill is not None:
            self.remote_prefills += 1
            # What the prefill worker will compute: the prompt less its cached prefix.
            overlap = getattr(self.prefill_router, "overlap_blocks", None)
            cached = overlap(route, prefill.record.worker_id) if overlap is not None else 0
            tokens = max(len(route.token_ids) - cached * prefill.view.block_size, 1)
            return DisaggRouted(self, route, request, prefill, worker, tokens)
        if decision is not None and decision.reason is not None:
            self.count_local(decision.reason)
        return Routed(self, route, request, worker, self.migration_limit)

    # -- disaggregation -------------------------------------------------------------------

    def _refresh(self) -> None:
        """Rebuild what routing reads per request after the worker sets changed."""
        self._views = [w.view for w in self.workers.values()]
        self._prefill_views = [w.view for w in self.prefill_workers.values()]
        self._has_disagg = bool(self.prefill_workers) or any(
            w.record.role is WorkerRole.DECODE for w in self.workers.values()
        )

    def _decide(
        self, route: RouteRequest, request: EngineRequest, worker: WorkerHandle
    ) -> Decision:
        overlap = getattr(self.router, "overlap_blocks", None)
        cached = overlap(route, worker.record.worker_id) * worker.view.block_size if overlap else 0
        settings = self.disagg
        return decide(
            prompt_tokens=len(route.token_ids),
            cached_tokens=cached,
            new_tokens_wanted=request.sampling.max_tokens - len(request.resumed_token_ids),
            prefill_workers=len(self.prefill_workers),
            decode_role=worker.record.role is WorkerRole.DECODE,
            least_queued_prefill_tokens=self.prefill_load.least(list(self.prefill_workers)),
            min_prefill_tokens=settings.min_prefill_tokens,
            max_queued_prefill_tokens=settings.max_queued_prefill_tokens,
        )

    def _select_prefill(self, route: RouteRequest) -> WorkerHandle:
        views = self._prefill_views
        if not views:
            raise UnavailableError(f"no prefill worker serves model {self.name!r}")
        for view in views:
            self.prefill_workers[view.worker_id].refresh_load()
        try:
            view = self.prefill_router.select(route, views)
        except NoWorkerError:
            raise UnavailableError(f"no prefill worker serves model {self.name!r}") from None
        return self.prefill_workers[view.worker_id]

    def count_local(self, reason: str) -> None:
        self.local_prefills[reason] = self.local_prefills.get(reason, 0) + 1

    def prefill_started(self, route: RouteRequest, worker: WorkerHandle, tokens: int) -> None:
        worker.view.inflight += 1
        self.prefill_router.on_routed(route, worker.view)
        self.prefill_load.add(route.request_id, worker.record.worker_id, tokens)

    def prefill_ended(self, request_id: str, worker: WorkerHandle) -> None:
        worker.view.inflight -= 1
        self.prefill_router.on_first_token(request_id)
        self.prefill_router.on_finished(request_id)
        self.prefill_load.done(request_id)

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
        """Routable workers, prefill-only ones included."""
        return len(self.workers) + len(self.prefill_workers)


class ModelManager:
    """All models this frontend serves, kept in step with discovery.

    With an event plane it also follows each model's load reports (remote
    workers' `view.load`) and KV events (the router's view of every cache,
    re-synced from a worker's snapshot after a gap; see `kv_sync`), and, while
    `follow()` runs, keeps the planner's last decisions (`planner_decisions`).
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        resolver: WorkerResolver,
        events: EventPlane | None = None,
        *,
        migration_limit: int | None = None,
    ) -> None:
        self.settings = settings
        # Default: runtime.migration_limit. 0 keeps the engine's own stream on the hot path.
        self.migration_limit = (
            settings.runtime.migration_limit if migration_limit is None else migration_limit
        )
        self.registry = registry
        self.resolver = resolver
        self.events = events
        self.pools: dict[str, ModelPool] = {}
        self.changed = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()
        # Names this frontend in router replica sync messages.
        self.frontend_id = uuid.uuid4().hex[:12]
        self.planner_decisions: deque[PlannerDecision] = deque(maxlen=PLANNER_DECISIONS_KEPT)
        self._planner_feed: asyncio.Task[None] | None = None

    def get(self, model: str) -> ModelPool:
        pool = self.pools.get(model)
        if pool is None:
            raise ModelNotFoundError(
                f"The model `{model}` does not exist.", param="model", code="model_not_found"
            )
        return pool

    async def follow(self, discovery: Discovery) -> None:
        """Apply discovery changes until the watch ends (run as a task)."""
        if self.events is not None and self._planner_feed is None:
            self._planner_feed = asyncio.get_running_loop().create_task(
                self._feed_planner_decisions(), name="planner-decisions"
            )
        async for event in discovery.watch():
            try:
                self.apply(event)
            except ConfigError as exc:
                log.error("ignoring worker %s: %s", event.record.worker_id, exc)

    def apply(self, event: DiscoveryEvent) -> None:
        if event.kind is ChangeKind.PUT:
            self._put(event.record)
        else:
            self._delete(event.record)
        self.changed.set()
        self.changed.clear()

    def _put(self, record: WorkerRecord) -> None:
        wid = record.worker_id
        pool = self.pools.get(record.model)
        known = pool.get_worker(wid) if pool is not None else None
        if pool is not None and known is not None and known.record.address == record.address:
            known.record = record  # an update of a worker we know
            if record.draining and (wid in pool.workers or wid in pool.prefill_workers):
                pool.drain(wid)
                log.info("worker %s of model %s is draining", wid, record.model)
            return
        if pool is None:
            pool = self._new_pool(record)
        elif known is not None:  # same id at a new address: the worker restarted
            self._close_handle(pool.remove(wid))
        handle = self.resolver(record)
        if record.draining:
            pool.draining[wid] = handle
        else:
            pool.add(handle)
        log.info("worker %s joined model %s at %s", wid, record.model, record.address)
        self._worker_added(pool, wid)

    def _delete(self, record: WorkerRecord) -> None:
        pool = self.pools.get(record.model)
        if pool is None:
            return
        # Closing the handle ends the streams still open on it with WorkerLostError
        # (a worker that died or froze), which migrates them.
        self._close_handle(pool.remove(record.worker_id))
        log.info("worker %s left model %s", record.worker_id, record.model)
        self._worker_removed(pool, record.worker_id)
        if pool.empty:
            self._drop_pool(pool)

    def _close_handle(self, handle: WorkerHandle | None) -> None:
        aclose = getattr(handle, "aclose", None)
        if aclose is not None:
            task = asyncio.get_running_loop().create_task(aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _new_pool(self, record: WorkerRecord) -> ModelPool:
        card = ModelCard.load(
            record.model_path,
            served_name=record.model,
            max_model_len=record.max_model_len or self.settings.max_model_len,
        )
        tokenizer = Tokenizer.from_dir(card.path)
        template = ChatTemplate.from_dir(card.path)
        router_factory = self.registry.routers.get(self.settings.router_name)
        context = RouterContext(self.settings, record.model, record.block_size)
        router = router_factory(context)
        pool = ModelPool(
            card,
            tokenizer,
            template,
            router,
            migration_limit=self.migration_limit,
            migration_wait_s=self.settings.runtime.migration_wait_s,
            prefill_router=router_factory(context),
            disagg=self.settings.disagg,
        )
        if self.events is not None:
            loop = asyncio.get_running_loop()
            pool.kv_sync = KvEventSync(
                pool.on_kv_event, lambda worker_id: self._fetch_snapshot(pool, worker_id)
            )
            pool.tasks.append(
                loop.create_task(self._feed_kv_events(pool), name=f"kv-events-{record.model}")
            )
            pool.tasks.append(loop.create_task(self._feed_load(pool), name=f"load-{record.model}"))
            if self.settings.runtime.router_replica_sync:
                pool.replica = ReplicaPublisher(self.events, record.model, self.frontend_id)
                pool.tasks.append(
                    loop.create_task(self._feed_router_sync(pool), name=f"sync-{record.model}")
                )
        self.pools[record.model] = pool
        return pool

    def _worker_added(self, pool: ModelPool, worker_id: str) -> None:
        if pool.kv_sync is not None:
            pool.kv_sync.worker_added(worker_id)

    def _worker_removed(self, pool: ModelPool, worker_id: str) -> None:
        if pool.kv_sync is not None:
            pool.kv_sync.worker_removed(worker_id)

    def _fetch_snapshot(self, pool: ModelPool, worker_id: str) -> None:
        """Start fetching a worker's KV snapshot for the pool's `KvEventSync`."""

        async def fetch() -> None:
            sync = pool.kv_sync
            assert sync is not None
            worker = pool.get_worker(worker_id)
            snapshot_of = getattr(worker, "kv_snapshot", None)
            try:
                if snapshot_of is None:
                    raise EngineError("no such worker, or it takes no KV snapshots")
                snapshot = await snapshot_of()
            except (EngineError, OSError) as exc:
                log.debug("KV snapshot of worker %s failed: %s", worker_id, exc)
                sync.on_dump_failed(worker_id)
                return
            sync.on_snapshot(snapshot)

        task = asyncio.get_running_loop().create_task(fetch())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _drop_pool(self, pool: ModelPool) -> None:
        self.pools.pop(pool.name, None)
        for task in pool.tasks:
            task.cancel()

    async def _feed_kv_events(self, pool: ModelPool) -> None:
        assert self.events is not None
        sync = pool.kv_sync
        assert sync is not None
        async for message in self.events.subscribe(kv_events_topic(pool.name), KvEvent):
            sync.on_event(message)

    async def _feed_load(self, pool: ModelPool) -> None:
        assert self.events is not None
        async for report in self.events.subscribe(load_topic(pool.name), LoadReport):
            worker = pool.get_worker(report.worker_id)
            if worker is None:
                continue
            worker.view.load = report.metrics
            if report.kv_event_id is not None and pool.kv_sync is not None:
                pool.kv_sync.on_heartbeat(report.worker_id, report.kv_event_id)

    async def _feed_router_sync(self, pool: ModelPool) -> None:
        assert self.events is not None
        async for sync in self.events.subscribe(router_sync_topic(pool.name), RouterSync):
            if sync.frontend != self.frontend_id:
                pool.apply_sync(sync)

    async def _feed_planner_decisions(self) -> None:
        assert self.events is not None
        async for decision in self.events.subscribe(PLANNER_DECISIONS_TOPIC, PlannerDecision):
            self.planner_decisions.append(decision)

    async def aclose(self) -> None:
        if self._planner_feed is not None:
            self._planner_feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._planner_feed
        for pool in list(self.pools.values()):
            self._drop_pool(pool)
            for task in pool.tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            handles = [*pool.workers.values(), *pool.prefill_workers.values()]
            for handle in [*handles, *pool.draining.values()]:
                self._close_handle(handle)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
