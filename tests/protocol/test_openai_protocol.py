"""Request decoding and validation: types, ranges, shapes, and the error's param."""

from __future__ import annotations

import json

import pytest

from dynamo_gateway.errors import InvalidRequestError
from dynamo_gateway.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    decode_request,
    prompts,
    stop_strings,
)


def _chat(**fields: object) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps(body).encode()


def test_valid_chat_with_every_sampling_field() -> None:
    req = decode_request(
        _chat(max_tokens=5, temperature=0.5, top_p=0.9, top_k=40, n=2, seed=-3, stop="x",
              logprobs=True, top_logprobs=3, ignore_eos=True, min_tokens=2, stream=True,
              stream_options={"include_usage": True}, presence_penalty=1.0,
              frequency_penalty=-1.0, repetition_penalty=1.1, user="u", tools=[]),
        ChatCompletionRequest,
    )  # fmt: skip
    assert (req.max_tokens, req.top_k, req.n, req.seed) == (5, 40, 2, -3)
    assert stop_strings(req) == ["x"]
    assert req.stream_options is not None and req.stream_options.include_usage


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"n": 129}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"seed": 2**70}, "seed"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"content": "no role"}]}, "messages[0]"),
        ({"model": ""}, "model"),
    ],
)  # fmt: skip
def test_invalid_chat_fields(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_request(_chat(**fields), ChatCompletionRequest)
    assert info.value.param == param
    assert info.value.status == 400


def test_text_parts_are_accepted() -> None:
    body = _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}]}])
    req = decode_request(body, ChatCompletionRequest)
    assert req.messages[0].content is not None


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("abc", ["abc"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_completion_prompt_forms(prompt: object, expected: list[object]) -> None:
    req = decode_request(json.dumps({"model": "m", "prompt": prompt}).encode(), CompletionRequest)
    assert prompts(req) == expected


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": []},
        {"model": "m", "prompt": [1, "a"]},
        {"model": "m", "prompt": [[1], []]},
        {"model": "m", "prompt": [-1]},
        {"model": "m", "prompt": [True]},
        {"model": "m", "prompt": "x", "echo": True},
        {"model": "m", "prompt": "x", "suffix": "y"},
        {"model": "m", "prompt": "x", "best_of": 3},
        {"model": "m", "prompt": "x", "logprobs": 21},
    ],
)
def test_invalid_completions(body: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError):
        decode_request(json.dumps(body).encode(), CompletionRequest)


def test_malformed_json_has_code() -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_request(b'{"model": ', CompletionRequest)
    assert info.value.code == "invalid_json"
