"""Prefill and decode on two vLLM workers behind our frontend (marker ``vllm``).

`serve --prefill-workers 1 --decode-workers 1 --engine vllm`: the prefill worker's
vLLM computes the prompt (``do_remote_decode``), its NixlConnector hands the KV
to the decode worker's vLLM over NIXL (UCX on host memory), and the answer must
equal one aggregated vLLM worker's, token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_vllm_serving import PROMPTS, VLLM_FLAGS, ZMQ_CONTEXT_GARBAGE, client, served

from dynamo_gateway.testing import read_metric

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.real_model,
    # An earlier module's in-process vLLM may leave ZMQ contexts to the collector.
    pytest.mark.filterwarnings(ZMQ_CONTEXT_GARBAGE),
]

# Prompts longer than --disagg-min-prefill-tokens, so that each goes remote.
LONG = [p + " " + " ".join(f"note {i}: {p.lower()}" for i in range(12)) for p in PROMPTS]
MAX_TOKENS = 24


def _answers(url: str) -> list[tuple[str, str | None]]:
    out = []
    with client(url) as c:
        for prompt in LONG:
            reply = c.completions.create(
                model="smol", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            out.append((reply.choices[0].text, reply.choices[0].finish_reason))
    return out


def _args(real_model: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(real_model),
        "--engine",
        "vllm",
        "--served-model-name",
        "smol",
        *extra,
        "--",
        *VLLM_FLAGS,
    ]


@pytest.fixture(scope="module")
def aggregated(
    real_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[tuple[str, str | None]]:
    """One aggregated vLLM worker's greedy answers (stopped before the disaggregated pair)."""
    gw = served(tmp_path_factory.mktemp("vllm-agg"), _args(real_model, "--workers", "1"))
    try:
        return _answers(gw.url)
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def disagg(real_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    gw = served(
        tmp_path_factory.mktemp("vllm-pd"),
        _args(
            real_model,
            "--prefill-workers",
            "1",
            "--decode-workers",
            "1",
            "--disagg-min-prefill-tokens",
            "32",
        ),
    )
    yield gw.url
    gw.stop()


def test_disaggregated_greedy_equals_aggregated(
    aggregated: list[tuple[str, str | None]], disagg: str
) -> None:
    remote_before = read_metric(disagg, "dynamo_gateway_remote_prefill_total", model="smol")
    assert _answers(disagg) == aggregated
    # Every prompt went through the prefill worker; none fell back to a local prefill.
    remote = read_metric(disagg, "dynamo_gateway_remote_prefill_total", model="smol")
    assert remote - remote_before == len(LONG)
    assert read_metric(disagg, "dynamo_gateway_local_prefill_total", reason="prefill_failed") == 0


def test_the_decode_worker_keeps_the_pulled_prefix(disagg: str) -> None:
    """The KV pulled over NIXL lands in the decode vLLM's prefix cache: a repeat of
    the prompt finds it there (and the policy keeps that short remainder local)."""
    prompt = LONG[0] + " Once more:"
    with client(disagg) as c:
        first = c.completions.create(model="smol", prompt=prompt, max_tokens=4, temperature=0)
        again = c.completions.create(model="smol", prompt=prompt, max_tokens=4, temperature=0)
    assert again.choices[0].text == first.choices[0].text
    assert first.usage is not None and again.usage is not None
    details = again.usage.prompt_tokens_details
    assert details is not None and (details.cached_tokens or 0) >= 32 * 2, again.usage


def test_streamed_chat_over_the_pair(disagg: str) -> None:
    messages = [{"role": "user", "content": LONG[0]}]
    with client(disagg) as c:
        whole = c.chat.completions.create(
            model="smol", messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        chunks = list(
            c.chat.completions.create(
                model="smol", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
        )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert whole.usage is not None and whole.usage.completion_tokens == MAX_TOKENS
