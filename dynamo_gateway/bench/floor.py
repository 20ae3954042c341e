"""The "bare SSE floor": a starlette app that streams canned OpenAI chunks and nothing else.

It answers ``/v1/chat/completions`` and ``/v1/completions`` with ``max_tokens`` (default
100) identical one-word chunks shaped like the gateway's, a usage chunk when
``stream_options.include_usage`` is set, and ``data: [DONE]`` - or one JSON body when not
streaming. No tokenization, no engine, no routing: whatever a gateway costs on top of this
under the same ASGI server is the gateway's own overhead.

Run it with::

    python -m dynamo_gateway.bench.floor --host 127.0.0.1 --port 8100 --server uvicorn

``--port 0`` picks a free port; the line ``listening on http://HOST:PORT`` is printed (and
flushed) once the server answers requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from functools import lru_cache
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = ["DEFAULT_MAX_TOKENS", "create_app", "main", "serve"]

#: Tokens streamed when a request does not say ``max_tokens``.
DEFAULT_MAX_TOKENS = 100
#: ``created`` timestamp of every response (fixed: the floor does no per-request work).
_CREATED = 1_700_000_000
_WORD = " token"


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _FloorRequest(msgspec.Struct):
    """The only request fields the floor looks at."""

    model: str = "floor"
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None


_decode_request = msgspec.json.Decoder(_FloorRequest).decode
_encode = msgspec.json.encode


@lru_cache(maxsize=64)
def _canned_chunks(kind: str, model: str) -> tuple[bytes, bytes]:
    """Pre-encoded ``(token chunk, final token chunk)`` SSE events for ``kind``/``model``."""
    if kind == "chat":
        base: dict[str, Any] = {
            "id": "chatcmpl-floor",
            "object": "chat.completion.chunk",
            "created": _CREATED,
            "model": model,
        }

        def choice(finish: str | None) -> dict[str, Any]:
            return {
                "index": 0,
                "delta": {"content": _WORD},
                "logprobs": None,
                "finish_reason": finish,
            }
    else:
        base = {
            "id": "cmpl-floor",
            "object": "text_completion",
            "created": _CREATED,
            "model": model,
        }

        def choice(finish: str | None) -> dict[str, Any]:
            return {"index": 0, "text": _WORD, "logprobs": None, "finish_reason": finish}

    def event(finish: str | None) -> bytes:
        return b"data: " + _encode({**base, "choices": [choice(finish)]}) + b"\n\n"

    return event(None), event("length")


def _usage(n: int) -> dict[str, int]:
    return {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}


def _usage_event(kind: str, model: str, n: int) -> bytes:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    ident = "chatcmpl-floor" if kind == "chat" else "cmpl-floor"
    payload = {
        "id": ident,
        "object": obj,
        "created": _CREATED,
        "model": model,
        "choices": [],
        "usage": _usage(n),
    }
    return b"data: " + _encode(payload) + b"\n\n"


async def _stream(kind: str, model: str, n: int, include_usage: bool) -> AsyncIterator[bytes]:
    chunk, last = _canned_chunks(kind, model)
    for _ in range(n - 1):
        yield chunk
    yield last
    if include_usage:
        yield _usage_event(kind, model, n)
    yield b"data: [DONE]\n\n"


def _full_body(kind: str, model: str, n: int) -> dict[str, Any]:
    text = _WORD * n
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": "length",
        }
        return {
            "id": "chatcmpl-floor",
            "object": "chat.completion",
            "created": _CREATED,
            "model": model,
            "choices": [choice],
            "usage": _usage(n),
        }
    return {
        "id": "cmpl-floor",
        "object": "text_completion",
        "created": _CREATED,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
        "usage": _usage(n),
    }


def _error(status: int, message: str) -> Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": status}}
    return Response(_encode(body), status_code=status, media_type="application/json")


def _endpoint(kind: str) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    async def handler(request: Request) -> Response:
        try:
            req = _decode_request(await request.body())
        except msgspec.DecodeError as exc:
            return _error(400, f"invalid request body: {exc}")
        n = req.max_tokens or req.max_completion_tokens or DEFAULT_MAX_TOKENS
        if n < 1:
            return _error(400, "max_tokens must be >= 1")
        if not req.stream:
            return Response(_encode(_full_body(kind, req.model, n)), media_type="application/json")
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(
            _stream(kind, req.model, n, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    return handler


async def _ok(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "floor", "object": "model"}]})


def create_app() -> Starlette:
    """The floor ASGI app."""
    return Starlette(
        routes=[
            Route("/v1/chat/completions", _endpoint("chat"), methods=["POST"]),
            Route("/v1/completions", _endpoint("completions"), methods=["POST"]),
            Route("/v1/models", _models, methods=["GET"]),
            Route("/ready", _ok, methods=["GET"]),
            Route("/health", _ok, methods=["GET"]),
        ]
    )


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves so ``--port 0`` works and the port is known."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def _announce_when_ready(host: str, port: int) -> None:
    """Print the ``listening on`` line once ``/health`` answers."""
    from dynamo_gateway.bench.httpclient import fetch

    probe_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    probe = f"http://[{probe_host}]:{port}" if ":" in probe_host else f"http://{probe_host}:{port}"
    while True:
        with contextlib.suppress(OSError, TimeoutError, ConnectionError):
            status, _ = await fetch(f"{probe}/health", timeout=2.0)
            if status == 200:
                break
        await asyncio.sleep(0.02)
    shown = f"[{host}]" if ":" in host else host
    print(f"listening on http://{shown}:{port}", flush=True)


async def _serve_hypercorn(app: Starlette, sock: socket.socket) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    config = Config()
    # Hand over the already-bound socket; detach so only hypercorn owns the descriptor.
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    await hypercorn_serve(app, config)


async def _serve_uvicorn(app: Starlette, sock: socket.socket, use_uvloop: bool) -> None:
    import uvicorn

    config = uvicorn.Config(
        app,
        loop="uvloop" if use_uvloop else "asyncio",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    await uvicorn.Server(config).serve(sockets=[sock])


async def serve(host: str, port: int, server: str = "hypercorn", use_uvloop: bool = True) -> None:
    """Serve the floor app until interrupted (runs in the current event loop)."""
    sock = _bind(host, port)
    actual_port = sock.getsockname()[1]
    app = create_app()
    announce = asyncio.create_task(_announce_when_ready(host, actual_port))
    try:
        if server == "hypercorn":
            await _serve_hypercorn(app, sock)
        elif server == "uvicorn":
            await _serve_uvicorn(app, sock, use_uvloop)
        else:
            raise ValueError(f"unknown server {server!r}")
    finally:
        announce.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await announce


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m dynamo_gateway.bench.floor",
        description="Bare SSE floor server: canned OpenAI streaming responses, no work.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100, help="0 picks a free port")
    parser.add_argument("--server", choices=("hypercorn", "uvicorn"), default="hypercorn")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    args = parser.parse_args(argv)
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=_loop_factory(not args.no_uvloop)) as runner,
    ):
        runner.run(serve(args.host, args.port, args.server, not args.no_uvloop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
