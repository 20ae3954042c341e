"""A minimal, low-overhead HTTP/1.1 client for the load generator.

The load generator shares a small machine with the server under test, so every microsecond
it spends per SSE event is stolen from the thing being measured. General-purpose clients
(httpx, aiohttp) cost several times more per event, hence this purpose-built one:

* :class:`ResponseParser` - a pure, incremental HTTP/1.1 response parser (status line,
  headers, ``Content-Length`` / ``chunked`` / read-until-close bodies). No sockets, so it is
  unit-testable by feeding byte sequences split anywhere.
* :class:`SSEDecoder` - a pure, incremental Server-Sent-Events splitter that returns the
  ``data`` payloads of complete events.
* :class:`HTTPConnection` - an :class:`asyncio.Protocol` that runs one request at a time
  on a keep-alive connection and hands body bytes (with their arrival timestamp) to a
  :class:`ResponseHandler` straight from ``data_received``, without a coroutine switch per
  read.
* :class:`HTTPClient` - one persistent connection to one origin, reconnecting on demand.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Protocol, cast
from urllib.parse import urlsplit

__all__ = [
    "BufferingHandler",
    "HTTPClient",
    "HTTPConnection",
    "HTTPParseError",
    "ResponseHandler",
    "ResponseParser",
    "SSEDecoder",
    "StaleConnectionError",
    "Target",
    "build_request",
    "fetch",
    "parse_target",
]

#: Largest status line + header block accepted (a sanity limit, not a tuning knob).
MAX_HEAD_BYTES = 64 * 1024
#: Longest chunk-size or trailer line accepted.
MAX_LINE_BYTES = 8 * 1024


class HTTPParseError(Exception):
    """The server sent something that is not a valid HTTP/1.1 response."""


class StaleConnectionError(ConnectionError):
    """A reused keep-alive connection was closed before any response byte arrived.

    The request was most likely never processed, so it is safe to retry it once.
    """


# Parser states (plain ints: compared on every read, so kept cheap).
_HEAD = 0
_LENGTH = 1
_CHUNK_SIZE = 2
_CHUNK_DATA = 3
_CHUNK_CRLF = 4
_TRAILERS = 5
_UNTIL_CLOSE = 6
_DONE = 7


class ResponseParser:
    """Incremental parser for one HTTP/1.1 response.

    Call :meth:`feed` with whatever bytes arrived; it returns the (de-chunked) body bytes
    contained in them, possibly ``b""``. After the call, :attr:`head_complete` tells whether
    :attr:`status` / :attr:`headers` are known and :attr:`complete` whether the message
    ended. Bytes after the end of the message are kept in :attr:`excess` (a server that
    pipelines unsolicited data is broken; the caller closes the connection).
    """

    __slots__ = (
        "_buf",
        "_remaining",
        "_state",
        "complete",
        "excess",
        "head_complete",
        "headers",
        "keep_alive",
        "received_any",
        "status",
    )

    def __init__(self) -> None:
        self._buf = b""
        self._state = _HEAD
        self._remaining = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = True
        self.head_complete = False
        self.complete = False
        self.received_any = False
        self.excess = b""

    def feed(self, data: bytes) -> bytes:
        """Consume ``data`` and return the body bytes it contained."""
        if self._state == _CHUNK_SIZE and not self._buf:
            # Hot path: a streamed response whose read holds exactly one whole chunk (what
            # most reads of an SSE stream look like). Anything else takes the general path.
            eol = data.find(b"\r\n")
            if eol > 0:
                try:
                    size = int(data[:eol], 16)
                except ValueError:
                    size = 0
                if size > 0 and eol + size + 4 == len(data) and data.endswith(b"\r\n"):
                    return data[eol + 2 : eol + 2 + size]
        if data:
            self.received_any = True
        if self._buf:
            data = self._buf + data
            self._buf = b""
        state = self._state
        if state == _DONE:
            self.excess += data
            return b""
        pos = 0
        n = len(data)
        parts: list[bytes] = []
        while pos < n:
            if state == _CHUNK_SIZE:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > MAX_LINE_BYTES:
                        raise HTTPParseError("chunk size line too long")
                    break
                try:
                    size = int(data[pos:eol], 16)
                except ValueError:
                    size = _chunk_size_slow(data[pos:eol])
                if size < 0:
                    raise HTTPParseError(f"bad chunk size {data[pos:eol][:40]!r}")
                start = eol + 2
                if size == 0:
                    pos = start
                    state = _TRAILERS
                    continue
                end = start + size
                if end + 2 <= n:
                    # Fast path: the whole chunk and its CRLF are here (the common case
                    # for SSE, where each event is one chunk).
                    if data[end : end + 2] != b"\r\n":
                        raise HTTPParseError("missing CRLF after chunk data")
                    parts.append(data[start:end])
                    pos = end + 2
                    continue
                pos = start
                self._remaining = size
                state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                end = pos + self._remaining
                if end <= n:
                    parts.append(data[pos:end])
                    pos = end
                    self._remaining = 0
                    state = _CHUNK_CRLF
                else:
                    parts.append(data[pos:])
                    self._remaining -= n - pos
                    pos = n
            elif state == _CHUNK_CRLF:
                if n - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise HTTPParseError("missing CRLF after chunk data")
                pos += 2
                state = _CHUNK_SIZE
            elif state == _LENGTH:
                end = pos + self._remaining
                if end <= n:
                    parts.append(data[pos:end])
                    pos = end
                    self._remaining = 0
                    state = _DONE
                else:
                    parts.append(data[pos:])
                    self._remaining -= n - pos
                    pos = n
            elif state == _HEAD:
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > MAX_HEAD_BYTES:
                        raise HTTPParseError("response head too large")
                    break
                state = self._parse_head(data[pos:end])
                pos = end + 4
            elif state == _TRAILERS:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > MAX_LINE_BYTES:
                        raise HTTPParseError("trailer line too long")
                    break
                empty_line = eol == pos  # the blank line ending the trailer section
                pos = eol + 2
                if empty_line:
                    state = _DONE
            elif state == _UNTIL_CLOSE:
                parts.append(data[pos:] if pos else data)
                pos = n
            else:  # _DONE
                break
        self._state = state
        if pos < n:
            if state == _DONE:
                self.excess += data[pos:]
            else:
                self._buf = data[pos:]
        if state == _DONE:
            self.complete = True
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def feed_eof(self) -> None:
        """The peer closed the connection.

        Completes a read-until-close body; for any other state the message stays incomplete
        (the caller reports the truncation).
        """
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            self.complete = True

    def _parse_head(self, head: bytes) -> int:
        """Parse a status line + header block and return the next state."""
        lines = head.split(b"\r\n")
        status_line = lines[0]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HTTPParseError(f"bad status line {status_line[:80]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise HTTPParseError(f"bad status line {status_line[:80]!r}") from None
        if status < 100 or status > 999:
            raise HTTPParseError(f"bad status code {status}")
        headers: dict[str, str] = {}
        for raw in lines[1:]:
            colon = raw.find(b":")
            if colon <= 0:
                raise HTTPParseError(f"bad header line {raw[:80]!r}")
            name = raw[:colon].strip().lower().decode("latin-1")
            value = raw[colon + 1 :].strip().decode("latin-1")
            prev = headers.get(name)
            headers[name] = value if prev is None else f"{prev}, {value}"
        if 100 <= status < 200:
            # Interim response (e.g. 100 Continue): the real one follows.
            return _HEAD
        self.status = status
        self.headers = headers
        self.head_complete = True
        connection = headers.get("connection", "").lower()
        if parts[0] == b"HTTP/1.0":
            self.keep_alive = "keep-alive" in connection
        else:
            self.keep_alive = "close" not in connection
        if status in (204, 304):
            return _DONE
        te = headers.get("transfer-encoding")
        if te is not None:
            if te.lower().rsplit(",", 1)[-1].strip() != "chunked":
                raise HTTPParseError(f"unsupported transfer-encoding {te!r}")
            return _CHUNK_SIZE
        cl = headers.get("content-length")
        if cl is not None:
            try:
                length = int(cl)
            except ValueError:
                raise HTTPParseError(f"bad content-length {cl!r}") from None
            if length < 0:
                raise HTTPParseError(f"bad content-length {cl!r}")
            if length == 0:
                return _DONE
            self._remaining = length
            return _LENGTH
        self.keep_alive = False
        return _UNTIL_CLOSE


def _chunk_size_slow(line: bytes) -> int:
    """Chunk size of a line with chunk extensions (``1a;name=value``), which are ignored."""
    semi = line.find(b";")
    try:
        return int(line[:semi] if semi >= 0 else line, 16)
    except ValueError:
        raise HTTPParseError(f"bad chunk size {line[:40]!r}") from None


class SSEDecoder:
    """Incremental Server-Sent-Events splitter.

    :meth:`feed` returns the ``data`` payload of each event completed by the new bytes.
    Events are separated by a blank line; ``\\r\\n`` line endings are normalised (a lone
    ``\\r`` terminator is not supported). The common single-line ``data: ...`` event takes a
    fast path without line splitting.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return the payloads of the events it completed."""
        if (
            not self._buf
            and data.endswith(b"\n\n")
            and data.startswith(b"data: ")
            and data.find(b"\n") == len(data) - 2
        ):
            # Hot path: exactly one complete single-line event (the first newline being
            # the terminating ``\n\n`` means there is no other line).
            return [data[6:-2]]
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            # Normalise on the joined buffer so a CRLF split across reads is handled too.
            buf = buf.replace(b"\r\n", b"\n")
        parts = buf.split(b"\n\n")
        self._buf = parts.pop()
        out: list[bytes] = []
        for event in parts:
            if event.startswith(b"data: ") and b"\n" not in event:
                out.append(event[6:])
            elif event:
                payload = _slow_event(event)
                if payload is not None:
                    out.append(payload)
        return out

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has not been terminated yet."""
        return self._buf


def _slow_event(event: bytes) -> bytes | None:
    """General SSE event parsing: joins ``data`` fields, ignores comments / other fields."""
    data_lines: list[bytes] = []
    for line in event.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        colon = line.find(b":")
        if colon < 0:
            field, value = line, b""
        else:
            field, value = line[:colon], line[colon + 1 :]
            if value.startswith(b" "):
                value = value[1:]
        if field == b"data":
            data_lines.append(value)
    if not data_lines:
        return None
    return data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines)


class ResponseHandler(Protocol):
    """Receives one response's parts as they arrive (called from ``data_received``).

    Implementations must not raise for bad *content*; they record the problem and ignore
    the rest. An exception aborts the request and closes the connection.
    """

    def on_head(self, status: int, headers: Mapping[str, str]) -> None:
        """Status line and headers are known."""

    def on_body(self, data: bytes, t: float) -> None:
        """``data`` (de-chunked body bytes) arrived at ``perf_counter()`` time ``t``."""


class BufferingHandler:
    """A :class:`ResponseHandler` that keeps the whole response in memory."""

    __slots__ = ("_parts", "headers", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: Mapping[str, str] = {}
        self._parts: list[bytes] = []

    def on_head(self, status: int, headers: Mapping[str, str]) -> None:
        self.status = status
        self.headers = headers

    def on_body(self, data: bytes, t: float) -> None:
        self._parts.append(data)

    @property
    def body(self) -> bytes:
        """The body received so far."""
        return b"".join(self._parts)


class HTTPConnection(asyncio.Protocol):
    """One HTTP/1.1 connection running one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.requests_done = 0
        self._parser: ResponseParser | None = None
        self._handler: ResponseHandler | None = None
        self._waiter: asyncio.Future[float] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence a cast.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        t = perf_counter()
        parser = self._parser
        handler = self._handler
        if parser is None or handler is None:
            # Unsolicited bytes between requests: the connection is out of sync.
            self.close()
            return
        try:
            head_was_complete = parser.head_complete
            body = parser.feed(data)
            if not head_was_complete and parser.head_complete:
                handler.on_head(parser.status, parser.headers)
            if body:
                handler.on_body(body, t)
        except Exception as exc:
            self._fail(exc)
            self.close()
            return
        if parser.complete:
            self._finish(t, parser)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        parser = self._parser
        if parser is None:
            return
        parser.feed_eof()
        if parser.complete:
            self._finish(perf_counter(), parser)
            return
        if not parser.received_any and self.requests_done > 0:
            err: Exception = StaleConnectionError("keep-alive connection closed by server")
        else:
            detail = f": {exc}" if exc is not None else ""
            err = ConnectionError(f"connection closed before the response was complete{detail}")
        self._fail(err)

    # -- API ----------------------------------------------------------------------------
    def request(self, data: bytes, handler: ResponseHandler) -> asyncio.Future[float]:
        """Send the serialized request ``data``; the future resolves to the completion time.

        The bytes are written synchronously, so a timestamp taken just before this call is
        the request's send time.
        """
        if self.closed or self.transport is None:
            raise StaleConnectionError("connection is closed")
        if self._waiter is not None:
            raise RuntimeError("a request is already in flight on this connection")
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._parser = ResponseParser()
        self._handler = handler
        self._waiter = waiter
        self.transport.write(data)
        return waiter

    def close(self) -> None:
        """Close the transport (idempotent)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- internals ----------------------------------------------------------------------
    def _finish(self, t: float, parser: ResponseParser) -> None:
        waiter = self._waiter
        self._parser = None
        self._handler = None
        self._waiter = None
        self.requests_done += 1
        if not parser.keep_alive or parser.excess:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(t)

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        self._parser = None
        self._handler = None
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect, parsed from a base URL."""

    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def host_header(self) -> str:
        """Value for the ``Host`` request header."""
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def parse_target(url: str) -> Target:
    """Split ``http(s)://host[:port][/base]`` into a :class:`Target`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme in {url!r} (use http:// or https://)")
    if not parts.hostname:
        raise ValueError(f"no host in URL {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Target(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def build_request(
    method: str,
    path: str,
    target: Target,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
) -> bytes:
    """Serialize a complete HTTP/1.1 request (always with ``Content-Length`` for a body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {target.host_header}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


class HTTPClient:
    """A single persistent connection to ``target``, (re)opened on demand."""

    def __init__(self, target: Target, connect_timeout: float = 30.0) -> None:
        self.target = target
        self.connect_timeout = connect_timeout
        self.connects = 0
        self._conn: HTTPConnection | None = None
        self._ssl: ssl_module.SSLContext | None = (
            ssl_module.create_default_context() if target.scheme == "https" else None
        )

    async def _connect(self) -> HTTPConnection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await loop.create_connection(
                HTTPConnection,
                self.target.host,
                self.target.port,
                ssl=self._ssl,
                server_hostname=self.target.host if self._ssl is not None else None,
            )
        self.connects += 1
        self._conn = conn
        return conn

    async def connect(self) -> None:
        """Open the connection now (if not open), so the first request does not pay for it."""
        if self._conn is None or self._conn.closed:
            await self._connect()

    async def request(self, data: bytes, handler: ResponseHandler) -> float:
        """Send ``data`` and wait for the response; returns the completion timestamp.

        A request that finds its reused connection closed by the server before any response
        byte (the keep-alive race) is retried once on a fresh connection.
        """
        for attempt in (0, 1):
            conn = self._conn
            if conn is None or conn.closed:
                conn = await self._connect()
            try:
                return await conn.request(data, handler)
            except StaleConnectionError:
                conn.close()
                self._conn = None
                if attempt:
                    raise
            except BaseException:
                # Timeout / cancellation / error mid-response: the connection is unusable.
                conn.close()
                self._conn = None
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection if open."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


async def fetch(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One-off request (readiness probes and the like): returns ``(status, body)``."""
    target = parse_target(url)
    path = urlsplit(url).path or "/"
    query = urlsplit(url).query
    if query:
        path = f"{path}?{query}"
    all_headers = {"Connection": "close"}
    if body is not None:
        all_headers["Content-Type"] = "application/json"
    all_headers.update(headers or {})
    client = HTTPClient(target, connect_timeout=timeout)
    handler = BufferingHandler()
    try:
        async with asyncio.timeout(timeout):
            await client.request(build_request(method, path, target, all_headers, body), handler)
    finally:
        client.close()
    return handler.status, handler.body
