"""Hostile input against a real gateway, beyond what the schema fuzzer draws
(tests/e2e/test_fuzz.py): bytes that are not UTF-8 or not JSON, huge and deeply
nested bodies, absurd numbers, abusive headers and a body that trickles in.

Each gets a 4xx with an OpenAI-shaped error (or, for headers the HTTP server itself
refuses, a 4xx from hypercorn), never a 500; afterwards the gateway still serves and
nothing is left in flight.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynamo_gateway.testing import GatewayProcess, read_metric, start_gateway

BODY_TIMEOUT_S = 2.0
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[GatewayProcess]:
    args = ["--model", str(demo_model), "--engine", "mocker", "--speedup", "100"]
    env = {
        "DYNAMO_GATEWAY_FRONTEND__BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "DYNAMO_GATEWAY_FRONTEND__MAX_BODY_BYTES": str(1024 * 1024),
    }
    gw = start_gateway(args, tmp_path_factory.mktemp("bad-input"), env=env)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        yield c


def _openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"].startswith("application/json"), resp.text[:500]
    error = resp.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return dict(error)


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **fields}


def _post(client: httpx.Client, content: bytes, **headers: str) -> httpx.Response:
    return client.post(
        CHAT, content=content, headers={"content-type": "application/json", **headers}
    )


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "demo", "messages": [{"role": "user", "content": "\xff\xfe bad"}]}',
        b"\xc3\x28\xa0\xa1",  # not UTF-8 and not JSON
        b'{"model": "demo", "messages": [',  # cut short
        b"",
        b"null",
        b"[]",
        b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}]} trailing',
        b'{"model": "demo", "model": "demo", "messages": NaN}',
    ],
    ids=["invalid-utf8", "garbage", "truncated", "empty", "null", "array", "trailing", "nan"],
)
def test_malformed_bodies_are_400(client: httpx.Client, content: bytes) -> None:
    _openai_error(_post(client, content), 400)


@pytest.mark.parametrize("depth", [64, 5_000, 200_000])
def test_deeply_nested_json_is_refused_cleanly(client: httpx.Client, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    content = f'{{"model": "demo", "messages": [{{"role": "user", "content": {nested}}}]}}'
    _openai_error(_post(client, content.encode()), 400)


@pytest.mark.parametrize("depth", [100, 400, 2_000])
def test_deeply_nested_json_schema_is_refused_cleanly(client: httpx.Client, depth: int) -> None:
    # Spelled out by hand: json.dumps itself would overflow Python's stack.
    schema = '{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}'
    schema += ', "required": ["a"]}' * depth
    fmt = f'{{"type": "json_schema", "json_schema": {{"name": "deep", "schema": {schema}}}}}'
    body = json.dumps(_chat(max_tokens=4))[:-1] + f', "response_format": {fmt}}}'
    resp = _post(client, body.encode())
    assert resp.status_code in (200, 400), resp.text[:500]
    if resp.status_code == 400:
        _openai_error(resp, 400)


def test_bodies_over_the_limit_are_413(gateway: GatewayProcess, client: httpx.Client) -> None:
    big = json.dumps(_chat(messages=[{"role": "user", "content": "x" * (2 * 1024 * 1024)}]))
    _openai_error(_post(client, big.encode()), 413)
    # Chunked, no Content-Length: counted as it arrives; the gateway answers (and may
    # close the connection) before the client has sent it all.
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * 65536
    answer = _raw(gateway, head + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 24)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b'"payload_too_large"' in answer


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 10**15},
        {"max_tokens": 2**70},
        {"max_tokens": -1},
        {"n": 10**9},
        {"n": 0},
        {"logprobs": True, "top_logprobs": 10**6},
        {"temperature": 1e308},
        {"logit_bias": {"1": 1e9}},
        {"logit_bias": {"99999999999": 5}},
        {"logit_bias": {"not-a-token": 5}},
        {"logit_bias": {str(i): -100 for i in range(50_000)}},
        {"stop": ["x"] * 10_000},
        {"seed": 2**80},
    ],
    ids=lambda f: next(iter(f)),
)
def test_absurd_values_are_400(client: httpx.Client, fields: dict[str, Any]) -> None:
    _openai_error(client.post(CHAT, json=_chat(**fields)), 400)


def _raw(gateway: GatewayProcess, request: bytes, timeout: float = 10.0) -> bytes:
    """Send `request` on a fresh connection; what came back before the server closed
    it or `timeout` passed."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout) as sock:
        sock.sendall(request)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and len(out) > 200:
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return out


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"a" * 200_000 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(5_000)),
        b"Authorization: Bearer \xff\xfe\x00\r\n",
        b"Content-Length: -5\r\n",
        b"Content-Length: 5\r\nContent-Length: 9\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 10\r\n",
    ],
    ids=["huge-header", "many-headers", "binary-auth", "negative-length", "two-lengths", "te-cl"],
)
def test_header_abuse_gets_a_4xx_and_the_gateway_goes_on(
    gateway: GatewayProcess, client: httpx.Client, headers: bytes
) -> None:
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n{}"
    answer = _raw(gateway, request)
    if answer:  # hypercorn may also just close the connection
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer[:300]
    assert client.post(CHAT, json=_chat(max_tokens=2)).status_code == 200


def test_a_trickling_body_gets_408_while_others_are_served(
    gateway: GatewayProcess, client: httpx.Client
) -> None:
    body = json.dumps(_chat(max_tokens=2)).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=BODY_TIMEOUT_S * 5) as sock:
        sock.sendall(head + body[:10])
        start = time.monotonic()
        sent = 10
        answer = b""
        sock.settimeout(0.5)
        # One byte every 0.5 s: it would take a minute; the gateway stops waiting.
        while sent < len(body) and time.monotonic() - start < BODY_TIMEOUT_S * 5:
            try:
                answer = sock.recv(65536)
                break
            except TimeoutError:
                sock.sendall(body[sent : sent + 1])
                sent += 1
            # Meanwhile everyone else is served.
            assert client.post(CHAT, json=_chat(max_tokens=2)).status_code == 200
        sock.settimeout(2)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while b'"request_timeout"' not in answer and (more := sock.recv(65536)):
                answer += more
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b'"request_timeout"' in answer
    assert sent < len(body)


def test_after_all_that_nothing_is_left_in_flight(
    gateway: GatewayProcess, client: httpx.Client
) -> None:
    assert client.get("/health").status_code == 200
    assert read_metric(gateway.url, "dynamo_gateway_inflight_requests", model="demo") == 0
    assert read_metric(gateway.url, "dynamo_gateway_worker_active_requests", model="demo") == 0
