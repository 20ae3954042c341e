"""End to end on a real checkpoint: SmolLM2-135M-Instruct through `serve`, from its HF
directory and from its GGUF file, checked against transformers on the same weights.

One gateway process per checkpoint form and one transformers model for the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dynamo_gateway.preprocess import Tokenizer
from dynamo_gateway.testing import GatewayProcess, read_metric, start_gateway

pytestmark = pytest.mark.real_model

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
]
MAX_TOKENS = 48


def _gguf_file(model_dir: Path) -> Path:
    files = sorted(model_dir.glob("*.gguf"))
    assert len(files) == 1, f"expected one GGUF file in {model_dir}"
    return files[0]


@pytest.fixture(scope="module")
def hf(real_model: Path) -> Iterator[tuple[Any, Any]]:
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    model = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    yield tokenizer, model


def _serve(args: list[str], tmp: Path) -> Iterator[GatewayProcess]:
    gw = start_gateway(["--engine", "reference", "--device", "cpu", *args], tmp)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def from_dir(
    real_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    args = ["--model", str(real_model), "--served-model-name", "smol"]
    yield from _serve(args, tmp_path_factory.mktemp("dir"))


@pytest.fixture(scope="module")
def from_gguf(
    real_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    args = ["--model", str(_gguf_file(real_model)), "--served-model-name", "smol"]
    yield from _serve(args, tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def disaggregated(
    real_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """`serve --prefill-workers 1 --decode-workers 1`: one command, KV moved in-process."""
    args = ["--model", str(real_model), "--served-model-name", "smol"]
    args += ["--prefill-workers", "1", "--decode-workers", "1", "--disagg-min-prefill-tokens", "8"]
    yield from _serve(args, tmp_path_factory.mktemp("disagg"))


_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    # An open client's socket, collected late, fails the run with a ResourceWarning.
    yield
    while _clients:
        _clients.pop().close()


def _client(gw: GatewayProcess) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0, timeout=120)
    _clients.append(client)
    return client


def _chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def _prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def _hf_greedy(hf: tuple[Any, Any], messages: list[dict[str, str]]) -> tuple[str, str]:
    """transformers' greedy answer and finish reason ("stop" at EOS, else "length")."""
    tokenizer, model = hf
    prompt = _prompt_ids(tokenizer, messages)
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    new = [int(t) for t in out[0, len(prompt) :]]
    finish = "stop" if new and new[-1] == tokenizer.eos_token_id else "length"
    return tokenizer.decode(new, skip_special_tokens=True), finish


@pytest.mark.parametrize("form", ["from_dir", "from_gguf", "disaggregated"])
def test_greedy_chat_equals_transformers(
    form: str, request: pytest.FixtureRequest, hf: tuple[Any, Any]
) -> None:
    gw: GatewayProcess = request.getfixturevalue(form)
    client = _client(gw)
    finishes = []
    for question in QUESTIONS:
        expected_text, expected_finish = _hf_greedy(hf, _chat(question))
        resp = client.chat.completions.create(
            model="smol",
            messages=_chat(question),
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        choice = resp.choices[0]
        assert choice.message.content == expected_text, question
        assert choice.finish_reason == expected_finish, question
        finishes.append(choice.finish_reason)
        assert resp.usage is not None
        assert resp.usage.prompt_tokens == len(_prompt_ids(hf[0], _chat(question)))
    # Real answers end at the model's EOS (<|im_end|>), not at the token limit.
    assert "stop" in finishes
    if form == "disaggregated":
        # Every answer was prefilled on the prefill worker and decoded on the other.
        remote = read_metric(gw.url, "dynamo_gateway_remote_prefill_total", model="smol")
        assert remote == len(QUESTIONS)


def test_the_capital_of_france_is_paris(from_gguf: GatewayProcess) -> None:
    resp = _client(from_gguf).chat.completions.create(
        model="smol",
        messages=_chat(QUESTIONS[0]),
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert "Paris" in (resp.choices[0].message.content or "")
    assert resp.choices[0].finish_reason == "stop"


def test_streaming_equals_non_streaming(from_dir: GatewayProcess) -> None:
    client = _client(from_dir)
    for question in QUESTIONS[:2]:
        whole = client.chat.completions.create(
            model="smol",
            messages=_chat(question),
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        parts: list[str] = []
        finish = None
        usage = None
        for chunk in client.chat.completions.create(
            model="smol",
            messages=_chat(question),
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(parts) == whole.choices[0].message.content
        assert finish == whole.choices[0].finish_reason
        assert usage is not None and whole.usage is not None
        assert usage.completion_tokens == whole.usage.completion_tokens
        assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_multi_turn_conversation_reports_cached_tokens(from_dir: GatewayProcess) -> None:
    client = _client(from_dir)
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "You are a concise assistant. " * 8},
    ]
    cached: list[int] = []
    prompts: list[int] = []
    for question in ["Tell me about Paris.", "And about Rome?", "Which one is older?"]:
        messages.append({"role": "user", "content": question})
        resp = client.chat.completions.create(
            model="smol",
            messages=messages,
            max_tokens=24,
            temperature=0,
        )
        messages.append({"role": "assistant", "content": resp.choices[0].message.content or ""})
        assert resp.usage is not None
        details = resp.usage.prompt_tokens_details
        cached.append((details.cached_tokens or 0) if details else 0)
        prompts.append(resp.usage.prompt_tokens)
    # A fresh system prompt of ~70 tokens is computed, not cached; later turns
    # re-send the whole history, most of which is now cached (in full blocks).
    assert cached[0] < prompts[0]
    for turn in (1, 2):
        assert cached[turn] >= prompts[turn - 1] - 32, (cached, prompts)
        assert cached[turn] < prompts[turn]


def test_gguf_tokenizer_matches_transformers_gguf_converter(real_model: Path) -> None:
    """Our tokenizer rebuilt from GGUF metadata vs transformers' own GGUF conversion."""
    gguf_file = _gguf_file(real_model)
    theirs = AutoTokenizer.from_pretrained(real_model, gguf_file=gguf_file.name)
    ours = Tokenizer.from_dir(gguf_file)
    texts = [
        "Hello world 12345 and 3.14159",
        "  leading spaces\n\n\ttabs and\r\nCRLF",
        "café naïve 日本語 emoji 🎉🚀",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "don't I'll we've THEY'RE",
        "def f(x):\n    return x ** 2  # square",
    ]
    for text in texts:
        expected = theirs.encode(text, add_special_tokens=True)
        assert ours.encode(text) == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == theirs.decode(expected)
