"""End to end: `serve --engine reference` on the demo model, checked against transformers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from dynamo_gateway.preprocess import Tokenizer
from dynamo_gateway.testing import GatewayProcess


@pytest.fixture(scope="module")
def hf_model(demo_model: Path) -> Iterator[object]:
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    yield model


@pytest.fixture
def client(gateway_server: Callable[..., GatewayProcess]) -> Iterator[openai.OpenAI]:
    gw = gateway_server("--engine", "reference", "--workers", "1", "--device", "cpu")
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as c:
        yield c


def _hf_greedy(model: object, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = model.generate(  # type: ignore[attr-defined]
            ids,
            attention_mask=torch.ones_like(ids),  # else the BOS (id 0 == pad id) is masked
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt) :]]


def test_greedy_text_equals_transformers(
    client: openai.OpenAI, hf_model: object, demo_model: Path
) -> None:
    tok = Tokenizer.from_dir(demo_model)
    for text in ("Once upon a time", "The river bank under a pale sky " * 6):
        prompt = tok.encode(text)
        expected = tok.decode(_hf_greedy(hf_model, prompt, 20))
        resp = client.completions.create(
            model="demo",
            prompt=prompt,
            max_tokens=20,
            temperature=0,
            extra_body={"min_tokens": 20},  # like min_new_tokens: EOS masked
        )
        assert resp.choices[0].text == expected
        assert resp.usage is not None and resp.usage.completion_tokens == 20


def test_chat_streams_text_and_reports_cached_tokens(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me about the quiet river " * 8}]
    first = client.chat.completions.create(
        model="demo",
        messages=messages,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert first.choices[0].message.content
    stream = client.chat.completions.create(
        model="demo",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
    assert text == first.choices[0].message.content
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached is not None and cached > 0 and cached % 16 == 0
    assert cached < usage.prompt_tokens
