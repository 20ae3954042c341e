"""One SSE event per token at load, unless `--stream-interval` asks for coalescing.

Clients read inter-token latency from events and agents stream tool arguments,
so 64 streams of 100 tokens at once must still arrive as 100 content events
each, even while the engine hands the frontend several tokens per output.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dynamo_gateway.testing import GatewayProcess, start_gateway

STREAMS = 64
TOKENS = 100


@pytest.fixture(scope="module", params=[1, 10])
def gateway(
    request: pytest.FixtureRequest, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, int]]:
    interval: int = request.param
    args = ["--model", str(demo_model), "--served-model-name", "demo", "--engine", "mocker"]
    args += ["--speedup", "20", "--stream-interval", str(interval)]
    gw = start_gateway(args, tmp_path_factory.mktemp(f"events-{interval}"))
    try:
        yield gw, interval
    finally:
        gw.stop()


async def _content_events(client: httpx.AsyncClient, i: int) -> tuple[int, str, int]:
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": f"story {i}"}],
        "max_tokens": TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events, text, tokens = 0, [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                content = choice["delta"].get("content")
                if content:
                    events += 1
                    text.append(content)
    return events, "".join(text), tokens


def test_every_token_is_its_own_event_at_64_streams(
    gateway: tuple[GatewayProcess, int],
) -> None:
    gw, interval = gateway

    async def run() -> list[tuple[int, str, int]]:
        limits = httpx.Limits(max_connections=STREAMS)
        async with httpx.AsyncClient(base_url=gw.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_content_events(client, i) for i in range(STREAMS)))

    results = asyncio.run(run())
    assert all(tokens == TOKENS for _, _, tokens in results)
    events = [n for n, _, _ in results]
    if interval == 1:
        assert events == [TOKENS] * STREAMS, events
    else:
        # Coalesced: each event carries at least `interval` tokens (more when the engine
        # handed several over at once); the rest ride on the finish chunk.
        assert all(1 <= n <= TOKENS // interval for n in events), events
    assert all(text.strip() for _, text, _ in results)
