"""Request ids in every log line, and the text or JSON-lines log format.

The frontend takes a client's ``X-Request-Id`` (or makes one up), returns it in
the response headers and sets `REQUEST_ID` for the request's task; it travels to
the worker in `EngineRequest.context`, whose request-plane stream task sets it
there too. `RequestContextFilter`, installed on the process's log handler by
`setup_logging`, copies it (and the trace id, when the request is traced) onto
every record, so existing ``log.info(...)`` calls carry it without change.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = [
    "REQUEST_ID",
    "TRACE_ID",
    "JsonFormatter",
    "RequestContextFilter",
    "TextFormatter",
    "new_request_id",
    "request_id_or_new",
    "setup_logging",
    "trace_id_of",
]

# The id of the request this task works for (None outside a request).
REQUEST_ID: ContextVar[str | None] = ContextVar("dynamo_gateway_request_id", default=None)
# The W3C trace id (32 hex digits) of that request, when it is traced.
TRACE_ID: ContextVar[str | None] = ContextVar("dynamo_gateway_trace_id", default=None)

MAX_REQUEST_ID = 128  # characters; a longer client id is replaced, not cut


def new_request_id() -> str:
    return os.urandom(16).hex()


def request_id_or_new(given: bytes | str | None) -> str:
    """The client's request id if it is 1-128 visible ASCII characters, else a new one.

    Anything else (control characters, spaces, non-ASCII, an empty or huge value)
    could forge or break log lines, so it is replaced rather than cleaned.
    """
    if given:
        raw = given.encode("latin-1", "replace") if isinstance(given, str) else given
        if len(raw) <= MAX_REQUEST_ID and all(0x21 <= b <= 0x7E for b in raw):
            return raw.decode("ascii")
    return new_request_id()


def trace_id_of(traceparent: str) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<trace id>-<span id>-<flags>``)."""
    parts = traceparent.split("-")
    if len(parts) >= 4 and len(parts[1]) == 32:
        return parts[1]
    return None


class RequestContextFilter(logging.Filter):
    """Stamps ``request_id`` and ``trace_id`` (None outside a request) on each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.trace_id = TRACE_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [request_id=...]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request_id={rid}]" if rid else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and
    request_id / trace_id / exception / stack when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            entry["request_id"] = rid
        tid = getattr(record, "trace_id", None)
        if tid:
            entry["trace_id"] = tid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # json escapes newlines: a traceback stays on its one line.
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: Literal["text", "json"] = "text") -> None:
    """Log to stderr at `level` in `fmt`, request ids included; replaces earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # warnings become records too: one format on stderr
