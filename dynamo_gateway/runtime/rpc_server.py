"""The worker side of the request plane: serves one engine over TCP.

Each connection multiplexes many streams (see `wire`). A `Call` runs the
engine's `generate()` in a task of its own and sends every output as an `Out`
frame; `Cancel`, a closed connection or the call's deadline close the engine
stream, which aborts the request in the engine and frees its KV blocks.

Writes are batched: frames queued during one event-loop iteration go out in a
single `transport.write()`. When the socket's send buffer fills (a slow
frontend), stream tasks wait before producing more; the engine keeps running
and coalesces the tokens of a waiting request into its next output.

Shutdown has two stages. `begin_drain()` refuses new calls with a retryable
`Fail` (the frontend sends them elsewhere) and lets running ones finish;
`aclose()`, called once the engine has been stopped with `stopping` set, sends
the aborted streams' retryable `Fail`s and closes the connections, so the
frontend resumes those requests on another worker. (Streams of an engine that
is still running get 2 s, then lose their connection: also retryable.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from dynamo_gateway.engines.base import Engine
from dynamo_gateway.errors import ClientError, EngineError
from dynamo_gateway.protocol.engine import FinishReason
from dynamo_gateway.runtime.framing import FrameConnection
from dynamo_gateway.runtime.wire import (
    Call,
    Cancel,
    Fail,
    Frame,
    Out,
    Reply,
    Rpc,
    encode_result,
)
from dynamo_gateway.telemetry import tracing
from dynamo_gateway.telemetry.logs import REQUEST_ID, TRACE_ID, trace_id_of

log = logging.getLogger(__name__)


class RequestPlaneServer:
    """Serves `engine` on ``tcp://host:port`` (port 0 picks a free one)."""

    def __init__(
        self, engine: Engine, *, host: str = "127.0.0.1", port: int = 0, worker_id: str = ""
    ) -> None:
        self.engine = engine
        self.worker_id = worker_id  # names the engine spans (tracing on)
        self.host = host
        self.port = port
        self.draining = False
        self.stopping = False
        self.requests_served = 0
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_ServerConnection] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight = 0

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def inflight(self) -> int:
        """Generation streams running now."""
        return self._inflight

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def begin_drain(self) -> None:
        """Refuse new calls (retryably); running ones go on."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no stream runs; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """End every stream (retryably) and close every connection."""
        self.draining = self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            await conn.shutdown()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    # -- bookkeeping for the connections ------------------------------------------------

    def _stream_started(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def _stream_ended(self) -> None:
        self._inflight -= 1
        self.requests_served += 1
        if self._inflight == 0:
            self._idle.set()


class _ServerConnection(FrameConnection):
    def __init__(self, server: RequestPlaneServer) -> None:
        super().__init__()
        self._server = server
        self._writable = asyncio.Event()
        self._writable.set()
        self._tasks: dict[int, asyncio.Task[None]] = {}

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server._conns.add(self)

    def frames_received(self, frames: list[Frame]) -> None:
        for frame in frames:
            self._dispatch(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._conns.discard(self)
        self._transport = None
        self._writable.set()
        for task in self._tasks.values():
            task.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- frames ---------------------------------------------------------------------------

    def _dispatch(self, frame: Frame) -> None:
        if isinstance(frame, Call):
            if frame.stream in self._tasks:
                self.send(Fail(frame.stream, "stream id already in use"))
            elif self._server.draining:
                self.send(Fail(frame.stream, "worker is draining", retryable=True))
            else:
                self._server._stream_started()
                self._tasks[frame.stream] = self.loop.create_task(self._generate(frame))
        elif isinstance(frame, Cancel):
            task = self._tasks.get(frame.stream)
            if task is not None:
                task.cancel()
        elif isinstance(frame, Rpc):
            self.loop.create_task(self._rpc(frame))
        else:
            log.warning("request plane: unexpected %s frame from a frontend", type(frame).__name__)

    async def _generate(self, call: Call) -> None:
        server = self._server
        stream = call.stream
        request = call.request
        outputs: Any = None
        # This task serves one request: its log lines carry the client's request id.
        context = request.context
        if context is not None:
            REQUEST_ID.set(context.request_id or None)
            TRACE_ID.set(trace_id_of(context.traceparent))
        log.debug("request plane: stream %d runs %s", stream, request.request_id)
        try:
            # Inside the try: an engine may reject a request as soon as generate() is called.
            outputs = tracing.engine_call(server.worker_id, request, server.engine.generate)
            async with asyncio.timeout(call.timeout_s):
                async for out in outputs:
                    if out.finish_reason is FinishReason.ABORT and server.stopping:
                        self.send(Fail(stream, "worker is shutting down", retryable=True))
                        return
                    self.send(Out(stream, out))
                    if out.finish_reason is not None:
                        return
                    if not self._writable.is_set():
                        await self._writable.wait()
            self.send(Fail(stream, "engine stream ended without a finish reason"))
        except TimeoutError:
            self.send(Fail(stream, f"request deadline of {call.timeout_s} s exceeded"))
        except EngineError as exc:
            # An engine that stopped or failed as a whole: another worker may do better.
            self.send(Fail(stream, str(exc), retryable=server.stopping))
        except ClientError as exc:  # the request itself is wrong for this engine
            self.send(Fail(stream, exc.message, client_status=exc.status, param=exc.param))
        except asyncio.CancelledError:
            pass  # Cancel frame or lost connection: nobody is waiting for an answer
        except Exception as exc:  # a bug in the engine; the stream, not the worker, ends
            log.exception("request plane: stream %d failed", stream)
            self.send(Fail(stream, f"worker error: {exc!r}"))
        finally:
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            self._tasks.pop(stream, None)
            server._stream_ended()

    async def _rpc(self, rpc: Rpc) -> None:
        engine = self._server.engine
        try:
            result: Any
            if rpc.method == "health":
                await engine.check_health()
                result = None
            elif rpc.method == "load":
                result = engine.load()
            elif rpc.method == "kv_snapshot":
                snapshot = getattr(engine, "kv_snapshot", None)
                if snapshot is None:
                    raise EngineError("this engine does not take KV snapshots")
                result = snapshot()
            else:
                raise EngineError(f"unknown method {rpc.method!r}")
            self.send(Reply(rpc.stream, encode_result(result)))
        except Exception as exc:
            self.send(Reply(rpc.stream, error=str(exc) or repr(exc)))

    # -- writing ----------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Let the streams send their retryable `Fail`, flush, and close."""
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        self.flush()
        if self._transport is not None:
            self._transport.close()
