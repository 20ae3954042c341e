"""Request ids, nvext timing, Dynamo-shaped metrics and tracing, in-process.

The gateway runs the mocker through httpx's ASGI transport (and the openai
client over the same transport); tracing exports to an in-memory exporter.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dynamo_gateway.frontend.app import build_app
from dynamo_gateway.frontend.metrics import DYNAMO_NAMES
from dynamo_gateway.server import embedded
from dynamo_gateway.settings import TracingSettings, load_settings
from dynamo_gateway.telemetry import tracing
from dynamo_gateway.telemetry.logs import RequestContextFilter

CHAT: dict[str, Any] = {
    "model": "demo",
    "messages": [{"role": "user", "content": "hello there"}],
    "max_tokens": 6,
}
COMPLETION: dict[str, Any] = {"model": "demo", "prompt": "hi", "max_tokens": 6}
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


async def _client(demo_model: Path, **extra: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(
        engine="mocker",
        models=[{"path": demo_model, "name": "demo"}],
        mocker={"speedup": 100},
        **extra,
    )
    async with embedded(settings) as gateway:
        transport = httpx.ASGITransport(app=build_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


@pytest.fixture
async def client(demo_model: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(demo_model):
        yield c


def _events(text: str) -> list[Any]:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# -- X-Request-Id -------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_valid_request_id_comes_back(client: httpx.AsyncClient, stream: bool) -> None:
    resp = await client.post(
        "/v1/chat/completions", json={**CHAT, "stream": stream}, headers={"X-Request-Id": "r-1"}
    )
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "r-1"


@pytest.mark.parametrize(
    "given",
    ["", "x" * 129, "has space", "tab\there", "caf\u00e9", "new\nline"],
)
async def test_an_invalid_request_id_is_replaced(client: httpx.AsyncClient, given: str) -> None:
    headers = [(b"x-request-id", given.encode("utf-8"))]
    resp = await client.post("/v1/completions", json=COMPLETION, headers=headers)
    assert resp.status_code == 200
    rid = resp.headers["x-request-id"]
    assert rid != given and len(rid) == 32 and int(rid, 16) >= 0


async def test_every_error_carries_a_request_id(client: httpx.AsyncClient) -> None:
    bad = await client.post("/v1/chat/completions", json={**CHAT, "bogus": 1})
    missing = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    unparsable = await client.post("/v1/completions", content=b"{", headers={"X-Request-Id": "e"})
    assert (bad.status_code, missing.status_code, unparsable.status_code) == (400, 404, 400)
    assert len(bad.headers["x-request-id"]) == 32
    assert missing.headers["x-request-id"] != bad.headers["x-request-id"]
    assert unparsable.headers["x-request-id"] == "e"


async def test_log_lines_during_a_request_carry_its_id(client: httpx.AsyncClient) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(RequestContextFilter())
    logger = logging.getLogger("dynamo_gateway")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        resp = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "L"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert resp.status_code == 200
    routed = [r for r in records if "routed to" in r.getMessage()]
    assert routed and all(r.request_id == "L" for r in routed)  # type: ignore[attr-defined]


# -- nvext ------------------------------------------------------------------------------------


async def test_nvext_timing_and_worker_id_non_streaming(client: httpx.AsyncClient) -> None:
    body = {**CHAT, "nvext": {"extra_fields": ["timing", "worker_id"]}}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200
    nvext = resp.json()["nvext"]
    assert nvext["worker_id"] == {
        "prefill_worker_id": "demo-mocker-0",
        "decode_worker_id": "demo-mocker-0",
    }
    t = nvext["timing"]
    assert t["request_received_ms"] > 1_600_000_000_000
    assert 0 <= t["routing_ms"] <= t["queue_ms"] <= t["ttft_ms"] <= t["total_time_ms"]


async def test_nvext_in_the_last_streamed_chunk(client: httpx.AsyncClient) -> None:
    body = {**COMPLETION, "stream": True, "nvext": {"extra_fields": ["timing"]}}
    resp = await client.post("/v1/completions", json=body)
    assert resp.status_code == 200
    events = _events(resp.text)
    assert [e for e in events[:-1] if "nvext" in e] == []
    last = events[-1]
    assert last["choices"] == [] and last["object"] == "text_completion"
    assert set(last["nvext"]) == {"timing"}
    assert last["nvext"]["timing"]["ttft_ms"] <= last["nvext"]["timing"]["total_time_ms"]


async def test_without_nvext_nothing_is_added(client: httpx.AsyncClient) -> None:
    plain = await client.post("/v1/chat/completions", json=CHAT)
    streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert "nvext" not in plain.json()
    assert all("nvext" not in e for e in _events(streamed.text))


@pytest.mark.parametrize(
    "nvext",
    [{"extra_fields": ["bogus"]}, {"greed_sampling": True}, {"extra_fields": "timing"}],
)
async def test_unknown_nvext_is_refused(client: httpx.AsyncClient, nvext: object) -> None:
    resp = await client.post("/v1/chat/completions", json={**CHAT, "nvext": nvext})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"].startswith("nvext")


async def test_openai_client_extra_body(client: httpx.AsyncClient) -> None:
    oai = openai.AsyncOpenAI(
        base_url="http://gw/v1", api_key="unused", http_client=client, max_retries=0
    )
    extra = {"nvext": {"extra_fields": ["timing", "worker_id"]}}
    resp = await oai.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body=extra
    )
    assert resp.model_extra is not None
    assert resp.model_extra["nvext"]["worker_id"]["decode_worker_id"] == "demo-mocker-0"
    stream = await oai.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
        extra_body=extra,
    )
    chunks = [c async for c in stream]
    last = chunks[-1].model_extra or {}
    assert last["nvext"]["timing"]["total_time_ms"] > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- metrics ---------------------------------------------------------------------------------


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics")


def _samples(text: str, name: str) -> list[str]:
    """Every sample of `name`: its labels and value, without the name."""
    return [
        line[len(name) :]
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    ]


async def test_dynamo_shaped_metrics(client: httpx.AsyncClient) -> None:
    for stream in (False, True):
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status_code == 200
    text = (await client.get("/metrics")).text
    assert _sample(text, "dynamo_gateway_request_duration_seconds_count") == 2
    assert _sample(text, "dynamo_gateway_input_sequence_tokens_count") == 2
    assert _sample(text, "dynamo_gateway_output_sequence_tokens_sum") == 12
    assert _sample(text, "dynamo_gateway_cached_tokens_per_request_count") == 2
    assert _sample(text, "dynamo_gateway_queued_requests") == 0
    assert _sample(text, "dynamo_gateway_inflight_requests") == 0
    for name in ("model_context_length", "model_kv_cache_block_size", "model_migration_limit"):
        assert _sample(text, f"dynamo_gateway_{name}") > -1
    assert "dynamo_frontend_" not in text  # Dynamo's own names only when asked for


async def test_dynamo_metric_names_on_request(demo_model: Path) -> None:
    async for client in _client(demo_model, frontend={"dynamo_metric_names": True}):
        for stream in (False, True):
            resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert resp.status_code == 200
        text = (await client.get("/metrics")).text
    for ours, theirs in DYNAMO_NAMES.items():
        for suffix in ("_count", "_total", ""):  # a histogram, a counter or a gauge
            mine = f"dynamo_gateway_{ours}{suffix}"
            if re.search(rf"^{mine}[{{ ]", text, re.M):
                break
        else:
            raise AssertionError(f"dynamo_gateway_{ours} is not exported")
        dynamo = f"dynamo_frontend_{theirs}{suffix}"
        assert _samples(text, dynamo) == _samples(text, mine), (mine, dynamo)
    assert _sample(text, "dynamo_frontend_time_to_first_token_seconds_count") == 2
    assert _sample(text, "dynamo_frontend_output_sequence_tokens_sum") == 12


# -- tracing ----------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(TracingSettings(), "test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def _by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for s in finished:
        out.setdefault(s.name, []).append(s)
    return out


def _parent_of(s: ReadableSpan) -> int:
    assert s.parent is not None, s.name
    return s.parent.span_id


async def test_spans_of_a_disaggregated_request(
    spans: InMemorySpanExporter, demo_model: Path
) -> None:
    async for client in _client(
        demo_model,
        prefill_workers=1,
        decode_workers=1,
        disagg={"min_prefill_tokens": 0},
        cache={"block_size": 4},
    ):
        resp = await client.post(
            "/v1/chat/completions",
            json={**CHAT, "stream": True, "nvext": {"extra_fields": ["worker_id"]}},
            headers={"traceparent": TRACEPARENT, "X-Request-Id": "traced"},
        )
        assert resp.status_code == 200
        ids = _events(resp.text)[-1]["nvext"]["worker_id"]
        assert ids["prefill_worker_id"] != ids["decode_worker_id"]
    got = _by_name(spans.get_finished_spans())
    assert {s.context.trace_id for ss in got.values() for s in ss} == {int(CLIENT_TRACE, 16)}
    (server,) = got["POST /v1/chat/completions"]
    assert _parent_of(server) == int(CLIENT_SPAN, 16)
    assert server.attributes is not None
    assert server.attributes["dynamo.request_id"] == "traced"
    assert server.attributes["http.response.status_code"] == 200
    sid = server.context.span_id
    for name in ("preprocess", "time_to_first_token", "stream"):
        assert [_parent_of(s) for s in got[name]] == [sid], name
    (stream,) = got["stream"]
    (route,) = got["route"]
    assert _parent_of(route) == stream.context.span_id
    assert route.attributes is not None
    assert route.attributes["dynamo.worker_id"] == ids["decode_worker_id"]
    assert route.attributes["dynamo.prefill_worker_id"] == ids["prefill_worker_id"]
    (prefill,) = got["prefill_leg"]
    (decode,) = got["decode_leg"]
    assert _parent_of(prefill) == _parent_of(decode) == stream.context.span_id
    assert prefill.attributes is not None and decode.attributes is not None
    assert prefill.attributes["dynamo.worker_id"] == ids["prefill_worker_id"]
    assert decode.attributes["dynamo.worker_id"] == ids["decode_worker_id"]
    (transfer,) = got["kv_transfer"]
    assert _parent_of(transfer) == decode.context.span_id
    assert transfer.attributes is not None and transfer.attributes["dynamo.kv.blocks"] >= 1
    # Inside its request, in order: the prefill, the KV moving, the decode's end.
    assert prefill.end_time is not None and transfer.end_time is not None
    assert prefill.start_time is not None and transfer.start_time is not None
    assert prefill.end_time <= transfer.end_time
    assert server.end_time is not None and decode.end_time is not None
    assert decode.end_time <= server.end_time


async def test_a_request_without_traceparent_starts_a_trace(
    spans: InMemorySpanExporter, demo_model: Path
) -> None:
    async for client in _client(demo_model):
        bad = await client.post("/v1/chat/completions", json={**CHAT, "bogus": 1})
        assert bad.status_code == 400
        ok = await client.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200
    servers = _by_name(spans.get_finished_spans())["POST /v1/chat/completions"]
    assert [s.parent for s in servers] == [None, None]
    assert servers[0].context.trace_id != servers[1].context.trace_id
    failed = _by_name(spans.get_finished_spans())["preprocess"][0]
    assert failed.attributes is not None and failed.attributes["dynamo.failed"] is True


async def test_tracing_off_makes_no_spans(client: httpx.AsyncClient) -> None:
    assert not tracing.active()
    resp = await client.post(
        "/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT}
    )
    assert resp.status_code == 200 and "traceparent" not in resp.headers
