"""The frontend in-process, through httpx's ASGI transport, with throwaway engines.

The engines here are registered as plugins by the test (never patched into the
core): one that fails mid-stream, one that fails before its first token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dynamo_gateway import hookimpl
from dynamo_gateway.engines.base import Engine, EngineBase, EngineContext, EngineState
from dynamo_gateway.errors import EngineError
from dynamo_gateway.frontend.app import build_app
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.protocol.engine import EngineOutput, EngineRequest, LoadMetrics
from dynamo_gateway.registry import EngineRegister
from dynamo_gateway.server import embedded
from dynamo_gateway.settings import load_settings


class FlakyEngine(EngineBase):
    """Streams `good` tokens, then raises; `good=0` fails before the first token."""

    def __init__(self, context: EngineContext, good: int) -> None:
        from dynamo_gateway.preprocess import Tokenizer

        words = Tokenizer.from_dir(context.model.path).encode(
            " the good words", add_special_tokens=False
        )
        self._tokens = (words * good)[:good]
        self._state = EngineState.CREATED
        self.active = 0

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def block_size(self) -> int:
        return 16

    async def start(self) -> None:
        self._state = EngineState.RUNNING

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.active += 1
        try:
            for i, token in enumerate(self._tokens):
                yield EngineOutput(token_ids=[token], cached_tokens=0 if i == 0 else None)
            raise EngineError("simulated engine failure")
        finally:
            self.active -= 1

    async def abort(self, request_id: str) -> None:
        pass

    async def check_health(self) -> None:
        pass

    def load(self) -> LoadMetrics:
        return LoadMetrics(active_requests=self.active)

    async def aclose(self) -> None:
        self._state = EngineState.STOPPED


class FlakyPlugin:
    @staticmethod
    @hookimpl
    def dynamo_gateway_register_engines(register: EngineRegister) -> None:
        def mid(ctx: EngineContext) -> Engine:
            return FlakyEngine(ctx, good=4)

        def early(ctx: EngineContext) -> Engine:
            return FlakyEngine(ctx, good=0)

        register("flaky-mid", mid)
        register("flaky-early", early)


async def _client(demo_model: Path, engine: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(engine=engine, models=[{"path": demo_model, "name": "demo"}])
    plugins = load_plugins(entry_points=False, extra=[(FlakyPlugin, "flaky")])
    async with embedded(settings, plugins) as gateway:
        transport = httpx.ASGITransport(app=build_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


@pytest.fixture
async def mid_client(demo_model: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(demo_model, "flaky-mid"):
        yield c


@pytest.fixture
async def early_client(demo_model: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(demo_model, "flaky-early"):
        yield c


BODY = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


async def test_engine_failure_mid_stream_ends_with_error_event(
    mid_client: httpx.AsyncClient,
) -> None:
    resp = await mid_client.post("/v1/chat/completions", json={**BODY, "stream": True})
    assert resp.status_code == 200
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if "choices" in p)
    assert text == " the good words"  # the good tokens reached the client
    error = payloads[-1]["error"]
    assert error["type"] == "server_error" and "simulated engine failure" in error["message"]


async def test_engine_failure_non_streaming_is_500_openai_body(
    early_client: httpx.AsyncClient,
) -> None:
    resp = await early_client.post("/v1/chat/completions", json=BODY)
    assert resp.status_code == 500
    err = resp.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "engine_error"


async def test_failure_before_first_token_streams_error(
    early_client: httpx.AsyncClient,
) -> None:
    resp = await early_client.post("/v1/completions", json={"model": "demo", "prompt": "x",
                                                             "stream": True})  # fmt: skip
    assert resp.status_code == 200
    assert '"error"' in resp.text and resp.text.rstrip().endswith("data: [DONE]")
    metrics = (await early_client.get("/metrics")).text
    assert 'dynamo_gateway_worker_active_requests{model="demo"' in metrics
    assert "} 0.0" in metrics.split("dynamo_gateway_worker_active_requests{")[1]


async def test_routes_served_by_starlette_still_work(mid_client: httpx.AsyncClient) -> None:
    assert (await mid_client.get("/v1/models")).json()["data"][0]["id"] == "demo"
    assert (await mid_client.get("/live")).status_code == 200
    nope = await mid_client.get("/nope")
    assert nope.status_code == 404 and nope.json()["error"]["code"] == "not_found"
