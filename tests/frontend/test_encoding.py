"""Chunk encoding: the fast path must produce exactly what the slow path would."""

from __future__ import annotations

import json

import pytest

from dynamo_gateway.frontend.encoding import ChunkEncoder, usage_dict


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("text", ["plain", 'quo"te\\ and\nnewline', "emoji 🎉 and 中文", ""])
@pytest.mark.parametrize("index", [0, 3])
@pytest.mark.parametrize("first", [True, False])
def test_fast_chunk_equals_rich_chunk(chat: bool, text: str, index: int, first: bool) -> None:
    enc = ChunkEncoder(chat=chat, response_id="id-1", created=123, model='m"odel')
    fast = enc.text(index, text, first=first)
    rich = enc.rich(index, text, first=first)
    assert fast.startswith(b"data: ") and fast.endswith(b"\n\n")
    fast_obj = json.loads(fast[6:])
    rich_obj = json.loads(rich[6:])
    if chat and not first and not text:
        rich_obj["choices"][0]["delta"]["content"] = ""
    assert fast_obj == rich_obj
    assert fast_obj["model"] == 'm"odel'
    assert fast_obj["object"] == ("chat.completion.chunk" if chat else "text_completion")


def test_usage_chunk_has_empty_choices() -> None:
    enc = ChunkEncoder(chat=True, response_id="id", created=1, model="m")
    obj = json.loads(enc.usage(usage_dict(3, 4, 2))[6:])
    assert obj["choices"] == []
    assert obj["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 2},
    }  # fmt: skip


def test_masked_logprobs_stay_finite_numbers() -> None:
    from dynamo_gateway.frontend.encoding import MIN_LOGPROB, LogprobFormatter
    from dynamo_gateway.protocol.engine import TokenLogprob

    items = [TokenLogprob(5, -0.5, [(5, -0.5), (7, float("-inf"))])]
    for chat in (True, False):
        fmt = LogprobFormatter(lambda t: f"t{t}", lambda t: [t], chat=chat)
        encoded = json.loads(json.dumps(fmt.format(items)))
        text = json.dumps(encoded)
        assert "Infinity" not in text and "null" not in text
        assert str(MIN_LOGPROB) in text
