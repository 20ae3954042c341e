"""The event plane: KV events and load metrics from workers to routers.

Publishing is synchronous and never blocks the publisher (an engine calls it
from its step loop); subscribers get their own bounded queue. A subscriber that
falls too far behind loses the oldest messages - the per-worker event ids let
it notice the gap and re-sync.

Backends are chosen by URL scheme (`--events memory://`, `zmq:///dir`,
`nats://host:port`). Messages are `msgspec.Struct`s; remote backends encode
them with msgpack and the subscriber names the type to decode. A remote
backend reconnects by itself after its server restarts (messages published
meanwhile may be lost: consumers re-sync from event ids).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol, TypeVar, runtime_checkable

import msgspec

from dynamo_gateway.protocol.engine import LoadMetrics
from dynamo_gateway.runtime._events_common import CLOSE, close_queues, put_dropping_oldest

T = TypeVar("T", bound=msgspec.Struct)

log = logging.getLogger(__name__)


def kv_events_topic(model: str) -> str:
    """Topic of the `KvEvent`s of one model's workers."""
    return f"kv_events.{model}"


def load_topic(model: str) -> str:
    """Topic of the `LoadReport`s of one model's workers."""
    return f"load.{model}"


class LoadReport(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's load, published periodically and when it changes."""

    worker_id: str
    metrics: LoadMetrics
    # The id of the worker's last KV event: lets consumers notice lost trailing events.
    kv_event_id: int | None = None


PLANNER_DECISIONS_TOPIC = "planner.decisions"
"""Topic of the planner's `PlannerDecision`s (every model's)."""


class PlannerDecision(msgspec.Struct, frozen=True, kw_only=True):
    """A planner decision that changes a pool, published for the frontends' /status."""

    time: float  # wall clock (Unix seconds) when it was decided
    model: str
    role: str
    current: int  # live + starting workers before the decision
    target: int  # workers the planner asks for
    wanted: int  # what the policy wanted, before limits, cool-down and budget
    reason: str
    live: int = 0
    starting: int = 0
    draining: int = 0
    dry_run: bool = False  # decided and logged, not carried out


LOAD_REPORT_INTERVAL_S = 0.1  # a changed load goes out this often at most
LOAD_HEARTBEAT_S = 1.0  # an unchanged one this often


@runtime_checkable
class EventPlane(Protocol):
    async def start(self) -> None:
        """Connect to the backend; called once before publishing or subscribing."""

    def publish(self, topic: str, message: msgspec.Struct) -> None:
        """Send `message` to every subscriber of `topic` in any process; never blocks."""

    def subscribe(self, topic: str, type: type[T]) -> AsyncIterator[T]:
        """Messages of `type` published to `topic` from now on, until `aclose()`.

        The subscription is active once the first `__anext__` has started.
        Messages that do not decode as `type` are logged and skipped.
        """
        ...

    async def aclose(self) -> None:
        """End every subscription and release the backend."""


async def report_load(
    events: EventPlane,
    topic: str,
    worker_id: str,
    read: Callable[[], tuple[LoadMetrics, int | None]],
) -> None:
    """Publish a worker's `LoadReport` whenever `read()` (its load and last KV event
    id) changes, at most every LOAD_REPORT_INTERVAL_S, and every LOAD_HEARTBEAT_S
    regardless; runs until cancelled."""
    last: tuple[LoadMetrics, int | None] | None = None
    quiet = 0.0
    while True:
        now = read()
        if now != last or quiet >= LOAD_HEARTBEAT_S:
            events.publish(
                topic, LoadReport(worker_id=worker_id, metrics=now[0], kv_event_id=now[1])
            )
            last, quiet = now, 0.0
        await asyncio.sleep(LOAD_REPORT_INTERVAL_S)
        quiet += LOAD_REPORT_INTERVAL_S


class MemoryEventPlane:
    """Event plane inside one process: messages are passed as objects, not encoded."""

    def __init__(self, max_queue: int = 100_000) -> None:
        self._max_queue = max_queue
        self._subs: dict[str, list[asyncio.Queue[object]]] = {}
        self._closed = False
        self.dropped = 0

    async def start(self) -> None:
        pass

    def publish(self, topic: str, message: msgspec.Struct) -> None:
        for queue in self._subs.get(topic, ()):
            if put_dropping_oldest(queue, message):
                self.dropped += 1

    async def subscribe(self, topic: str, type: type[T]) -> AsyncIterator[T]:
        queue: asyncio.Queue[object] = asyncio.Queue(self._max_queue)
        subs = self._subs.setdefault(topic, [])
        subs.append(queue)
        try:
            while not self._closed:
                message = await queue.get()
                if message is CLOSE:
                    break
                if isinstance(message, type):
                    yield message
        finally:
            subs.remove(queue)

    async def aclose(self) -> None:
        self._closed = True
        for subs in self._subs.values():
            close_queues(subs)
