"""End to end: admission control (429 and recovery) and client disconnects."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import openai
import pytest

from dynamo_gateway.bench.overload import worker_gauges
from dynamo_gateway.testing import GatewayProcess


def _worker_gauges(gw: GatewayProcess, name: str) -> list[float]:
    return worker_gauges(gw.url, name)


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _open_stream(client: httpx.Client, max_tokens: int = 2000) -> httpx.Response:
    req = client.build_request(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "demo",
            "messages": [{"role": "user", "content": "keep talking"}],
            "max_tokens": max_tokens,
            "stream": True,
        },
    )
    resp = client.send(req, stream=True)
    assert resp.status_code == 200
    return resp


def test_client_disconnect_frees_engine_slot(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    # speedup 1: ~8 ms per decode step, so 2000 tokens would take many seconds.
    gw = gateway_server("--workers", "1", "--speedup", "1")
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        resp = _open_stream(client)
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in got)
        assert _worker_gauges(gw, "worker_active_requests") == [1.0]
        assert _worker_gauges(gw, "worker_kv_blocks_used")[0] >= 1
        resp.close()  # the client goes away mid-stream
    assert _wait_for(lambda: _worker_gauges(gw, "worker_active_requests") == [0.0]), gw.log()
    assert _wait_for(lambda: _worker_gauges(gw, "worker_kv_blocks_used") == [0.0])
    text = httpx.get(f"{gw.url}/metrics").text
    assert 'status="499"' in text
    # The slot is really free: the next request is served right away.
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as oa:
        assert oa.completions.create(model="demo", prompt="after", max_tokens=2).choices


def test_non_streaming_disconnect_aborts_request(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    gw = gateway_server("--workers", "1", "--speedup", "1")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gw.url}/v1/completions",
            json={"model": "demo", "prompt": "long", "max_tokens": 2000},
            timeout=0.5,
        )
    assert _wait_for(lambda: _worker_gauges(gw, "worker_active_requests") == [0.0]), gw.log()


def test_overload_gets_429_with_retry_after_and_recovers(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    gw = gateway_server("--workers", "1", "--speedup", "1", "--max-inflight", "2")
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        held = [_open_stream(client), _open_stream(client)]
        # Keep the line iterators referenced: httpx closes a response whose
        # iterator is garbage-collected, which would end the stream early.
        readers = [r.iter_lines() for r in held]
        for lines in readers:
            next(lines)
        over = client.post(
            "/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2}
        )
        assert over.status_code == 429
        assert over.headers["retry-after"] == "1"
        err = over.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "too_many_requests"
        with (
            openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as oa,
            pytest.raises(openai.RateLimitError),
        ):
            oa.completions.create(model="demo", prompt="x", max_tokens=2)
        for r in held:
            r.close()

    # Once the held streams are gone, requests are admitted again.
    def admitted() -> bool:
        r = httpx.post(
            f"{gw.url}/v1/completions",
            json={"model": "demo", "prompt": "x", "max_tokens": 2},
            timeout=10,
        )
        return r.status_code == 200

    assert _wait_for(admitted), gw.log()
    assert _wait_for(lambda: _worker_gauges(gw, "worker_active_requests") == [0.0])


def test_sigterm_drains_in_flight_request(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    gw = gateway_server("--workers", "1", "--speedup", "10")
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        resp = _open_stream(client, max_tokens=100)  # ~0.1 s of decode at speedup 10
        gw.process.send_signal(15)
        body = "".join(resp.iter_lines())
    assert body.endswith("data: [DONE]")
    assert gw.process.wait(20) == 0


def test_sigterm_refuses_new_requests_retryably_until_the_last_stream_ends(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    # The gateway drains before its HTTP server stops: while a long stream finishes,
    # a new request gets a 503 `draining` with Retry-After (a client retries it
    # elsewhere) and /ready says so; nothing is cut, and then the process exits.
    gw = gateway_server("--workers", "1", "--speedup", "1")
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        resp = _open_stream(client, max_tokens=300)  # a few seconds at speedup 1
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        gw.process.send_signal(15)
        with httpx.Client(base_url=gw.url, timeout=10) as other:
            assert _wait_for(lambda: other.get("/ready").status_code == 503)
            refused = other.post(
                "/v1/chat/completions",
                json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "draining"
        assert int(refused.headers["retry-after"]) >= 1
        assert gw.process.poll() is None  # still serving the stream
        body = "".join(lines)
    assert body.endswith("data: [DONE]")
    assert gw.process.wait(20) == 0
