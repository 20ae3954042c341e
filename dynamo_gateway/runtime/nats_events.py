"""Event plane over core NATS (`nats://host:port[/namespace]`).

Every topic maps to one NATS subject (`nats_subject`); messages are msgpack.
Core NATS has no persistence: a subscriber gets what is published while it is
subscribed and connected, which is all the event plane promises (consumers
re-sync from event ids).

`publish()` is called from engine step loops, so it must not wait for the
network: it encodes the message, appends it to a bounded outbox and wakes one
flusher task, which hands the outbox to nats-py (whose `publish` coroutine only
buffers). When the outbox is full the oldest message is dropped; while the
connection is down nats-py buffers up to `pending_size` bytes and refuses the
rest, which we count as drops too. nats-py reconnects forever and re-sends
every SUB after a reconnect, so subscriptions survive a server restart.

Like every event plane, call `publish()` from the thread that runs the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.runtime import _events_common as common

T = TypeVar("T", bound=msgspec.Struct)

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "dynamo-gateway"

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


@lru_cache(maxsize=4096)
def nats_subject(namespace: str, topic: str) -> str:
    """The NATS subject of `topic`: ``<namespace>.<kind>.x<hex of the rest>``.

    ``kv_events.org/Model v2`` becomes ``<namespace>.kv_events.x6f72...``: the
    kind stays readable (and usable in wildcards), the model name, which may
    hold dots, spaces or ``*``/``>``, is hex-encoded. A topic without a plain
    ``kind.`` prefix becomes ``<namespace>.x<hex of topic>``, one token shorter,
    so the mapping is injective.
    """
    kind, dot, rest = topic.partition(".")
    if dot and _TOKEN.fullmatch(kind):
        return f"{namespace}.{kind}.x{rest.encode('utf-8', 'surrogatepass').hex()}"
    return f"{namespace}.x{topic.encode('utf-8', 'surrogatepass').hex()}"


def parse_nats_url(url: str) -> tuple[list[str], str]:
    """``nats://host:port[,host:port...][/namespace]`` -> (server URLs, namespace)."""
    parts = urlsplit(url)
    if parts.scheme != "nats" or not parts.netloc:
        raise ConfigError(
            f"bad NATS event-plane URL {url!r}: expected nats://host:port[/namespace]"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"bad NATS event-plane URL {url!r}: no query or fragment allowed")
    servers = [f"nats://{hostport}" for hostport in parts.netloc.split(",") if hostport]
    if not servers:
        raise ConfigError(f"bad NATS event-plane URL {url!r}: no server")
    for server in servers:
        try:
            urlsplit(server).port  # noqa: B018  (validates the port)
        except ValueError as exc:
            raise ConfigError(f"bad NATS event-plane URL {url!r}: {exc}") from None
    namespace = unquote(parts.path.strip("/")) or DEFAULT_NAMESPACE
    if not _NAMESPACE.fullmatch(namespace):
        raise ConfigError(
            f"bad NATS namespace {namespace!r} in {url!r}: use letters, digits, '_', '-' and '.'"
        )
    return servers, namespace


class NatsEventPlane:
    """Event plane over a NATS server (or cluster); see the module docstring."""

    def __init__(
        self,
        servers: list[str],
        namespace: str = DEFAULT_NAMESPACE,
        *,
        max_outbox: int = 100_000,
        max_queue: int = 100_000,
        connect_timeout_s: float = 10.0,
        reconnect_wait_s: float = 0.5,
        name: str | None = None,
    ) -> None:
        if not _NAMESPACE.fullmatch(namespace):
            raise ConfigError(f"bad NATS namespace {namespace!r}")
        self.servers = list(servers)
        self.namespace = namespace
        self.url = f"nats://{','.join(s.removeprefix('nats://') for s in self.servers)}"
        self._max_outbox = max_outbox
        self._max_queue = max_queue
        self._connect_timeout_s = connect_timeout_s
        self._reconnect_wait_s = reconnect_wait_s
        self._name = name
        self._nc: Client | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._outbox: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._queues: set[asyncio.Queue[object]] = set()
        self._closed = False
        self._drop_log = common.RateLimitedLog(log)
        self._decode_log = common.RateLimitedLog(log)
        self._error_log = common.RateLimitedLog(log)
        self.dropped = 0
        """Messages this plane failed to publish (outbox full, connection down too long)."""
        self.dropped_received = 0
        """Messages a slow subscriber of this plane lost (its queue was full)."""

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> NatsEventPlane:
        servers, namespace = parse_nats_url(url)
        return cls(servers, namespace, **kwargs)

    @property
    def connected(self) -> bool:
        """Whether the connection to NATS is up right now (it comes back by itself)."""
        return self._nc is not None and self._nc.is_connected

    def subject(self, topic: str) -> str:
        return nats_subject(self.namespace, topic)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, retrying for `connect_timeout_s`; `ConfigError` if NATS stays unreachable."""
        if self._nc is not None or self._closed:
            return
        nc = Client()
        # Bounded attempts for the first connection only: a gateway started against
        # the wrong address should fail, not hang. Once connected, reconnect forever.
        attempts = max(1, round(self._connect_timeout_s / self._reconnect_wait_s))
        try:
            connecting = nc.connect(
                servers=self.servers,
                name=self._name,
                allow_reconnect=True,
                max_reconnect_attempts=attempts,
                # nats-py annotates these as int, but sleeps and waits on them as floats.
                reconnect_time_wait=self._reconnect_wait_s,  # type: ignore[arg-type]
                connect_timeout=2,
                ping_interval=10,
                max_outstanding_pings=3,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
            # The attempts bound refused connections; this bounds slow ones (timeouts).
            await asyncio.wait_for(connecting, self._connect_timeout_s + 2.0)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            await nc.close()
            raise ConfigError(f"cannot reach NATS at {self.url}: {exc!r}") from None
        nc.options["max_reconnect_attempts"] = -1
        self._nc = nc
        self._flusher = asyncio.create_task(self._flush_loop(), name="nats-event-plane-flusher")

    async def aclose(self) -> None:
        """End every subscription, send what is still in the outbox (briefly), disconnect."""
        if self._closed:
            return
        self._closed = True
        common.close_queues(self._queues)
        nc, self._nc = self._nc, None
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(flusher, timeout=2.0)
            except TimeoutError:
                # wait_for cancelled it; what was left in the outbox is lost.
                self.dropped += len(self._outbox)
                self._outbox.clear()
        if nc is not None:
            if nc.is_connected:
                with suppress(nats.errors.Error, OSError, asyncio.TimeoutError):
                    await nc.flush(timeout=2)
            # nats-py writes its pending buffer on close; with the server gone that
            # transport is already closed (RuntimeError under uvloop). Nothing is left
            # to save then, and a worker must still exit cleanly.
            with suppress(nats.errors.Error, OSError, RuntimeError):
                await nc.close()

    # -- publishing --------------------------------------------------------------------------

    def publish(self, topic: str, message: msgspec.Struct) -> None:
        if self._closed or self._nc is None:
            self._drop("event plane not started or closed")
            return
        outbox = self._outbox
        if len(outbox) >= self._max_outbox:
            outbox.popleft()
            self._drop("outbox full (NATS too slow or unreachable)")
        outbox.append((nats_subject(self.namespace, topic), self._encoder.encode(message)))
        if not self._wake.is_set():
            self._wake.set()

    def _drop(self, why: str) -> None:
        self.dropped += 1
        self._drop_log.warning(
            "NATS event plane dropped a message: %s (%d dropped in all)", why, self.dropped
        )

    async def _flush_loop(self) -> None:
        nc = self._nc
        assert nc is not None
        outbox = self._outbox
        while True:
            if not outbox:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # nc.publish only appends to nats-py's buffer and kicks its own flusher; it
            # waits only when that buffer is full. Yield now and then: the loop is shared.
            for _ in range(min(len(outbox), 1024)):
                subject, payload = outbox.popleft()
                try:
                    await nc.publish(subject, payload)
                except nats.errors.Error as exc:
                    self._drop(type(exc).__name__)
            await asyncio.sleep(0)

    # -- subscribing -------------------------------------------------------------------------

    async def subscribe(self, topic: str, type: type[T]) -> AsyncIterator[T]:
        nc = self._nc
        if nc is None:
            if self._closed:
                return
            raise RuntimeError("NatsEventPlane.subscribe() before start()")
        queue: asyncio.Queue[object] = asyncio.Queue(self._max_queue)

        async def on_message(msg: Msg) -> None:
            if common.put_dropping_oldest(queue, msg.data):
                self.dropped_received += 1

        sub = await nc.subscribe(nats_subject(self.namespace, topic), cb=on_message)
        self._queues.add(queue)
        try:
            # A round trip, so the server knows of the subscription before we return
            # the first message (best effort: while disconnected, nats-py re-sends
            # the SUB after reconnecting).
            with suppress(nats.errors.Error, asyncio.TimeoutError):
                await nc.flush(timeout=2)
            messages = common.decode_queue(
                queue,
                type,
                closed=lambda: self._closed,
                decode_log=self._decode_log,
                plane="NATS event plane",
                topic=topic,
            )
            async with aclosing(messages):
                async for message in messages:
                    yield message
        finally:
            self._queues.discard(queue)
            if not self._closed and not nc.is_closed:
                with suppress(nats.errors.Error):
                    await sub.unsubscribe()

    # -- nats-py callbacks -------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        self._error_log.warning("NATS event plane: %r", exc)

    async def _on_disconnected(self) -> None:
        if self._nc is not None and not self._closed:
            log.warning("NATS event plane: disconnected from %s, reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        log.info("NATS event plane: reconnected to %s", self.url)
