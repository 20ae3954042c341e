"""The engine interface every backend implements.

An engine owns one worker's model (or its simulation) and KV cache. The
frontend talks to it only through this protocol, in-process or over the
request plane::

    async with engine:                       # start() ... aclose()
        async for out in engine.generate(req):
            ...                              # EngineOutput deltas, the last one has finish_reason
        await engine.abort(req.request_id)   # idempotent; a finished id is ignored

`generate()` must stop (with `FinishReason.ABORT`) soon after `abort()`, and
must abort the request itself when the consumer stops iterating early
(`aclose()` of the generator), so that a client that went away frees its slot.

Optional: an engine that publishes KV events MAY also implement
``kv_snapshot() -> KvSnapshot`` (`dynamo_gateway.protocol.kv_events`): a
synchronous, cheap dump of every block in its prefix cache, consistent with its
event stream (``snapshot.event_id`` is the id of the last event it published,
and the blocks reflect exactly the events up to it). Consumers that lost events
ask for it to rebuild their view (`dynamo_gateway.runtime.kv_sync`). It is not
part of the `Engine` protocol; callers look for it with
``getattr(engine, "kv_snapshot", None)`` and treat its absence (or an
`EngineError` from it) as "no dump available". The scheduler-driven engines
(`ScheduledEngine`: mocker, reference) implement it.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

from dynamo_gateway.protocol.engine import EngineOutput, EngineRequest, LoadMetrics, WorkerRole
from dynamo_gateway.protocol.kv_events import KvEvent

if TYPE_CHECKING:
    from dynamo_gateway.models.card import ModelCard
    from dynamo_gateway.registry import Registry
    from dynamo_gateway.settings import Settings


class EngineState(enum.Enum):
    CREATED = "created"  # constructed, nothing allocated yet
    STARTING = "starting"  # loading weights / allocating the KV cache
    RUNNING = "running"  # accepting requests
    DRAINING = "draining"  # finishing in-flight requests, refusing new ones
    STOPPED = "stopped"  # resources released; generate() raises
    FAILED = "failed"  # start or a step failed; check_health() raises


KvEventSink = Callable[[KvEvent], None]


@dataclass(frozen=True)
class EngineContext:
    """Everything an engine factory is given to build one worker's engine."""

    settings: Settings
    model: ModelCard
    worker_id: str
    role: WorkerRole = WorkerRole.AGGREGATED
    # Where the engine publishes its KV events; the event plane fans them out.
    publish_kv_event: KvEventSink | None = None
    # The plugin registry (KV transports for the prefill and decode roles); None:
    # the engine loads the plugins itself if it needs them.
    registry: Registry | None = None


@runtime_checkable
class Engine(Protocol):
    """An async inference engine (see the module docstring for the contract)."""

    @property
    def state(self) -> EngineState: ...

    @property
    def block_size(self) -> int: ...

    async def start(self) -> None:
        """Load the model and allocate the KV cache; afterwards `state` is RUNNING."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream the request's output deltas; the last one carries `finish_reason`."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request at the next step and free its blocks; unknown ids are ignored."""

    async def check_health(self) -> None:
        """Return if the engine can serve; raise `EngineError` if not."""

    def load(self) -> LoadMetrics:
        """The current load: cheap, synchronous, safe to call on every routing decision."""
        ...

    async def aclose(self) -> None:
        """Abort what is in flight and release everything; idempotent."""


EngineFactory = Callable[[EngineContext], Engine]


class EngineBase:
    """Optional base giving `async with` support on top of start()/aclose()."""

    async def start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def aclose(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
