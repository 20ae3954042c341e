"""The event plane: KV events and load metrics from workers to routers.

Publishing is synchronous and never blocks the publisher (an engine calls it
from its step loop); subscribers get their own bounded queue. A subscriber that
falls too far behind loses the oldest messages - the per-worker event ids let
it notice the gap and re-sync.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)


def kv_events_topic(model: str) -> str:
    return f"kv_events.{model}"


@runtime_checkable
class EventPlane(Protocol):
    def publish(self, topic: str, message: object) -> None:
        """Send `message` (a msgspec struct) to every subscriber of `topic`; never blocks."""

    def subscribe(self, topic: str) -> AsyncIterator[object]:
        """Messages published to `topic` from now on, until `aclose()`."""
        ...

    async def aclose(self) -> None:
        """End every subscription and release the backend."""


class MemoryEventPlane:
    """Event plane inside one process: messages are passed as objects, not encoded."""

    def __init__(self, max_queue: int = 100_000) -> None:
        self._max_queue = max_queue
        self._subs: dict[str, list[asyncio.Queue[object]]] = {}
        self._closed = False
        self.dropped = 0

    def publish(self, topic: str, message: object) -> None:
        for queue in self._subs.get(topic, ()):
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(message)

    async def subscribe(self, topic: str) -> AsyncIterator[object]:
        queue: asyncio.Queue[object] = asyncio.Queue(self._max_queue)
        subs = self._subs.setdefault(topic, [])
        subs.append(queue)
        try:
            while not self._closed:
                message = await queue.get()
                if message is _CLOSE:
                    break
                yield message
        finally:
            subs.remove(queue)

    async def aclose(self) -> None:
        self._closed = True
        for subs in self._subs.values():
            for queue in subs:
                if queue.full():
                    queue.get_nowait()
                queue.put_nowait(_CLOSE)


_CLOSE = object()
