"""`GatewayConformance`: an engine behind the real gateway, checked with the
official ``openai`` client. Import it from `dynamo_gateway.testing.conformance`.

Stop strings, usage and ``n`` are the frontend's work (it detokenizes, cuts
at stop strings, counts tokens and fans ``n`` out into engine requests), so
they are checked here, through the app the `serve` command runs, rather than
on the engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pytest
import pytest_asyncio

from dynamo_gateway.testing.harness import EngineSpec, load_plugins_for

if TYPE_CHECKING:
    import httpx
    import openai

__all__ = ["SERVED_MODEL", "GatewayConformance", "GatewayUnderTest", "serve_in_process"]

SERVED_MODEL = "conformance"


@dataclass
class GatewayUnderTest:
    """A gateway serving the spec's engine as `model`, and clients for it."""

    client: openai.AsyncOpenAI
    http: httpx.AsyncClient  # the same server, for raw requests (base URL: the server root)
    spec: EngineSpec
    model: str = SERVED_MODEL


@contextlib.asynccontextmanager
async def serve_in_process(spec: EngineSpec, **settings: Any) -> AsyncIterator[GatewayUnderTest]:
    """The embedded gateway (one worker of the spec's engine) in this process,
    reached through httpx's ASGI transport; `settings` adds `load_settings`
    overrides to the spec's."""
    import httpx
    import openai

    from dynamo_gateway.frontend.app import build_app
    from dynamo_gateway.server import embedded

    config = spec.build_settings(
        models=[{"path": spec.model, "name": SERVED_MODEL}], workers=1, **settings
    )
    async with embedded(config, load_plugins_for(spec)) as gateway:
        transport = httpx.ASGITransport(app=build_app(gateway))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway", timeout=spec.timeout_s
        ) as http:
            client = openai.AsyncOpenAI(
                base_url="http://gateway/v1",
                api_key="conformance",
                # Any: openai's stubs name their own httpx fork's client class.
                http_client=cast(Any, http),
                max_retries=0,
                timeout=spec.timeout_s,
            )
            yield GatewayUnderTest(client, http, spec)


def _require(spec: EngineSpec, name: str) -> None:
    if not getattr(spec.capabilities, name):
        pytest.skip(f"{spec.engine_name} does not declare {name}")


GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.mark.asyncio(loop_scope="class")
class GatewayConformance:
    """The engine served by the gateway, as an OpenAI client sees it.

    Uses the ``engine_spec`` fixture (see `dynamo_gateway.testing.conformance`)
    and provides ``gateway``, a `GatewayUnderTest`; override ``gateway`` to
    point the tests at a real server (``openai.AsyncOpenAI(base_url=...)``).

    Checks: ``/v1/models`` lists the model; chat and text completions answer
    with text, a finish reason and usage that adds up; a token-id prompt's
    usage counts exactly its tokens and ``max_tokens``; streaming ends with a
    usage chunk, and (greedy) its text equals the non-streamed text; a stop
    string cuts the text right before its first occurrence with
    ``finish_reason="stop"``, streamed or not (greedy); ``n=2`` gives choices 0
    and 1 and usage counting both; a bad sampling field is a 400 with an
    OpenAI error body naming the field; with prefix caching a repeated prompt
    reports ``cached_tokens``; with logprobs, chat ``top_logprobs`` has that
    many alternatives per token.
    """

    @pytest_asyncio.fixture(scope="class", loop_scope="class")
    @classmethod
    async def gateway(cls, engine_spec: EngineSpec) -> AsyncIterator[GatewayUnderTest]:
        async with serve_in_process(engine_spec) as gw:
            yield gw

    async def test_models_lists_the_served_model(self, gateway: GatewayUnderTest) -> None:
        models = await gateway.client.models.list()
        assert gateway.model in [m.id for m in models.data]

    async def test_chat_completion(self, gateway: GatewayUnderTest) -> None:
        resp = await gateway.client.chat.completions.create(
            model=gateway.model,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=12,
        )
        assert len(resp.choices) == 1
        choice = resp.choices[0]
        assert choice.index == 0 and choice.message.role == "assistant"
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("length", "stop")
        usage = resp.usage
        assert usage is not None
        assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        if choice.finish_reason == "length":
            assert usage.completion_tokens == 12

    async def test_completion_usage_counts_tokens(self, gateway: GatewayUnderTest) -> None:
        prompt = [(37 * i) % 200 + 20 for i in range(23)]
        resp = await gateway.client.completions.create(
            model=gateway.model, prompt=prompt, max_tokens=9, **GREEDY
        )
        assert resp.choices[0].finish_reason == "length"
        assert isinstance(resp.choices[0].text, str)
        assert resp.usage is not None
        assert resp.usage.prompt_tokens == 23
        assert resp.usage.completion_tokens == 9
        assert resp.usage.total_tokens == 32

    async def test_streaming(self, gateway: GatewayUnderTest) -> None:
        kwargs: dict[str, Any] = dict(
            model=gateway.model,
            messages=[{"role": "user", "content": "Tell me about rivers."}],
            max_tokens=20,
            **GREEDY,
        )
        full = await gateway.client.chat.completions.create(**kwargs)
        stream = await gateway.client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        text, finish, usage, chunks = "", None, None, 0
        async for chunk in stream:
            chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert chunks > 2, "one chunk: not streamed"
        assert finish == "length"
        assert usage is not None and usage.completion_tokens == 20
        if gateway.spec.capabilities.deterministic_greedy:
            assert text == full.choices[0].message.content

    async def test_stop_string_cuts_the_text(self, gateway: GatewayUnderTest) -> None:
        _require(gateway.spec, "deterministic_greedy")
        kwargs: dict[str, Any] = dict(
            model=gateway.model, prompt="Once upon a time", max_tokens=32, **GREEDY
        )
        free = (await gateway.client.completions.create(**kwargs)).choices[0].text
        stop = free[len(free) // 2 : len(free) // 2 + 3]
        if len(free) < 8 or not stop.strip():
            pytest.skip(f"too little text to cut: {free!r}")
        want = free[: free.index(stop)]
        resp = await gateway.client.completions.create(**kwargs, stop=[stop])
        assert resp.choices[0].text == want
        assert resp.choices[0].finish_reason == "stop"
        stream = await gateway.client.completions.create(**kwargs, stop=[stop], stream=True)
        text, finish = "", None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        assert (text, finish) == (want, "stop")

    async def test_n_gives_n_choices(self, gateway: GatewayUnderTest) -> None:
        resp = await gateway.client.completions.create(
            model=gateway.model, prompt="The weather today", max_tokens=6, n=2, **GREEDY
        )
        assert sorted(c.index for c in resp.choices) == [0, 1]
        assert all(c.finish_reason == "length" for c in resp.choices)
        assert resp.usage is not None and resp.usage.completion_tokens == 12
        if gateway.spec.capabilities.deterministic_greedy:
            assert resp.choices[0].text == resp.choices[1].text

    @pytest.mark.parametrize(("field", "value"), [("temperature", -1), ("top_p", 1.5)])
    async def test_bad_sampling_field_is_400(
        self, gateway: GatewayUnderTest, field: str, value: float
    ) -> None:
        import openai

        bad: dict[str, Any] = {field: value}
        with pytest.raises(openai.BadRequestError) as info:
            await gateway.client.chat.completions.create(
                model=gateway.model,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=4,
                **bad,
            )
        assert info.value.status_code == 400
        body = info.value.body
        assert isinstance(body, dict), body
        assert body.get("type") == "invalid_request_error", body
        assert field in str(body.get("param")), body
        assert body.get("message")

    async def test_cached_tokens_in_usage(self, gateway: GatewayUnderTest) -> None:
        _require(gateway.spec, "prefix_caching")
        prompt = [(53 * i) % 300 + 30 for i in range(80)]
        usages = []
        for _ in range(2):
            resp = await gateway.client.completions.create(
                model=gateway.model, prompt=prompt, max_tokens=2, **GREEDY
            )
            usages.append(resp.usage)
        first, second = usages
        assert first is not None and second is not None
        details = second.prompt_tokens_details
        assert details is not None and details.cached_tokens
        assert 0 < details.cached_tokens <= 80

    async def test_chat_logprobs(self, gateway: GatewayUnderTest) -> None:
        _require(gateway.spec, "logprobs")
        resp = await gateway.client.chat.completions.create(
            model=gateway.model,
            messages=[{"role": "user", "content": "Count to three."}],
            max_tokens=5,
            logprobs=True,
            top_logprobs=2,
            **GREEDY,
        )
        logprobs = resp.choices[0].logprobs
        assert logprobs is not None and logprobs.content is not None
        assert resp.usage is not None
        assert len(logprobs.content) == resp.usage.completion_tokens == 5
        for entry in logprobs.content:
            assert entry.logprob <= 1e-6
            assert len(entry.top_logprobs) == 2
