"""Event plane over ZeroMQ on one host (`zmq:///abs/dir`), with no server process.

Every plane binds its own PUB socket at `start()`, as ``<dir>/<pid>-<random>.sock``
(an ipc endpoint; bound at start, not at first publish, so subscribers have
found it by the time the first events flow). A plane that subscribes opens
one SUB socket, connects it to every ``*.sock`` in the directory (its own
included) and rescans the directory every `SCAN_INTERVAL_S` to connect to new
publishers and disconnect from removed ones. `aclose()` unlinks the plane's
socket file.

Frames are ``[topic + b"\\0", msgpack payload]``. ZMQ filters by prefix; the
terminator keeps ``load.m`` from matching ``load.m2``, and the reader also
dispatches on the exact topic frame.

Like all ZMQ PUB/SUB, a subscriber misses what a publisher sends before their
connection (and subscription) is established - the "slow joiner" - and a PUB
socket drops messages for a subscriber whose queue is full; consumers re-sync
from event ids. A publisher killed with SIGKILL leaves its socket file behind:
connecting to it is harmless (ZMQ retries with back-off), and subscribers
remove such files once a connect to them is refused (`STALE_AGE_S` after their
creation, so a socket that is bound but not yet listening is never taken for
a dead one).

Like every event plane, call `publish()` from the thread that runs the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import msgspec
import zmq
import zmq.asyncio

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.runtime import _events_common as common

T = TypeVar("T", bound=msgspec.Struct)

log = logging.getLogger(__name__)

SCAN_INTERVAL_S = 0.2
"""How often a subscribing plane looks for new and removed publishers (default)."""
STALE_SWEEP_S = 5.0
"""How often a subscribing plane checks its publishers' sockets for dead ones (default)."""
STALE_AGE_S = 2.0
"""A socket file younger than this is never removed as stale."""
HWM = 100_000
"""Messages ZMQ queues per connection (each way) before it drops."""
MAX_IPC_PATH = 107
"""sockaddr_un.sun_path is 108 bytes on Linux, with the terminating NUL."""
_NAME_LEN = len(f"{2**22}-{'0' * 8}.sock")  # pid_max is at most 2**22 on Linux
_BATCH = 1024


def parse_zmq_url(url: str) -> Path:
    """``zmq:///abs/dir`` -> the directory."""
    parts = urlsplit(url)
    if parts.scheme != "zmq" or parts.netloc or not parts.path.startswith("/"):
        raise ConfigError(
            f"bad ZMQ event-plane URL {url!r}: expected zmq:///absolute/directory "
            "(three slashes; the plane works on one host only)"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"bad ZMQ event-plane URL {url!r}: no query or fragment allowed")
    return Path(unquote(parts.path))


def topic_frame(topic: str) -> bytes:
    return topic.encode("utf-8", "surrogatepass") + b"\0"


class ZmqEventPlane:
    """Event plane over ipc sockets in one directory; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        *,
        max_queue: int = 100_000,
        scan_interval_s: float = SCAN_INTERVAL_S,
        stale_sweep_s: float = STALE_SWEEP_S,
    ) -> None:
        directory = Path(directory)
        if not directory.is_absolute():
            raise ConfigError(f"ZMQ event-plane directory must be absolute, not {str(directory)!r}")
        longest = len(os.fsencode(directory)) + 1 + _NAME_LEN
        if longest > MAX_IPC_PATH:
            raise ConfigError(
                f"ZMQ event-plane directory {str(directory)!r} is too long: ipc socket paths "
                f"in it would reach {longest} bytes, the limit is {MAX_IPC_PATH}; "
                "use a shorter directory"
            )
        self.directory = directory
        self.socket_path = directory / f"{os.getpid()}-{secrets.token_hex(4)}.sock"
        self._max_queue = max_queue
        self._scan_interval_s = scan_interval_s
        self._stale_sweep_s = stale_sweep_s
        self._encoder = msgspec.msgpack.Encoder()
        self._frames: dict[str, bytes] = {}
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._sub_sync: zmq.Socket[bytes] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connected: dict[str, float] = {}  # socket path -> when we connected
        self._subs: dict[bytes, list[asyncio.Queue[object]]] = {}
        self._closed = False
        self._drop_log = common.RateLimitedLog(log)
        self._decode_log = common.RateLimitedLog(log)
        self.dropped = 0
        """Messages this plane failed to publish (not started, closed, or ZMQ refused)."""
        self.dropped_received = 0
        """Messages a slow subscriber of this plane lost (its queue was full)."""

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> ZmqEventPlane:
        return cls(parse_zmq_url(url), **kwargs)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the directory and bind this plane's PUB socket."""
        if self._ctx is not None or self._closed:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create ZMQ event-plane directory: {exc}") from None
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, HWM)
        pub.setsockopt(zmq.LINGER, 0)
        try:
            pub.bind(f"ipc://{self.socket_path}")
        except zmq.ZMQError as exc:
            pub.close()
            ctx.term()
            raise ConfigError(
                f"cannot bind ZMQ event-plane socket {self.socket_path}: {exc}"
            ) from None
        self._ctx = ctx
        self._pub = pub

    async def aclose(self) -> None:
        """End every subscription, close the sockets, remove this plane's socket file."""
        if self._closed:
            return
        self._closed = True
        for queues in self._subs.values():
            common.close_queues(queues)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with suppress(asyncio.CancelledError):
                await reader
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = self._sub_sync = None
        if self._pub is not None:
            self._pub.close(linger=0)
            self._pub = None
            with suppress(OSError):
                self.socket_path.unlink(missing_ok=True)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -- publishing --------------------------------------------------------------------------

    def publish(self, topic: str, message: msgspec.Struct) -> None:
        pub = self._pub
        if pub is None:
            self._drop("event plane not started or closed")
            return
        frame = self._frames.get(topic)
        if frame is None:
            frame = self._frames[topic] = topic_frame(topic)
        try:
            # PUB never blocks (it drops for a full subscriber); NOBLOCK makes sure.
            pub.send_multipart((frame, self._encoder.encode(message)), zmq.NOBLOCK)
        except zmq.Again:
            self._drop("send queue full")
        except zmq.ZMQError as exc:
            self._drop(str(exc))

    def _drop(self, why: str) -> None:
        self.dropped += 1
        self._drop_log.warning(
            "ZMQ event plane dropped a message: %s (%d dropped in all)", why, self.dropped
        )

    # -- subscribing -------------------------------------------------------------------------

    async def subscribe(self, topic: str, type: type[T]) -> AsyncIterator[T]:
        if self._closed:
            return
        if self._ctx is None:
            raise RuntimeError("ZmqEventPlane.subscribe() before start()")
        sub = self._ensure_reader()
        frame = topic_frame(topic)
        queue: asyncio.Queue[object] = asyncio.Queue(self._max_queue)
        queues = self._subs.setdefault(frame, [])
        if not queues:
            sub.setsockopt(zmq.SUBSCRIBE, frame)
        queues.append(queue)
        messages = common.decode_queue(
            queue,
            type,
            closed=lambda: self._closed,
            decode_log=self._decode_log,
            plane="ZMQ event plane",
            topic=topic,
        )
        try:
            async with aclosing(messages):
                async for message in messages:
                    yield message
        finally:
            queues.remove(queue)
            if not queues:
                del self._subs[frame]
                if not self._closed and self._sub is not None:
                    self._sub.setsockopt(zmq.UNSUBSCRIBE, frame)

    def _ensure_reader(self) -> zmq.asyncio.Socket:
        if self._sub is not None:
            return self._sub
        assert self._ctx is not None
        sub = zmq.asyncio.Context.shadow(self._ctx.underlying).socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, HWM)
        sub.setsockopt(zmq.LINGER, 0)
        # A dead endpoint (stale file) is retried with back-off, not every 100 ms.
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        self._sub = sub
        # The same socket, read synchronously: draining a batch without a future per message.
        self._sub_sync = zmq.Socket.shadow(sub.underlying)
        self._scan()
        self._reader = asyncio.create_task(self._read_loop(), name="zmq-event-plane-reader")
        return sub

    async def _read_loop(self) -> None:
        sub, sub_sync = self._sub, self._sub_sync
        assert sub is not None and sub_sync is not None
        next_scan = time.monotonic() + self._scan_interval_s
        next_sweep = time.monotonic() + self._stale_sweep_s
        while True:
            now = time.monotonic()
            if now >= next_scan:
                self._scan()
                next_scan = now + self._scan_interval_s
            if now >= next_sweep:
                self._sweep_stale()
                next_sweep = now + self._stale_sweep_s
            timeout_ms = max(1, int((next_scan - now) * 1000))
            if not await sub.poll(timeout_ms):  # POLLIN
                continue
            for _ in range(_BATCH):
                try:
                    frames = sub_sync.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) == 2:
                    self._dispatch(frames[0], frames[1])
            else:
                await asyncio.sleep(0)  # a full batch: let the consumers run

    def _dispatch(self, frame: bytes, payload: bytes) -> None:
        for queue in self._subs.get(frame, ()):
            if common.put_dropping_oldest(queue, payload):
                self.dropped_received += 1

    def _scan(self) -> None:
        """Connect to new publishers' sockets, disconnect from removed ones."""
        sub = self._sub
        assert sub is not None
        try:
            found = {
                entry.path for entry in os.scandir(self.directory) if entry.name.endswith(".sock")
            }
        except OSError:
            found = set()
        for path in found - self._connected.keys():
            try:
                sub.connect(f"ipc://{path}")
            except zmq.ZMQError as exc:
                log.debug("cannot connect to %s: %s", path, exc)
                continue
            self._connected[path] = time.monotonic()
        for path in self._connected.keys() - found:
            self._disconnect(path)

    def _disconnect(self, path: str) -> None:
        del self._connected[path]
        if self._sub is not None:
            with suppress(zmq.ZMQError):
                self._sub.disconnect(f"ipc://{path}")

    def _sweep_stale(self) -> None:
        """Remove socket files nobody listens on any more (publishers killed with SIGKILL)."""
        own = str(self.socket_path)
        for path in list(self._connected):
            if path == own:
                continue
            try:
                if time.time() - os.stat(path).st_mtime < STALE_AGE_S:
                    continue
            except OSError:
                continue
            if _refuses_connections(path):
                log.info("ZMQ event plane: removing stale socket %s (no publisher listens)", path)
                with suppress(OSError):
                    os.unlink(path)
                self._disconnect(path)


def _refuses_connections(path: str) -> bool:
    """True if nothing listens on the unix socket at `path` (never blocks)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        return probe.connect_ex(path) == errno.ECONNREFUSED
