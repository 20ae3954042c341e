"""The frontend side of the request plane: workers in other processes.

`RemoteWorker` is a `WorkerHandle` for a ``tcp://host:port`` worker. It keeps a
small pool of connections (opened on first use, replaced when they break) and
puts each new stream on the connection with the fewest streams. A stream is an
async iterator of `EngineOutput`s; closing it early sends `Cancel`, so the
worker aborts the request. A broken connection, or a worker that refuses or
gives up a request retryably (draining, shutting down), ends the stream with
`WorkerLostError`, which the pool turns into a migration.

When outputs arrive faster than the consumer reads them, the stream merges the
waiting deltas into one, as the engines do, so a busy frontend handles fewer,
larger deltas instead of falling behind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec

from dynamo_gateway.errors import (
    ClientError,
    ConfigError,
    EngineError,
    InvalidRequestError,
    WorkerLostError,
)
from dynamo_gateway.protocol.engine import EngineOutput, EngineRequest, LoadMetrics
from dynamo_gateway.protocol.kv_events import KvSnapshot
from dynamo_gateway.router.base import WorkerView
from dynamo_gateway.runtime.discovery import WorkerRecord
from dynamo_gateway.runtime.framing import FrameConnection
from dynamo_gateway.runtime.wire import (
    Call,
    Cancel,
    Fail,
    Frame,
    Out,
    Reply,
    Rpc,
)
from dynamo_gateway.telemetry import tracing

log = logging.getLogger(__name__)

T = TypeVar("T")

RPC_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0


def parse_tcp_address(address: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (host, port); `ConfigError` otherwise."""
    scheme, sep, rest = address.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not host or not port.isdigit():
        raise ConfigError(f"not a request-plane address: {address!r} (want tcp://host:port)")
    return host.strip("[]"), int(port)


class _Stream:
    """One request's outputs as they arrive; iterate it once."""

    __slots__ = ("_conn", "_done", "_error", "_items", "_waiter", "id")

    def __init__(self, conn: _ClientConnection, stream_id: int) -> None:
        self._conn = conn
        self.id = stream_id
        self._items: collections.deque[EngineOutput] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._done = False  # a finish_reason or an error arrived

    # -- fed by the connection ----------------------------------------------------------

    def push(self, out: EngineOutput) -> None:
        self._items.append(out)
        if out.finish_reason is not None:
            self._done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self._done:
            self._done = True
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the frontend -------------------------------------------------------------

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> EngineOutput:
        items = self._items
        while not items:
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            waiter = self._waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        out = items.popleft()
        if items:
            out = _merge(out, items)
        return out

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._conn.cancel(self.id)
        self._conn.streams.pop(self.id, None)


def _failure(worker_id: str, frame: Fail) -> Exception:
    """The error a `Fail` frame stands for: the worker refused the request (the client's
    4xx, as the engine raised it), it may be resumed elsewhere, or it failed."""
    if frame.client_status is not None:
        error: ClientError = InvalidRequestError(frame.message, param=frame.param)
        error.status = frame.client_status
        return error
    if frame.retryable:
        return WorkerLostError(f"worker {worker_id}: {frame.message}")
    return EngineError(f"worker {worker_id}: {frame.message}")


def _merge(first: EngineOutput, rest: collections.deque[EngineOutput]) -> EngineOutput:
    """`first` plus the deltas queued behind it, as one delta."""
    tokens = list(first.token_ids)
    logprobs = list(first.logprobs) if first.logprobs is not None else None
    last = first
    while rest and last.finish_reason is None:
        last = rest.popleft()
        tokens.extend(last.token_ids)
        if last.logprobs:
            logprobs = (logprobs or []) + list(last.logprobs)
    return EngineOutput(
        token_ids=tokens,
        finish_reason=last.finish_reason,
        cached_tokens=first.cached_tokens,
        logprobs=logprobs,
        error=last.error,
        kv_transfer_params=last.kv_transfer_params,
    )


class _ClientConnection(FrameConnection):
    """One TCP connection to a worker, carrying many streams."""

    def __init__(self, worker_id: str) -> None:
        super().__init__()
        self.worker_id = worker_id
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self._rpcs: dict[int, asyncio.Future[Reply]] = {}
        self._next_id = 1

    @property
    def load(self) -> int:
        return len(self.streams) + len(self._rpcs)

    def frames_received(self, frames: list[Frame]) -> None:
        streams = self.streams
        for frame in frames:
            if isinstance(frame, Out):
                stream = streams.get(frame.stream)
                if stream is not None:
                    stream.push(frame.output)
                    if frame.output.finish_reason is not None:
                        del streams[frame.stream]
            elif isinstance(frame, Fail):
                stream = streams.pop(frame.stream, None)
                if stream is not None:
                    stream.fail(_failure(self.worker_id, frame))
            elif isinstance(frame, Reply):
                future = self._rpcs.pop(frame.stream, None)
                if future is not None and not future.done():
                    future.set_result(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        error = WorkerLostError(f"lost the connection to worker {self.worker_id}")
        for stream in self.streams.values():
            stream.fail(error)
        self.streams.clear()
        for future in self._rpcs.values():
            if not future.done():
                future.set_exception(error)
        self._rpcs.clear()

    # -- calls ----------------------------------------------------------------------------

    def _new_id(self) -> int:
        stream_id = self._next_id
        self._next_id += 1
        return stream_id

    def call(self, request: EngineRequest, timeout_s: float | None) -> _Stream:
        stream = _Stream(self, self._new_id())
        if self.closed:
            stream.fail(WorkerLostError(f"lost the connection to worker {self.worker_id}"))
            return stream
        self.streams[stream.id] = stream
        self.send(Call(stream.id, request, timeout_s))
        return stream

    def cancel(self, stream_id: int) -> None:
        if self.streams.pop(stream_id, None) is not None:
            self.send(Cancel(stream_id))

    async def rpc(self, method: str, timeout: float) -> Reply:
        if self.closed:
            raise WorkerLostError(f"lost the connection to worker {self.worker_id}")
        stream_id = self._new_id()
        future: asyncio.Future[Reply] = self.loop.create_future()
        self._rpcs[stream_id] = future
        self.send(Rpc(stream_id, method))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise EngineError(
                f"worker {self.worker_id} did not answer {method!r} within {timeout} s"
            ) from None
        finally:
            self._rpcs.pop(stream_id, None)


class RemoteCall:
    """The outputs of one request on a remote worker (connects on first use)."""

    __slots__ = ("_request", "_stream", "_worker")

    def __init__(self, worker: RemoteWorker, request: EngineRequest) -> None:
        self._worker = worker
        self._request = request
        self._stream: _Stream | None = None

    def __aiter__(self) -> RemoteCall:
        return self

    async def __anext__(self) -> EngineOutput:
        stream = self._stream
        if stream is None:
            conn = await self._worker.connection()
            stream = self._stream = conn.call(self._request, self._worker.request_timeout_s)
        return await stream.__anext__()

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()


class RemoteWorker:
    """A worker process reached over the request plane."""

    def __init__(
        self,
        record: WorkerRecord,
        *,
        connections: int = 2,
        request_timeout_s: float | None = None,
    ) -> None:
        self.record = record
        self.host, self.port = parse_tcp_address(record.address)
        self.view = WorkerView(
            record.worker_id,
            role=record.role,
            block_size=record.block_size,
            load=LoadMetrics(kv_blocks_total=record.kv_blocks_total),
        )
        self.request_timeout_s = request_timeout_s
        self._max_conns = connections
        self._conns: list[_ClientConnection] = []
        self._connecting: asyncio.Task[_ClientConnection] | None = None
        self._closed = False

    # -- WorkerHandle ----------------------------------------------------------------------

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        # Tracing on: the call's span, whose context the request carries (else as is).
        return tracing.worker_call(self.record.worker_id, request, self._call)

    def _call(self, request: EngineRequest) -> RemoteCall:
        return RemoteCall(self, request)

    async def abort(self, request_id: str) -> None:
        """Requests are aborted by closing their stream; nothing to do by id."""

    def refresh_load(self) -> None:
        """`view.load` follows the worker's load reports on the event plane."""

    async def check_health(self) -> None:
        reply = await self._rpc("health")
        if reply.error is not None:
            raise EngineError(reply.error)

    async def fetch_load(self) -> LoadMetrics:
        return self._result(await self._rpc("load"), LoadMetrics)

    async def kv_snapshot(self) -> KvSnapshot:
        return self._result(await self._rpc("kv_snapshot"), KvSnapshot)

    @property
    def streams(self) -> int:
        """Streams open on this worker now."""
        return sum(len(c.streams) for c in self._conns)

    async def aclose(self) -> None:
        """Close every connection; open streams end with `WorkerLostError`."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        for conn in self._conns:
            conn.close()
        self._conns.clear()

    # -- connections -----------------------------------------------------------------------

    async def connection(self) -> _ClientConnection:
        """The least busy open connection, opening one if the pool is not full."""
        if self._closed:
            raise WorkerLostError(f"worker {self.record.worker_id} was removed")
        conns = self._conns
        if any(c.closed for c in conns):
            conns[:] = [c for c in conns if not c.closed]
        best = min(conns, key=lambda c: c.load, default=None)
        if best is not None and (best.load == 0 or len(conns) >= self._max_conns):
            return best
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        task = self._connecting
        try:
            return await asyncio.shield(task)
        except (WorkerLostError, asyncio.CancelledError):
            if best is not None and not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                return best
            raise
        finally:
            if task.done() and self._connecting is task:
                self._connecting = None

    async def _connect(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        worker_id = self.record.worker_id
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _ClientConnection(worker_id), self.host, self.port),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            raise WorkerLostError(
                f"cannot connect to worker {worker_id} at {self.record.address}: {exc}"
            ) from None
        if self._closed:
            conn.close()
            raise WorkerLostError(f"worker {worker_id} was removed")
        self._conns.append(conn)
        return conn

    async def _rpc(self, method: str) -> Reply:
        conn = await self.connection()
        return await conn.rpc(method, RPC_TIMEOUT_S)

    @staticmethod
    def _result(reply: Reply, type: type[T]) -> T:
        if reply.error is not None:
            raise EngineError(reply.error)
        return msgspec.msgpack.decode(reply.result, type=type)


class RemoteResolver:
    """Resolves ``tcp://`` worker addresses to `RemoteWorker`s."""

    def __init__(self, *, connections: int = 2, request_timeout_s: float | None = None) -> None:
        self._kwargs: dict[str, Any] = {
            "connections": connections,
            "request_timeout_s": request_timeout_s,
        }

    def __call__(self, record: WorkerRecord) -> RemoteWorker:
        return RemoteWorker(record, **self._kwargs)
