"""Request ids and the log formats, without a server."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from dynamo_gateway.cli import _parser, settings_from_args
from dynamo_gateway.telemetry.logs import (
    REQUEST_ID,
    TRACE_ID,
    JsonFormatter,
    RequestContextFilter,
    TextFormatter,
    request_id_or_new,
    trace_id_of,
)


@pytest.mark.parametrize("given", ["abc", "req-1_2.3:4/5", "x" * 128, b"bytes-ok"])
def test_valid_request_ids_are_kept(given: str | bytes) -> None:
    assert request_id_or_new(given) == (given.decode() if isinstance(given, bytes) else given)


@pytest.mark.parametrize("given", [None, "", b"", "x" * 129, "a b", "a\nb", "\x7f", "caf\u00e9"])
def test_invalid_request_ids_are_replaced(given: str | bytes | None) -> None:
    rid = request_id_or_new(given)
    assert rid != given and len(rid) == 32
    assert request_id_or_new(given) != rid  # a new one each time


def test_trace_id_of_traceparent() -> None:
    assert trace_id_of("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") == (
        "0af7651916cd43dd8448eb211c80319c"
    )
    assert trace_id_of("") is None and trace_id_of("garbage") is None


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logging.StreamHandler[io.StringIO]]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestContextFilter())
    logger = logging.getLogger("dynamo_gateway.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield logger, out, handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_json_lines_carry_the_request_context(
    capture: tuple[logging.Logger, io.StringIO, logging.StreamHandler[io.StringIO]],
) -> None:
    logger, out, handler = capture
    handler.setFormatter(JsonFormatter())
    logger.info("outside")
    rid, tid = REQUEST_ID.set("r-9"), TRACE_ID.set("ab" * 16)
    try:
        logger.warning("inside %s", "a request")
        try:
            raise ValueError("boom\nwith a second line")
        except ValueError:
            logger.exception("failed")
    finally:
        REQUEST_ID.reset(rid)
        TRACE_ID.reset(tid)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    outside, inside, failed = (json.loads(line) for line in lines)
    assert set(outside) == {"time", "level", "logger", "message"}
    assert outside["time"].endswith("+00:00") and outside["level"] == "INFO"
    assert inside == {
        "time": inside["time"],
        "level": "WARNING",
        "logger": "dynamo_gateway.test_logs",
        "message": "inside a request",
        "request_id": "r-9",
        "trace_id": "ab" * 16,
    }
    assert "ValueError: boom\nwith a second line" in failed["exception"]


def test_text_lines_end_with_the_request_id(
    capture: tuple[logging.Logger, io.StringIO, logging.StreamHandler[io.StringIO]],
) -> None:
    logger, out, handler = capture
    handler.setFormatter(TextFormatter())
    token = REQUEST_ID.set("r-7")
    try:
        logger.info("hello")
    finally:
        REQUEST_ID.reset(token)
    logger.info("bye")
    first, second = out.getvalue().splitlines()
    assert first.endswith("INFO dynamo_gateway.test_logs: hello [request_id=r-7]")
    assert second.endswith("INFO dynamo_gateway.test_logs: bye")


@pytest.mark.parametrize("command", ["serve", "worker", "frontend"])
def test_observability_flags_reach_the_settings(command: str) -> None:
    args = _parser().parse_args(
        [command, "--log-format", "json", "--otlp-endpoint", "http://c:4318", "--trace-file", "t"]
    )
    settings = settings_from_args(args)
    assert settings.log_format == "json"
    assert settings.tracing.otlp_endpoint == "http://c:4318"
    assert str(settings.tracing.span_file) == "t" and settings.tracing.enabled


def test_planner_takes_log_format() -> None:
    assert _parser().parse_args(["planner", "--log-format", "json"]).log_format == "json"
