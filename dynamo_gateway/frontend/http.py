"""HTTP plumbing: bounded body reading, disconnects, error responses.

API keys and admission are the tenants' business (`dynamo_gateway.frontend.tenants`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dynamo_gateway.errors import (
    ClientError,
    EngineError,
    PayloadTooLargeError,
    RequestTimeoutError,
)
from dynamo_gateway.frontend.encoding import error_body

log = logging.getLogger(__name__)


def error_response(exc: ClientError) -> Response:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    body = error_body(exc.message, exc.type, param=exc.param, code=exc.code)
    return JSONBytes(msgspec.json.encode(body), status_code=exc.status, headers=headers)


class JSONBytes(Response):
    media_type = "application/json"


async def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The whole body, or PayloadTooLargeError as soon as it passes `limit` bytes, or
    RequestTimeoutError when it has not all arrived after `timeout` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body is larger than the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(
                        f"request body is larger than the limit of {limit} bytes"
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(
            f"request body not received in full within {timeout:g} s ({size} bytes came)"
        ) from None
    return b"".join(chunks)


class DisconnectWatcher:
    """Cancels the request's task when the client goes away.

    Once the body is read, the next ASGI message is `http.disconnect`; waiting
    for it in a side task turns a vanished client into a cancellation of the
    request task, which unwinds the engine stream and aborts the request there.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.disconnected = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        owner = asyncio.current_task()
        assert owner is not None

        async def watch() -> None:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                    owner.cancel()
                    return

        self._task = asyncio.get_running_loop().create_task(watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def absorb(self) -> bool:
        """Call in `except CancelledError`: True if it was our cancellation (swallowed)."""
        if not self.disconnected:
            return False
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True


class SSEResponse(Response):
    """Runs a producer that emits SSE chunks; ends quietly if the client leaves.

    The status line goes out with the first chunk: a request the engine refuses
    (a `ClientError` before any output, e.g. a constraint it cannot honour) still
    gets its 4xx and an OpenAI error body. A `ClientError` after the first chunk
    ends the stream with an error event.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        producer: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]],
        watcher: DisconnectWatcher,
        on_close: Callable[[bool, int], None],
    ) -> None:
        self.status_code = 200
        self.background = None
        self._producer = producer
        self._watcher = watcher
        self._on_close = on_close
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False
        started = False
        client_gone = False  # a send failed: the OSError is the client's, not a bug

        async def emit(chunk: bytes) -> None:
            nonlocal started, client_gone
            try:
                if not started:
                    started = True
                    await send(
                        {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                    )
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except OSError:
                client_gone = True
                raise

        try:
            try:
                await self._producer(emit)
            except ClientError as exc:
                if not started:
                    self.status_code = exc.status
                    await error_response(exc)(scope, receive, send)
                    return
                body = error_body(exc.message, exc.type, param=exc.param, code=exc.code)
                await emit(b"data: " + msgspec.json.encode(body) + b"\n\n")
            except Exception as exc:  # the engine failed, or a bug: still an OpenAI error
                if client_gone:
                    raise
                self.status_code = 500
                body = _server_error(exc)
                if not started:
                    await JSONBytes(msgspec.json.encode(body), status_code=500)(
                        scope, receive, send
                    )
                    return
                await emit(b"data: " + msgspec.json.encode(body) + b"\n\n")
            if not started:
                await emit(b"")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not self._watcher.absorb():
                raise
            disconnected = True
        except OSError:  # the server reports a vanished peer on send
            disconnected = True
        finally:
            self._watcher.stop()
            self._on_close(disconnected, self.status_code)


def _server_error(exc: Exception) -> dict[str, Any]:
    """The error body of a stream that failed on the server's side (logged here)."""
    if isinstance(exc, EngineError):  # the engine failed and migration could not help
        log.error("engine error in a stream: %s", exc)
        return error_body(str(exc), exc.type, code=exc.code)
    log.error("unhandled error in a stream", exc_info=exc)
    return error_body("internal server error", "server_error", code="internal_error")
