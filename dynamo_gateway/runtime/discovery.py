"""Service discovery: which workers exist, for which model, where.

A worker registers a `WorkerRecord` under a lease; the backend drops it when the
worker deregisters or its lease runs out. Frontends `watch()` the records and
build their worker pools from them, so workers can come and go at run time.

Backends are chosen by URL scheme (`--discovery memory://`, `file:///dir`,
`etcd://host:port[/namespace]`) through the registry. Every backend must:

* keep a registered record alive on its own (lease keep-alive, heartbeats) until
  `deregister()` or `aclose()`, and re-announce it after the backend restarts;
* drop a worker whose process died or froze within about `lease_ttl_s`;
* make `watch()` survive backend restarts: after reconnecting it reconciles with
  the current records, yielding PUT for new/changed ones and DELETE for gone ones.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

import msgspec

from dynamo_gateway.protocol.engine import WorkerRole


class WorkerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker announces about itself."""

    worker_id: str
    model: str  # the served model name clients ask for
    model_path: str  # local directory holding config.json and the tokenizer
    address: str  # request-plane address: "inproc://<id>" or "tcp://host:port"
    role: WorkerRole = WorkerRole.AGGREGATED
    block_size: int = 16
    kv_blocks_total: int = 0
    max_model_len: int = 0
    # The worker's own HTTP status endpoint (/health, /metrics): "http://host:port", or "".
    status_address: str = ""
    # True while the worker drains: finish in-flight requests, route no new ones to it.
    draining: bool = False


class ChangeKind(enum.Enum):
    PUT = "put"  # a worker appeared (or updated its record)
    DELETE = "delete"  # a worker left or its lease expired


def encode_record(record: WorkerRecord) -> bytes:
    """A record as JSON bytes (what the file and etcd backends store)."""
    return msgspec.json.encode(record)


def decode_record(data: bytes) -> WorkerRecord:
    """Inverse of `encode_record`; raises `msgspec.DecodeError` on a bad value."""
    return msgspec.json.decode(data, type=WorkerRecord)


class DiscoveryEvent(msgspec.Struct, frozen=True):
    kind: ChangeKind
    record: WorkerRecord


@runtime_checkable
class Discovery(Protocol):
    async def start(self) -> None:
        """Connect to the backend; called once before any other method."""

    async def register(self, record: WorkerRecord) -> None:
        """Announce a worker (or replace its record); it stays until `deregister()` or
        its lease lapses."""

    async def deregister(self, worker_id: str) -> None:
        """Withdraw a worker; unknown ids are ignored."""

    async def list(self) -> list[WorkerRecord]:
        """Every registered worker now."""
        ...

    def watch(self) -> AsyncIterator[DiscoveryEvent]:
        """The current workers as PUT events, then every change, until `aclose()`."""
        ...

    async def aclose(self) -> None:
        """Stop watches and release the backend (leases of workers registered here end)."""


class MemoryDiscovery:
    """Discovery inside one process: the embedded default. No leases are needed
    because a worker that dies takes the whole process with it."""

    def __init__(self) -> None:
        self._records: dict[str, WorkerRecord] = {}
        self._watchers: list[asyncio.Queue[DiscoveryEvent | None]] = []
        self._closed = False

    async def start(self) -> None:
        pass

    async def register(self, record: WorkerRecord) -> None:
        self._records[record.worker_id] = record
        self._notify(DiscoveryEvent(ChangeKind.PUT, record))

    async def deregister(self, worker_id: str) -> None:
        record = self._records.pop(worker_id, None)
        if record is not None:
            self._notify(DiscoveryEvent(ChangeKind.DELETE, record))

    async def list(self) -> list[WorkerRecord]:
        return list(self._records.values())

    async def watch(self) -> AsyncIterator[DiscoveryEvent]:
        queue: asyncio.Queue[DiscoveryEvent | None] = asyncio.Queue()
        for record in self._records.values():
            queue.put_nowait(DiscoveryEvent(ChangeKind.PUT, record))
        if self._closed:
            queue.put_nowait(None)
        self._watchers.append(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._watchers.remove(queue)

    async def aclose(self) -> None:
        self._closed = True
        for queue in self._watchers:
            queue.put_nowait(None)

    def _notify(self, event: DiscoveryEvent) -> None:
        for queue in self._watchers:
            queue.put_nowait(event)
