"""Reasoning parsers: ``deepseek_r1`` (starts inside thinking) and ``qwen3`` (optional)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_gateway.parsers.base import ReasoningParser, collect_reasoning
from dynamo_gateway.parsers.reasoning import THINK_END, deepseek_r1, qwen3

from .streaming import chunks_at, cut_lists, reasoning_split_everywhere, run_reasoning

DEEPSEEK = [
    (
        "Okay, the user asks for 2 + 2. That is 4.\n</think>\n\nThe answer is **4**.",
        ("Okay, the user asks for 2 + 2. That is 4.", "The answer is **4**."),
    ),
    ("<think>\nHmm, let me see.\n\n</think>\nParis.", ("Hmm, let me see.", "Paris.")),
    ("  still thinking, cut off by max_tokens  ", ("still thinking, cut off by max_tokens", "")),
    ("</think>Straight to the answer.", (None, "Straight to the answer.")),
    ("<think>unterminated", ("unterminated", "")),
    ("x</think>a</think>b <think>c", ("x", "a</think>b <think>c")),
    ("", (None, "")),
]

QWEN3 = [
    (
        "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?",
        ("The user greets me.", "Hello! How can I help?"),
    ),
    ("Hello! How can I help?", (None, "Hello! How can I help?")),
    ("\n\n  Hello  \n", (None, "\n\n  Hello  \n")),  # no reasoning: verbatim
    ("<think>\n\n</think>\n\nHi", (None, "Hi")),  # thinking switched off
    ("\n<think>\nunterminated <thi", ("unterminated <thi", "")),
    ("Text mentioning </think> later.", (None, "Text mentioning </think> later.")),
    ("<thinking> is a tag", (None, "<thinking> is a tag")),
    ("<thi", (None, "<thi")),
    ("", (None, "")),
]

CASES: list[tuple[Callable[[], ReasoningParser], str, tuple[str | None, str]]] = [
    *((deepseek_r1, text, want) for text, want in DEEPSEEK),
    *((qwen3, text, want) for text, want in QWEN3),
]


@pytest.mark.parametrize(("make", "text", "expected"), CASES)
def test_split_at_every_position(
    make: Callable[[], ReasoningParser], text: str, expected: tuple[str | None, str]
) -> None:
    assert reasoning_split_everywhere(make, text) == expected


def test_reasoning_streams_before_the_end_marker() -> None:
    stream = qwen3().stream()
    assert stream.feed("<thi") == []
    assert stream.feed("nk>\nStep one. ") == [("reasoning", "Step one.")]
    assert stream.feed("Step two.\n</th") == [("reasoning", " Step two.")]
    assert stream.feed("ink>\n\nAnswer") == [("content", "Answer")]
    assert stream.finish() == []


def test_parsers_satisfy_the_protocol_and_expose_the_end_marker() -> None:
    for make in (deepseek_r1, qwen3):
        parser = make()
        assert isinstance(parser, ReasoningParser)
        assert parser.end_marker == THINK_END == "</think>"


pieces = st.sampled_from(["<think>", "</think>", "<th", "ink>", "</", " ", "\n", "a", "é", ">"])


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(pieces, max_size=20), cuts=cut_lists)
def test_any_text_and_chunking_agree_with_parse(parts: list[str], cuts: list[int]) -> None:
    text = "".join(parts)
    for make in (deepseek_r1, qwen3):
        expected = make().parse(text)
        assert collect_reasoning(run_reasoning(make(), chunks_at(text, cuts))) == expected
        reasoning, content = expected
        assert reasoning is None or reasoning == reasoning.strip() != ""
        assert len(reasoning or "") + len(content) <= len(text)
