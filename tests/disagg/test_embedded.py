"""`serve --prefill-workers 1 --decode-workers 1` in-process: one normal OpenAI
response, equal to aggregated serving, with the remote/local split in /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from dynamo_gateway.frontend.app import build_app
from dynamo_gateway.server import embedded
from dynamo_gateway.settings import load_settings

LONG = " ".join(f"word{i % 37} and thing{i % 11}" for i in range(60))
SHORT = "hello there"
BODY: dict[str, Any] = {"model": "demo", "max_tokens": 12, "temperature": 0}


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        labelled = line.startswith(name + "{") and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        )
        if labelled or (line.startswith(name + " ") and not want):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def client_for(demo_model: Path, **extra: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(
        models=[{"path": demo_model, "name": "demo"}],
        cache={"block_size": 16, "num_kv_blocks": 256},
        disagg={"min_prefill_tokens": 64},
        **extra,
    )
    async with embedded(settings) as gateway:
        transport = httpx.ASGITransport(app=build_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def aggregated(demo_model: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for client in client_for(demo_model):
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["kv", "round_robin"])
async def disagg(
    request: pytest.FixtureRequest, demo_model: Path
) -> AsyncIterator[httpx.AsyncClient]:
    async for client in client_for(
        demo_model, prefill_workers=1, decode_workers=1, router=request.param
    ):
        yield client


async def complete(client: httpx.AsyncClient, prompt: str, **extra: Any) -> dict[str, Any]:
    r = await client.post("/v1/completions", json={**BODY, "prompt": prompt, **extra})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def stream_text(client: httpx.AsyncClient, prompt: str) -> tuple[str, dict[str, Any]]:
    body = {**BODY, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True}}
    text, usage = "", {}
    import json

    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                text += choice.get("text", "")
            if chunk.get("usage"):
                usage = chunk["usage"]
    return text, usage


@pytest.mark.asyncio(loop_scope="module")
async def test_remote_prefill_equals_aggregated(
    aggregated: httpx.AsyncClient, disagg: httpx.AsyncClient, request: pytest.FixtureRequest
) -> None:
    expected = await complete(aggregated, LONG)
    got = await complete(disagg, LONG)
    assert got["choices"][0]["text"] == expected["choices"][0]["text"]
    assert got["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"] == 12
    assert got["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
    # Streamed: the same text, the usage chunk included.
    text, usage = await stream_text(disagg, LONG)
    assert text == expected["choices"][0]["text"]
    assert usage["completion_tokens"] == 12
    # The second time the prompt is cached: on the decode worker too, since the
    # pulled blocks joined its prefix cache.
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0
    metrics = (await disagg.get("/metrics")).text
    if request.node.callspec.params["disagg"] == "kv":
        # The KV router sees the decode worker holding the prompt: nothing left to
        # prefill remotely, so the second one stays local.
        assert metric(metrics, "dynamo_gateway_remote_prefill_total", model="demo") == 1
        assert metric(metrics, "dynamo_gateway_local_prefill_total", reason="short_prompt") == 1
    else:
        # A load-only router knows no prefixes: remote again (a prefix hit on the prefill side).
        assert metric(metrics, "dynamo_gateway_remote_prefill_total", model="demo") == 2
    assert metric(metrics, "dynamo_gateway_workers", model="demo", role="prefill") == 1
    assert metric(metrics, "dynamo_gateway_workers", model="demo", role="decode") == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_short_prompt_stays_local(
    aggregated: httpx.AsyncClient, disagg: httpx.AsyncClient
) -> None:
    before = (await disagg.get("/metrics")).text
    expected = await complete(aggregated, SHORT)
    got = await complete(disagg, SHORT)
    assert got["choices"][0]["text"] == expected["choices"][0]["text"]
    after = (await disagg.get("/metrics")).text
    name = "dynamo_gateway_local_prefill_total"
    assert (
        metric(after, name, reason="short_prompt")
        == metric(before, name, reason="short_prompt") + 1
    )
    assert metric(after, "dynamo_gateway_remote_prefill_total") == metric(
        before, "dynamo_gateway_remote_prefill_total"
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def saturating(demo_model: Path) -> AsyncIterator[httpx.AsyncClient]:
    """Mocker prefill (tens of ms per prompt) with room for one prompt in flight."""
    settings = load_settings(
        models=[{"path": demo_model, "name": "demo"}],
        engine="mocker",
        prefill_workers=1,
        decode_workers=1,
        disagg={"min_prefill_tokens": 64, "max_queued_prefill_tokens": 100},
    )
    async with embedded(settings) as gateway:
        transport = httpx.ASGITransport(app=build_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


@pytest.mark.asyncio(loop_scope="module")
async def test_saturated_prefill_pool_sends_work_local(saturating: httpx.AsyncClient) -> None:
    import asyncio

    results = await asyncio.gather(
        *(complete(saturating, f"{i} {LONG}", max_tokens=4) for i in range(4))
    )
    assert all(r["usage"]["completion_tokens"] == 4 for r in results)
    metrics = (await saturating.get("/metrics")).text
    remote = metric(metrics, "dynamo_gateway_remote_prefill_total", model="demo")
    saturated = metric(metrics, "dynamo_gateway_local_prefill_total", reason="prefill_saturated")
    # The first one queues more than the pool takes; the others, sent meanwhile, stay local.
    assert remote >= 1 and saturated >= 1
    assert remote + saturated == 4


async def test_client_gone_between_the_legs_frees_the_prefill_blocks(demo_model: Path) -> None:
    from dynamo_gateway.disagg.flow import DisaggRouted
    from dynamo_gateway.protocol.engine import EngineRequest, SamplingParams
    from dynamo_gateway.router.base import RouteRequest

    settings = load_settings(
        models=[{"path": demo_model, "name": "demo"}],
        engine="mocker",
        prefill_workers=1,
        decode_workers=1,
        disagg={"min_prefill_tokens": 16},
    )
    async with embedded(settings) as gateway:
        pool = gateway.manager.get("demo")
        prompt = list(range(5, 205))
        request = EngineRequest(
            request_id="gone", prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=8)
        )
        routed = pool.route(RouteRequest("gone", prompt), request)
        assert isinstance(routed, DisaggRouted)
        first = await anext(routed.outputs)
        assert len(first.token_ids) == 1
        prefill = next(iter(pool.prefill_workers.values()))
        engine = prefill.engine  # type: ignore[attr-defined]
        assert engine.kv_transfer_agent.pinned_blocks > 0
        await routed.close()  # the client left before the decode leg started
        assert engine.kv_transfer_agent.pinned_blocks == 0
        assert engine.load().kv_blocks_used == 0
        decode = next(iter(pool.workers.values()))
        assert decode.view.inflight == 0 and prefill.view.inflight == 0
