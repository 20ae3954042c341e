"""Tests for the load generator, its HTTP client and the floor server."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from dynamo_gateway.bench import cli
from dynamo_gateway.bench.httpclient import (
    HTTPParseError,
    ResponseParser,
    SSEDecoder,
    build_request,
    fetch,
    parse_target,
)
from dynamo_gateway.bench.loadgen import BenchConfig, BenchResult, run_bench

REPO_ROOT = Path(__file__).resolve().parents[2]


# -- fixtures ----------------------------------------------------------------------------


def _start_floor(server: str) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynamo_gateway.bench.floor",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--server",
            server,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("listening on "):
            return proc, line.split("listening on ", 1)[1].strip()
    proc.kill()
    proc.wait()
    raise RuntimeError(f"floor server ({server}) did not start")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture(scope="module")
def floor_url() -> Iterator[str]:
    proc, url = _start_floor("hypercorn")
    try:
        yield url
    finally:
        _stop(proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _assert_ordered(summary: dict[str, float | None]) -> None:
    p50, p90, p99 = summary["p50"], summary["p90"], summary["p99"]
    assert p50 is not None and p90 is not None and p99 is not None, summary
    assert 0.0 <= p50 <= p90 <= p99


# -- end to end against the floor ------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_streaming_against_floor(floor_url: str, endpoint: str) -> None:
    config = BenchConfig(
        url=floor_url,
        concurrency=8,
        requests=40,
        input_tokens=16,
        output_tokens=20,
        endpoint=endpoint,  # type: ignore[arg-type]
        warmup=4,
    )
    result = await run_bench(config)
    assert result.errors == 0, result.error_samples
    assert result.requests == 40
    assert result.output_tokens == 40 * 20
    assert result.events == 40 * 20
    assert len(result.records) == 40
    _assert_ordered(result.ttft_ms)
    _assert_ordered(result.itl_ms)
    _assert_ordered(result.e2e_ms)
    assert result.req_per_s > 0 and result.output_tok_per_s > 0 and result.events_per_s > 0
    assert all(len(r.itl) == 19 for r in result.records)
    data = result.to_json_dict()
    for key in ("requests", "errors", "duration_s", "req_per_s", "output_tok_per_s"):
        assert key in data
    for key in ("ttft_ms", "itl_ms", "e2e_ms"):
        assert set(data[key]) == {"mean", "p50", "p90", "p99"}
    assert data["config"]["concurrency"] == 8
    json.dumps(data)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_non_streaming_against_floor(floor_url: str, endpoint: str) -> None:
    config = BenchConfig(
        url=floor_url + "/v1",  # the OpenAI-SDK style base URL works too
        concurrency=8,
        requests=40,
        output_tokens=20,
        stream=False,
        endpoint=endpoint,  # type: ignore[arg-type]
    )
    result = await run_bench(config)
    assert result.errors == 0, result.error_samples
    assert result.requests == 40
    assert result.output_tokens == 40 * 20
    assert result.events == 0  # no SSE
    _assert_ordered(result.ttft_ms)
    _assert_ordered(result.e2e_ms)
    assert result.itl_ms["p50"] is None


async def test_concurrency_above_requests(floor_url: str) -> None:
    result = await run_bench(
        BenchConfig(url=floor_url, concurrency=16, requests=3, output_tokens=2)
    )
    assert (result.requests, result.errors) == (3, 0)


async def test_http_error_counts_every_request(floor_url: str) -> None:
    result = await run_bench(
        BenchConfig(url=floor_url + "/nope", concurrency=4, requests=10, output_tokens=5)
    )
    assert result.requests == 0
    assert result.errors == 10
    assert any("HTTP 404" in msg for msg in result.error_samples)
    assert result.ttft_ms["p50"] is None


async def test_closed_port_gives_errors_not_crash() -> None:
    port = _free_port()
    result = await run_bench(
        BenchConfig(url=f"http://127.0.0.1:{port}", concurrency=4, requests=10, output_tokens=5)
    )
    assert result.requests == 0
    assert result.errors == 10
    assert result.error_samples


async def test_uvicorn_floor() -> None:
    proc, url = await asyncio.to_thread(_start_floor, "uvicorn")
    try:
        result = await run_bench(
            BenchConfig(url=url, concurrency=8, requests=40, output_tokens=20, input_tokens=8)
        )
    finally:
        await asyncio.to_thread(_stop, proc)
    assert (result.requests, result.errors, result.output_tokens) == (40, 0, 800)


async def test_fetch_helper(floor_url: str) -> None:
    status, body = await fetch(floor_url + "/ready")
    assert status == 200
    assert json.loads(body) == {"status": "ok"}


def test_cli_main_writes_json(floor_url: str, tmp_path: Path) -> None:
    parser = cli.build_parser()
    out = tmp_path / "res" / "bench.json"
    args = parser.parse_args(
        [
            "--url",
            floor_url,
            "--concurrency",
            "4",
            "--requests",
            "12",
            "--output-tokens",
            "7",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    assert cli.main(args) == 0
    data = json.loads(out.read_text())
    assert data["requests"] == 12 and data["errors"] == 0
    assert data["config"]["output_tokens"] == 7
    assert data["ttft_ms"]["p99"] >= data["ttft_ms"]["p50"]


def test_cli_bad_arguments() -> None:
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    assert cli.main(parser.parse_args(["--concurrency", "0"])) == 2
    assert cli.main(parser.parse_args(["--url", "ftp://x"])) == 2


# -- scripted raw servers: malformed streams --------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bool:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return True


async def _run_against(script: Script, **kwargs: object) -> BenchResult:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = BenchConfig(url=f"http://127.0.0.1:{port}", output_tokens=3, **kwargs)  # type: ignore[arg-type]
        return await run_bench(config)
    finally:
        server.close()
        await server.wait_closed()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


async def test_missing_done_is_an_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await _read_request(reader):
            writer.write(_SSE_HEAD + _chunk(_EVENT) + b"0\r\n\r\n")
            await writer.drain()

    result = await _run_against(script, concurrency=2, requests=6)
    assert result.errors == 6
    assert any("[DONE]" in msg for msg in result.error_samples)


async def test_malformed_event_is_an_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await _read_request(reader):
            body = _chunk(b"data: {not json\n\n") + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
            writer.write(_SSE_HEAD + body)
            await writer.drain()

    result = await _run_against(script, concurrency=2, requests=4)
    assert result.errors == 4
    assert any("malformed" in msg for msg in result.error_samples)


async def test_truncated_stream_is_an_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await _read_request(reader):
            writer.write(_SSE_HEAD + _chunk(_EVENT))
            await writer.drain()
        # close mid-stream

    result = await _run_against(script, concurrency=2, requests=4)
    assert result.errors == 4
    assert any("closed" in msg for msg in result.error_samples)


async def test_connection_close_responses_reconnect_and_until_close_bodies() -> None:
    """HTTP/1.0-style responses without framing: body ends at close, client reconnects."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await _read_request(reader):
            body = _EVENT * 3 + b"data: [DONE]\n\n"
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + body)
            await writer.drain()

    result = await _run_against(script, concurrency=3, requests=9)
    assert result.errors == 0, result.error_samples
    assert result.requests == 9
    assert result.output_tokens == 9 * 3  # no usage chunk: counted content events


async def test_crlf_sse_with_content_length_and_usage() -> None:
    usage = b'data: {"choices":[],"usage":{"completion_tokens":42}}\r\n\r\n'
    body = _EVENT.replace(b"\n", b"\r\n") * 2 + usage + b"data: [DONE]\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await _read_request(reader):
            # Dribble the response out in small pieces to exercise partial parsing.
            for i in range(0, len(response), 7):
                writer.write(response[i : i + 7])
                await writer.drain()

    result = await _run_against(script, concurrency=2, requests=4)
    assert result.errors == 0, result.error_samples
    assert result.output_tokens == 4 * 42
    assert result.events == 4 * 2


# -- pure parsers -----------------------------------------------------------------------------


def _parse_all(pieces: list[bytes]) -> tuple[ResponseParser, bytes]:
    parser = ResponseParser()
    body = b""
    for piece in pieces:
        body += parser.feed(piece)
    return parser, body


_CHUNKED = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    + _chunk(b"data: one\n\n")
    + b"5;ext=1\r\nhello\r\n"
    + _chunk(b"data: [DONE]\n\n")
    + b"0\r\nx-trailer: yes\r\n\r\n"
)
_CHUNKED_BODY = b"data: one\n\nhellodata: [DONE]\n\n"


def test_chunked_whole() -> None:
    parser, body = _parse_all([_CHUNKED])
    assert parser.complete and parser.keep_alive and not parser.excess
    assert parser.status == 200
    assert parser.headers["content-type"] == "text/event-stream"
    assert body == _CHUNKED_BODY


def test_chunked_split_at_every_boundary() -> None:
    for i in range(len(_CHUNKED) + 1):
        parser, body = _parse_all([_CHUNKED[:i], _CHUNKED[i:]])
        assert parser.complete, i
        assert body == _CHUNKED_BODY, i
        assert parser.excess == b"", i


def test_chunked_split_at_every_pair_of_boundaries() -> None:
    n = len(_CHUNKED)
    for i in range(0, n + 1, 3):
        for j in range(i, n + 1, 2):
            parser, body = _parse_all([_CHUNKED[:i], _CHUNKED[i:j], _CHUNKED[j:]])
            assert parser.complete and body == _CHUNKED_BODY, (i, j)


def test_byte_by_byte() -> None:
    parser, body = _parse_all([bytes([b]) for b in _CHUNKED])
    assert parser.complete and body == _CHUNKED_BODY


def test_head_not_complete_until_blank_line() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n") == b""
    assert not parser.head_complete
    assert parser.feed(b"\r\nab") == b"ab"
    assert parser.head_complete and not parser.complete
    assert parser.feed(b"cEXTRA") == b"c"
    assert parser.complete and parser.excess == b"EXTRA"


def test_content_length_and_interim_response_split_everywhere() -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found"
    )
    for i in range(len(raw) + 1):
        parser, body = _parse_all([raw[:i], raw[i:]])
        assert parser.complete and parser.status == 404 and body == b"not found", i
        assert not parser.keep_alive


def test_until_close_body() -> None:
    parser, body = _parse_all([b"HTTP/1.0 200 OK\r\n\r\nabc", b"def"])
    assert not parser.complete and body == b"abcdef" and not parser.keep_alive
    parser.feed_eof()
    assert parser.complete


def test_no_body_statuses() -> None:
    parser, body = _parse_all([b"HTTP/1.1 204 No Content\r\n\r\n"])
    assert parser.complete and body == b""
    parser, body = _parse_all([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    assert parser.complete and body == b""


@pytest.mark.parametrize(
    "raw",
    [
        b"FOO 200 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    ],
)
def test_malformed_responses_raise(raw: bytes) -> None:
    with pytest.raises(HTTPParseError):
        ResponseParser().feed(raw)


def test_sse_decoder_split_everywhere() -> None:
    stream = (
        b"data: a\n\n"
        b"data: m1\ndata: m2\n\n"
        b": comment\n\n"
        b"event: x\r\ndata: b\r\ndata: c\r\n\r\n"
        b"data:d\n\n"
        b"id: 3\n\n"
        b"data: [DONE]\n\n"
    )
    expected = [b"a", b"m1\nm2", b"b\nc", b"d", b"[DONE]"]
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1, 3):
            dec = SSEDecoder()
            out = dec.feed(stream[:i]) + dec.feed(stream[i:j]) + dec.feed(stream[j:])
            assert out == expected, (i, j)
            assert dec.pending == b""


def test_sse_decoder_keeps_partial_event() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: x\n") == []
    assert dec.pending == b"data: x\n"
    assert dec.feed(b"\ndata: y") == [b"x"]
    dec = SSEDecoder()
    assert dec.feed(b"data: m1\nd") == []  # one newline, not an event end
    assert dec.feed(b"ata: m2\n\n") == [b"m1\nm2"]


def test_build_request_and_targets() -> None:
    target = parse_target("http://example.com:8080/base/")
    assert (target.host, target.port, target.base_path) == ("example.com", 8080, "/base")
    assert parse_target("https://h").port == 443
    assert parse_target("http://h").host_header == "h"
    raw = build_request("POST", "/p", target, {"X-A": "1"}, b"{}")
    assert raw == (
        b"POST /p HTTP/1.1\r\nHost: example.com:8080\r\nX-A: 1\r\nContent-Length: 2\r\n\r\n{}"
    )
    with pytest.raises(ValueError):
        parse_target("ftp://x")
