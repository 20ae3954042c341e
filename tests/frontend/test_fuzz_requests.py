"""Fuzzed request bodies never get a 500, and every error is OpenAI-shaped.

Bodies are random JSON built around the real fields (so that decoding gets past
the first field and validation, templating, tokenizing and sampling see odd
values), plus raw bytes. Runs in-process against the mocker.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_gateway.frontend.app import build_app
from dynamo_gateway.server import embedded
from dynamo_gateway.settings import load_settings

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stream",
    "stream_options", "stop", "seed", "logprobs", "top_logprobs", "ignore_eos", "min_tokens",
    "presence_penalty", "frequency_penalty", "stop_token_ids", "echo", "suffix", "best_of",
]  # fmt: skip
small_ints = st.integers(min_value=-3, max_value=40)
field_values = st.one_of(json_values, small_ints, st.floats(-3, 3), st.booleans())
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
         "content": st.one_of(st.text(max_size=60), json_values)},
    ),
    max_size=3,
)  # fmt: skip
prompts = st.one_of(
    st.text(max_size=60),
    st.lists(st.integers(-5, 3000), max_size=20),
    st.lists(st.text(max_size=10), max_size=3),
    json_values,
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    chat = draw(st.booleans())
    body: dict[str, Any] = {"model": draw(st.sampled_from(["demo", "demo", "nope", 3]))}
    if chat:
        body["messages"] = draw(messages)
    else:
        body["prompt"] = draw(prompts)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=5, unique=True)):
        body[name] = draw(field_values)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if draw(st.integers(0, 9)) == 0:
        return path, draw(st.binary(max_size=80))
    return path, json.dumps(body).encode()


@pytest.fixture(scope="module")
def gateway(demo_model: Path) -> Any:
    # One gateway for all examples: a module-scoped loop driven from sync tests.
    loop = asyncio.new_event_loop()
    settings_ = load_settings(
        engine="mocker",
        models=[{"path": demo_model, "name": "demo"}],
        mocker={"speedup": 1e6},
    )
    cm = embedded(settings_)
    gw = loop.run_until_complete(cm.__aenter__())
    yield loop, build_app(gw), gw
    loop.run_until_complete(cm.__aexit__(None, None, None))
    loop.close()


async def _post(app: Any, path: str, body: bytes) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        return await client.post(path, content=body, headers={"content-type": "application/json"})


@settings(
    max_examples=int(os.environ.get("DG_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=bodies())
def test_fuzzed_bodies_never_500(gateway: Any, case: tuple[str, bytes]) -> None:
    loop, app, gw = gateway
    path, body = case
    resp = loop.run_until_complete(_post(app, path, body))
    assert resp.status_code != 500, (body, resp.text)
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    # Nothing leaks: every request is over once its response is.
    assert gw.admission.inflight == 0
    for pool in gw.manager.pools.values():
        for worker in pool.workers.values():
            assert worker.view.inflight == 0
            assert worker.engine.load().active_requests == 0
