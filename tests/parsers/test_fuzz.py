"""Any text, any chunking: built-in tool parsers never raise and always agree with parse()."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_gateway.parsers.base import ContentDelta, IdFactory, ToolParser
from dynamo_gateway.plugins import load_plugins

from .streaming import check_tool_deltas, chunks_at, counter_ids, cut_lists, run_tools

REGISTRY = load_plugins(entry_points=False).registry
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"properties": {"a": {"type": "integer"}, "b": {"type": "object"}}},
        },
    }
]

# Pieces of every format's syntax, so random texts often come close to real calls.
FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<function=", "f>", "</function>", "<parameter=", "a>",
    "b>", "</parameter>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<|python_tag|>",
    "<|python_start|>", "<|python_end|>", "{", "}", "[", "]", "(", ")", '"name"', '"arguments"',
    '"parameters"', '"f"', ":", ",", ";", "=", '"', "'", "\\", "\\u00", "1", "-", "true",
    "None", "x", "é", " ", "\n", "f(", "a=1", "<", ">",
]  # fmt: skip


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(REGISTRY.tool_parsers.names()),
    parts=st.lists(st.sampled_from(FRAGMENTS), max_size=30),
    cuts=cut_lists,
)
def test_random_text_is_parsed_consistently(name: str, parts: list[str], cuts: list[int]) -> None:
    text = "".join(parts)
    factory = REGISTRY.tool_parsers.get(name)

    def make(ids: IdFactory) -> ToolParser:
        parser = factory(TOOLS)
        parser.ids = ids  # type: ignore[attr-defined]  # the built-ins take injected ids
        return parser

    expected = make(counter_ids()).parse(text)
    for call in expected.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
    assert len(expected.content) <= len(text)
    check_tool_deltas(run_tools(make(counter_ids()), chunks_at(text, cuts)), expected)
    check_tool_deltas(run_tools(make(counter_ids()), text), expected)


@pytest.mark.parametrize("name", REGISTRY.tool_parsers.names())
def test_feed_after_finish_is_ignored(name: str) -> None:
    stream = REGISTRY.tool_parsers.get(name)(None).stream()
    assert stream.feed("hello") == [ContentDelta("hello")]
    stream.finish()
    assert stream.feed("more") == [] and stream.finish() == []
