"""End to end: a real `dynamo-gateway serve` process driven by the official openai client."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from dynamo_gateway.testing import GatewayProcess


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, demo_model: object) -> GatewayProcess:
    # One shared server for the read-only tests of this module.
    import subprocess
    import sys

    from dynamo_gateway.testing import free_port, wait_ready

    port = free_port()
    log = tmp_path_factory.mktemp("gw") / "gateway.log"
    argv = [
        sys.executable, "-m", "dynamo_gateway.cli", "serve", "--model", str(demo_model),
        "--engine", "mocker", "--workers", "2", "--speedup", "100", "--port", str(port),
        "--served-model-name", "demo",
    ]  # fmt: skip
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
    gw = GatewayProcess(f"http://127.0.0.1:{port}", port, proc, log, argv)
    try:
        wait_ready(gw.url, proc)
        yield gw  # type: ignore[misc]
    finally:
        gw.stop()


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    # Closed after each test: an open client's socket, collected late, fails the run.
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_models_lists_served_name(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]


def test_chat_non_streaming_usage_and_text(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Say hello"}], max_tokens=12
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens > 3
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12
    assert resp.usage.prompt_tokens_details is not None
    assert resp.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_streaming_matches_non_streaming_with_seed(client: openai.OpenAI) -> None:
    kwargs = dict(
        model="demo",
        messages=[{"role": "user", "content": "Tell me a story about seeds"}],
        max_tokens=20,
        seed=1234,
        temperature=0.8,
    )
    full = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == full.choices[0].message.content
    assert finish == "length"
    assert roles == ["assistant"]
    assert usage is not None and usage.completion_tokens == 20


def test_seed_reproducible_and_seeds_differ(client: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        r = client.completions.create(
            model="demo", prompt="Once upon a time", max_tokens=16, seed=seed, temperature=1.0
        )
        return r.choices[0].text

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_completions_prompt_forms(client: openai.OpenAI) -> None:
    single = client.completions.create(model="demo", prompt="hello there", max_tokens=4)
    assert len(single.choices) == 1 and single.usage is not None
    batch = client.completions.create(model="demo", prompt=["one", "two words"], max_tokens=3)
    assert sorted(c.index for c in batch.choices) == [0, 1]
    assert batch.usage is not None and batch.usage.completion_tokens == 6
    ids = client.completions.create(model="demo", prompt=[10, 20, 30, 40], max_tokens=3)
    assert ids.usage is not None and ids.usage.prompt_tokens == 4
    nested = client.completions.create(model="demo", prompt=[[10, 20], [30]], max_tokens=2)
    assert nested.usage is not None and nested.usage.prompt_tokens == 3
    assert len(nested.choices) == 2


def test_n_choices_streaming_and_not(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=3, seed=3
    )
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert resp.usage is not None and resp.usage.completion_tokens == 15
    texts = {c.message.content for c in resp.choices}
    assert len(texts) == 3  # different seeds per sample

    stream = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=3,
        seed=3, stream=True,
    )  # fmt: skip
    by_index: dict[int, str] = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            by_index[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2}
    assert set(by_index.values()) == texts


def test_stop_string_truncates_output(client: openai.OpenAI) -> None:
    base = dict(model="demo", prompt="The stop test", max_tokens=30, temperature=0.0)
    full = client.completions.create(**base).choices[0].text  # type: ignore[call-overload]
    words = full.split()
    assert len(words) >= 6
    stop = " " + words[4]
    cut = full.index(stop)
    resp = client.completions.create(**base, stop=[stop])  # type: ignore[call-overload]
    assert resp.choices[0].text == full[:cut]
    assert resp.choices[0].finish_reason == "stop"
    # Streaming gives the same text, and the stop string never leaks.
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(**base, stop=[stop], stream=True)  # type: ignore[call-overload]
        if c.choices
    )
    assert streamed == full[:cut]


def test_max_tokens_and_max_completion_tokens(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "x"}], max_completion_tokens=3
    )
    assert r.usage is not None and r.usage.completion_tokens == 3


def test_logprobs_shapes(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=4,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp.content)
    c = client.completions.create(model="demo", prompt="x", max_tokens=3, logprobs=1)
    clp = c.choices[0].logprobs
    assert clp is not None and clp.tokens is not None and len(clp.tokens) == 3


def test_cached_tokens_reported_on_repeat(client: openai.OpenAI) -> None:
    prompt = " ".join(["shared prefix words"] * 40)
    first = client.completions.create(model="demo", prompt=prompt, max_tokens=2)
    # Two workers behind round robin: the second or third request lands on the
    # worker that served the first and reuses its cached blocks.
    cached = []
    for _ in range(2):
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=2)
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    assert first.usage is not None
    assert max(cached) >= 16 and max(cached or [0]) < first.usage.prompt_tokens


def _post(gateway: GatewayProcess, path: str, body: object, **kw: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{gateway.url}{path}", content=content,
        headers={"content-type": "application/json", **kw.get("headers", {})},  # type: ignore[dict-item]
        timeout=10,
    )  # fmt: skip


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[]", 400, None),
        ({"model": "demo"}, 400, None),  # messages missing
        ({"model": "demo", "messages": "hi"}, 400, "messages"),
        ({"model": "demo", "messages": []}, 400, "messages"),
        ({"model": "demo", "messages": [{"role": "wizard", "content": "x"}]}, 400,
         "messages[0].role"),
        ({"model": "demo", "messages": MSG, "max_tokens": "ten"}, 400, "max_tokens"),
        ({"model": "demo", "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "demo", "messages": MSG, "temperature": 3.5}, 400, "temperature"),
        ({"model": "demo", "messages": MSG, "top_p": 0}, 400, "top_p"),
        ({"model": "demo", "messages": MSG, "n": 0}, 400, "n"),
        ({"model": "demo", "messages": MSG, "stream": "yes"}, 400, "stream"),
        ({"model": "demo", "messages": MSG, "stop": ["a"] * 20}, 400, "stop"),
        ({"model": "demo", "messages": MSG, "max_tokens": 100000}, 400, "messages"),
        ({"model": "nope", "messages": MSG}, 404, "model"),
    ],
)  # fmt: skip
def test_chat_bad_input_gets_openai_error(
    gateway: GatewayProcess, body: object, status: int, param: str | None
) -> None:
    resp = _post(gateway, "/v1/chat/completions", body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param


def test_context_length_and_token_range_errors(gateway: GatewayProcess) -> None:
    long_prompt = "word " * 5000
    resp = _post(gateway, "/v1/completions", {"model": "demo", "prompt": long_prompt})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    resp = _post(gateway, "/v1/completions", {"model": "demo", "prompt": [1, 2, 10**9]})
    assert resp.status_code == 400
    resp = _post(gateway, "/v1/completions", {"model": "demo", "prompt": [1, "a"]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"


def test_body_too_large_is_413(gateway: GatewayProcess) -> None:
    big = b'{"model":"demo","prompt":"' + b"a" * (5 * 1024 * 1024) + b'"}'
    resp = _post(gateway, "/v1/completions", big)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"


def test_unknown_route_and_method(gateway: GatewayProcess) -> None:
    assert httpx.get(f"{gateway.url}/v1/nothing").status_code == 404
    r = httpx.get(f"{gateway.url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_health_endpoints_and_metrics(gateway: GatewayProcess, client: openai.OpenAI) -> None:
    client.completions.create(model="demo", prompt="metrics", max_tokens=2)
    assert httpx.get(f"{gateway.url}/live").status_code == 200
    assert httpx.get(f"{gateway.url}/ready").json()["models"] == {"demo": 2}
    health = httpx.get(f"{gateway.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    text = httpx.get(f"{gateway.url}/metrics").text
    for name in (
        "dynamo_gateway_requests_total",
        "dynamo_gateway_inflight_requests",
        "dynamo_gateway_time_to_first_token_seconds_bucket",
        "dynamo_gateway_inter_token_latency_seconds_bucket",
        "dynamo_gateway_input_tokens_total",
        "dynamo_gateway_output_tokens_total",
        "dynamo_gateway_errors_total",
        'dynamo_gateway_workers{model="demo",role="aggregated"} 2.0',
    ):
        assert name in text, name


def test_api_key_required_when_configured(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    gw = gateway_server("--api-key", "sekret", "--speedup", "100")
    with (
        openai.OpenAI(base_url=f"{gw.url}/v1", api_key="wrong", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        bad.models.list()
    assert info.value.status_code == 401
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": "demo", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sekret", max_retries=0) as good:
        assert good.completions.create(model="demo", prompt="x", max_tokens=2).choices


def test_several_models_each_with_its_own_pool(
    gateway_server: Callable[..., GatewayProcess],
    demo_model: object,
    request: pytest.FixtureRequest,
) -> None:
    gw = gateway_server(
        "--model", str(demo_model), "--served-model-name", "alpha",
        "--model", str(demo_model), "--served-model-name", "beta",
        "--engine", "mocker", "--workers", "2", "--speedup", "100",
    )  # fmt: skip
    oa = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    request.addfinalizer(oa.close)
    assert sorted(m.id for m in oa.models.list().data) == ["alpha", "beta"]
    for name in ("alpha", "beta"):
        r = oa.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert r.model == name and r.usage is not None and r.usage.completion_tokens == 3
    assert httpx.get(f"{gw.url}/ready").json()["models"] == {"alpha": 2, "beta": 2}
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert 'dynamo_gateway_workers{model="alpha",role="aggregated"} 2.0' in metrics
    assert 'dynamo_gateway_workers{model="beta",role="aggregated"} 2.0' in metrics
    workers = set(re.findall(r'worker_active_requests\{model="(\w+)",worker="([^"]+)"', metrics))
    assert {m for m, _ in workers} == {"alpha", "beta"} and len(workers) == 4
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="gamma", prompt="x", max_tokens=2)
