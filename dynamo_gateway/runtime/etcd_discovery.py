"""Discovery through etcd: ``etcd://host:port[/namespace]``.

Records live at ``/<namespace>/workers/<worker_id>`` as `encode_record` JSON,
all under one lease per `EtcdDiscovery` instance, so a process that dies takes
its workers with it after about ``lease_ttl_s``.

Surviving etcd restarts (the reason this module is more than a few puts):

* The keep-alive task refreshes the lease every TTL/3. When etcd cannot be
  reached it retries with a short backoff; when etcd answers that the lease is
  unknown (it expired while we were cut off, or etcd lost its data) it grants a
  new lease and puts every record again.
* ``watch()`` lists the prefix, then watches from the next revision. When the
  stream breaks it reconnects with backoff, lists again and yields the
  difference to what it had announced (PUT for new or changed records, DELETE
  for vanished ones) before watching again. Only `aclose()` ends a watch.

``aetcd`` (and with it grpc) is imported when an instance starts, not when this
module is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import msgspec

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.runtime.discovery import (
    ChangeKind,
    DiscoveryEvent,
    WorkerRecord,
    decode_record,
    encode_record,
)

if TYPE_CHECKING:
    import aetcd

log = logging.getLogger(__name__)

DEFAULT_PORT = 2379
DEFAULT_NAMESPACE = "dynamo-gateway"
RPC_TIMEOUT_S = 3.0  # one etcd call; the keep-alive must notice a hung etcd within a TTL
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 2.0
# grpc's own reconnect backoff grows to 2 minutes; keep it near ours so a
# restarted etcd is picked up at once.
_GRPC_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}


def lease_ttl_seconds(lease_ttl_s: float) -> int:
    """etcd leases are whole seconds: round up, and at least 2 (etcd's minimum is
    1.5 election timeouts, 1.5 s by default)."""
    return max(2, math.ceil(lease_ttl_s))


def parse_etcd_url(url: str) -> tuple[str, int, str]:
    """(host, port, namespace) of ``etcd://host[:port][/namespace]``."""
    parts = urlsplit(url)
    if parts.scheme != "etcd":
        raise ConfigError(f"not an etcd:// URL: {url!r}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ConfigError(f"bad port in etcd URL {url!r} (want etcd://host:port)") from None
    if not host:
        raise ConfigError(f"etcd URL without a host: {url!r} (want etcd://host:port[/namespace])")
    if parts.username or parts.password:
        raise ConfigError(f"etcd URL with credentials is not supported: {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"etcd URL takes no query or fragment: {url!r}")
    if ":" in host:  # IPv6: grpc wants the brackets back
        host = f"[{host}]"
    namespace = unquote(parts.path).strip("/") or DEFAULT_NAMESPACE
    return host, port or DEFAULT_PORT, namespace


class _Backoff:
    def __init__(self) -> None:
        self.delay = BACKOFF_MIN_S

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, BACKOFF_MAX_S)
        return delay

    def reset(self) -> None:
        self.delay = BACKOFF_MIN_S


class EtcdDiscovery:
    """`Discovery` backed by an etcd cluster (v3 API, via ``aetcd``)."""

    @classmethod
    def from_url(cls, url: str, lease_ttl_s: float) -> EtcdDiscovery:
        host, port, namespace = parse_etcd_url(url)
        return cls(host, port, namespace, lease_ttl_s)

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        namespace: str = DEFAULT_NAMESPACE,
        lease_ttl_s: float = 3.0,
    ) -> None:
        self.host = host
        self.port = port
        self.namespace = namespace.strip("/") or DEFAULT_NAMESPACE
        self.ttl = lease_ttl_seconds(lease_ttl_s)
        self.prefix = f"/{self.namespace}/workers/".encode()
        self._client: aetcd.Client | None = None
        self._errors: tuple[type[BaseException], ...] = (TimeoutError,)
        self._lease: aetcd.Lease | None = None
        self._records: dict[str, WorkerRecord] = {}  # registered here
        self._to_put: set[str] = set()  # worker ids etcd may not have (yet)
        self._to_delete: set[str] = set()  # deregistered, delete not yet acknowledged
        self._lock = asyncio.Lock()  # one writer of lease and keys at a time
        self._wake = asyncio.Event()  # kicks the keep-alive out of its sleep
        self._closed = asyncio.Event()
        self._keep_alive: asyncio.Task[None] | None = None
        self._watches: set[Any] = set()  # open aetcd Watch objects, cancelled by aclose()
        self._bad_keys: set[bytes] = set()  # undecodable values, logged once each

    @property
    def url(self) -> str:
        return f"etcd://{self.host}:{self.port}/{self.namespace}"

    # -- Discovery ---------------------------------------------------------------------

    async def start(self) -> None:
        import aetcd  # heavy (grpc): only when etcd is actually used

        self._errors = (aetcd.ClientError, TimeoutError)
        self._client = aetcd.Client(
            host=self.host,
            port=self.port,
            timeout=int(RPC_TIMEOUT_S),
            options=dict(_GRPC_OPTIONS),
        )
        await self._client.connect()  # opens the channel; does not wait for etcd
        self._keep_alive = asyncio.create_task(
            self._keep_alive_loop(), name=f"etcd-discovery-keepalive:{self.url}"
        )

    async def register(self, record: WorkerRecord) -> None:
        """Put the record; if etcd is unreachable now, log it and leave the put to
        the keep-alive, which retries until etcd is back."""
        if self._closed.is_set():
            raise RuntimeError("EtcdDiscovery is closed")
        self._records[record.worker_id] = record
        self._to_put.add(record.worker_id)
        self._to_delete.discard(record.worker_id)
        await self._sync_now()

    async def deregister(self, worker_id: str) -> None:
        if self._records.pop(worker_id, None) is None:
            return
        self._to_put.discard(worker_id)
        self._to_delete.add(worker_id)
        await self._sync_now()

    async def list(self) -> list[WorkerRecord]:
        """Every record in etcd now; raises `ConnectionError` when etcd is unreachable."""
        try:
            _, records = await self._list()
        except self._errors as exc:
            raise ConnectionError(f"etcd at {self.host}:{self.port}: {exc}") from exc
        return list(records.values())

    async def watch(self) -> AsyncIterator[DiscoveryEvent]:
        client = self._require_client()
        announced: dict[bytes, WorkerRecord] = {}  # key -> record last yielded
        backoff = _Backoff()
        failing = False
        while not self._closed.is_set():
            watch: Any = None
            try:
                revision, current = await self._list()
                for key in [k for k in announced if k not in current]:
                    yield DiscoveryEvent(ChangeKind.DELETE, announced.pop(key))
                for key, record in current.items():
                    if announced.get(key) != record:
                        announced[key] = record
                        yield DiscoveryEvent(ChangeKind.PUT, record)
                if self._closed.is_set():
                    return
                watch = await client.watch_prefix(self.prefix, start_revision=revision + 1)
                self._watches.add(watch)
                # aetcd waits for the watch with asyncio.wait_for, which on 3.11 drops a
                # cancellation that lands as the watch is created (bpo-42130).
                _raise_if_cancelling()
                if failing:
                    log.info("etcd watch on %s resumed", self.url)
                    failing = False
                backoff.reset()
                async for event in watch:
                    key = bytes(event.kv.key)
                    if event.kind == "DELETE":
                        gone = announced.pop(key, None)
                        if gone is not None:
                            yield DiscoveryEvent(ChangeKind.DELETE, gone)
                        continue
                    put = self._decode(key, bytes(event.kv.value))
                    if put is None:  # undecodable: treat as absent
                        gone = announced.pop(key, None)
                        if gone is not None:
                            yield DiscoveryEvent(ChangeKind.DELETE, gone)
                    elif announced.get(key) != put:
                        announced[key] = put
                        yield DiscoveryEvent(ChangeKind.PUT, put)
                # The iterator ends quietly when the watch is cancelled (aclose) or
                # the client shuts down; anything else is a broken stream. It also
                # swallows a cancellation of the task iterating it: re-raise that,
                # or a cancelled consumer would wait here forever.
                _raise_if_cancelling()
            except self._errors as exc:
                _raise_if_cancelling()
                if not failing:
                    log.warning("etcd watch on %s broke (%s); reconnecting", self.url, exc)
                    failing = True
            finally:
                if watch is not None:
                    self._watches.discard(watch)
                    await self._cancel_watch(watch)
            if self._closed.is_set():
                return
            await _sleep(backoff.next(), self._closed)

    async def aclose(self) -> None:
        """Revoke the lease (records vanish at once), end watches, close the client."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        if self._keep_alive is not None:
            self._keep_alive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keep_alive
            self._keep_alive = None
        async with self._lock:
            lease, self._lease = self._lease, None
            if lease is not None:
                with contextlib.suppress(Exception):  # best effort: else it expires
                    await asyncio.wait_for(lease.revoke(), 1.0)
        self._records.clear()
        for watch in list(self._watches):
            await self._cancel_watch(watch)
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2.0)

    # -- keys and lease ----------------------------------------------------------------

    def _require_client(self) -> aetcd.Client:
        if self._client is None:
            raise RuntimeError("EtcdDiscovery.start() was not called (or it is closed)")
        return self._client

    def _key(self, worker_id: str) -> bytes:
        return self.prefix + worker_id.encode()

    def _decode(self, key: bytes, value: bytes) -> WorkerRecord | None:
        try:
            record = decode_record(value)
        except msgspec.DecodeError as exc:
            if key not in self._bad_keys:
                self._bad_keys.add(key)
                log.warning("ignoring etcd key %r: not a worker record (%s)", key, exc)
            return None
        self._bad_keys.discard(key)
        return record

    async def _list(self) -> tuple[int, dict[bytes, WorkerRecord]]:
        """(revision, records by key) as of one consistent read."""
        result = await self._require_client().get_prefix(self.prefix)
        records: dict[bytes, WorkerRecord] = {}
        for kv in result:
            key = bytes(kv.key)
            record = self._decode(key, bytes(kv.value))
            if record is not None:
                records[key] = record
        return int(result.header.revision), records

    async def _sync_now(self) -> None:
        try:
            async with self._lock:
                await self._sync(refresh=False)
        except self._errors as exc:
            _raise_if_cancelling()
            log.warning("etcd update on %s failed (%s); the keep-alive retries", self.url, exc)
            self._wake.set()

    async def _sync(self, *, refresh: bool) -> None:
        """Bring etcd in line with this instance: a live lease, our puts and deletes.

        Call with `_lock` held. Raises one of `_errors` when etcd does not answer.
        """
        client = self._require_client()
        if self._lease is not None and refresh:
            reply = await asyncio.wait_for(self._lease.refresh(), RPC_TIMEOUT_S)
            if reply is None or reply.TTL <= 0:
                log.warning("etcd lease %x on %s is gone; re-registering", self._lease.id, self.url)
                self._lease = None
        if self._lease is None and self._records:
            self._lease = await client.lease(self.ttl)
            self._to_put = set(self._records)
        for worker_id in list(self._to_delete):
            await client.delete(self._key(worker_id))
            self._to_delete.discard(worker_id)
        for worker_id in list(self._to_put):
            record = self._records.get(worker_id)
            if record is not None and self._lease is not None:
                try:
                    await client.put(self._key(worker_id), encode_record(record), lease=self._lease)
                except self._errors as exc:
                    if "lease not found" in str(exc):
                        self._lease = None  # gone under us: a new one on the next round
                    raise
            self._to_put.discard(worker_id)

    async def _keep_alive_loop(self) -> None:
        backoff = _Backoff()
        failing = False
        while True:
            await _sleep(backoff.next() if failing else self.ttl / 3, self._wake)
            self._wake.clear()
            try:
                async with self._lock:
                    await self._sync(refresh=True)
                _raise_if_cancelling()  # see _raise_if_cancelling: wait_for may drop it
            except self._errors as exc:
                _raise_if_cancelling()
                if not failing:
                    log.warning("etcd keep-alive on %s failed (%s); retrying", self.url, exc)
                    failing = True
                # We may have missed a restart that lost our keys: put them again.
                self._to_put = set(self._records)
            else:
                if failing:
                    log.info("etcd keep-alive on %s recovered", self.url)
                    failing = False
                    backoff.reset()

    async def _cancel_watch(self, watch: Any) -> None:
        # Best effort: after client.close() aetcd's cancel fails on its torn-down watcher.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(watch.cancel(), 1.0)


def _raise_if_cancelling() -> None:
    """Re-raise a cancellation of this task that the client lost or turned into an error.

    grpc reports a call interrupted by cancelling its awaiting task as an RPC error
    (CANCELLED), which aetcd turns into `ClientError`, and aetcd's internal
    `asyncio.wait_for` can drop a cancellation altogether (Python 3.11). Retried
    like a broken connection, either would swallow the cancellation and the
    canceller would wait forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _sleep(seconds: float, event: asyncio.Event) -> None:
    """Sleep for `seconds`, or less if `event` is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
