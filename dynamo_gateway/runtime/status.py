"""A worker's own HTTP status endpoint: ``/health``, ``/live`` and ``/metrics``.

Deliberately tiny (HTTP/1.1 GET, one request per connection, no framework):
it answers probes from an orchestrator or a person with curl, off the request
plane's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec

log = logging.getLogger(__name__)

# path -> handler returning (status, content type, body)
Handler = Callable[[], Awaitable[tuple[int, str, bytes]]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def json_body(status: int, body: object) -> tuple[int, str, bytes]:
    return status, "application/json", msgspec.json.encode(body)


class StatusServer:
    """Serves `routes` on ``http://host:port`` (port 0 picks a free one)."""

    def __init__(self, routes: dict[str, Handler], *, host: str, port: int) -> None:
        self.routes = routes
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = path.split("?", 1)[0]
            handler = self.routes.get(path)
            if handler is None:
                status, ctype, body = json_body(404, {"error": f"no route {path}"})
            elif method != "GET":
                status, ctype, body = json_body(405, {"error": "only GET"})
            else:
                status, ctype, body = await handler()
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("latin-1")
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ValueError, ConnectionError):
            pass
        except Exception:
            log.exception("status endpoint failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
