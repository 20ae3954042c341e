"""mistral: ``[TOOL_CALLS]`` with a JSON list (v2-v7) or ``name[ARGS]{...}`` (v11+)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from dynamo_gateway.parsers.base import IdFactory, ParsedTools, ToolCall
from dynamo_gateway.parsers.mistral import MistralToolParser

from .streaming import (
    check_tool_deltas,
    chunks_at,
    counter_ids,
    cut_lists,
    run_tools,
    split_everywhere,
)


def make(ids: IdFactory) -> MistralToolParser:
    return MistralToolParser(ids=ids)


PARIS = '{"location":"Paris, France","format":"celsius"}'

VALID = [
    (
        '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": '
        '{"location": "Paris, France", "format": "celsius"}}]',
        "",
        [("get_current_weather", PARIS)],
    ),
    (
        '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"location": "Paris, France", '
        '"format": "celsius"}}, {"name": "get_time", "arguments": {"tz": "CET"}, '
        '"id": "a1b2c3d4e"}]',
        "",
        [("get_current_weather", PARIS), ("get_time", '{"tz":"CET"}')],
    ),
    (
        'Let me check that.[TOOL_CALLS][{"name": "get_current_weather", "arguments": '
        '{"location": "Paris, France", "format": "celsius"}}]',
        "Let me check that.",
        [("get_current_weather", PARIS)],
    ),
    (
        '[TOOL_CALLS]get_current_weather[ARGS]{"location": "Paris, France", "format": "celsius"}',
        "",
        [("get_current_weather", PARIS)],
    ),
    (
        '[TOOL_CALLS]get_current_weather[ARGS]{"location": "Paris, France", "format": "celsius"}'
        '[TOOL_CALLS]search[ARGS]{"q": "Ünïcode \\"quoted\\"", "f": {"n": [1, null]}}',
        "",
        [
            ("get_current_weather", PARIS),
            ("search", '{"q":"Ünïcode \\"quoted\\"","f":{"n":[1,null]}}'),
        ],
    ),
    (
        '[TOOL_CALLS]get_current_weather[CALL_ID]a1B2c3D4e[ARGS]{"location": "Paris, France", '
        '"format": "celsius"}',
        "",
        [("get_current_weather", PARIS)],
    ),
    (
        'I will look.[TOOL_CALLS]get_time{"tz": "UTC"}',
        "I will look.",
        [("get_time", '{"tz":"UTC"}')],
    ),
    ("Bonjour ! Comment puis-je vous aider ?", "Bonjour ! Comment puis-je vous aider ?", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), VALID)
def test_valid_outputs(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    result = split_everywhere(make, text, ("[TOOL_CALLS]", "[ARGS]") if calls else ())
    assert result.content == content
    assert [(c.name, c.arguments) for c in result.tool_calls] == calls


CONTENT = [
    '[TOOL_CALLS][{"name": "get_current_weather"',  # unterminated, never certain
    "[TOOL_CALLS]Sorry, I cannot call tools.",
    '[TOOL_CALLS][{"name": "f", "arguments": "not json"}]',
    '[TOOL_CALLS][{"name": "f"}]',  # no arguments
    "[TOOL_CALLS][1, 2]",
    "[TOOL_CALLS]f[ARGS]oops",
    "[TOOL_CALLS]f[CALL_",
    "half a marker [TOOL_CA",
]


@pytest.mark.parametrize("text", CONTENT)
def test_non_calls_are_content(text: str) -> None:
    assert split_everywhere(make, text) == ParsedTools(text, [])


def test_truncated_calls_are_closed() -> None:
    v11 = '[TOOL_CALLS]f[ARGS]{"a": [1, {"b": "x'
    assert split_everywhere(make, v11) == ParsedTools(
        "", [ToolCall("call_0", "f", '{"a":[1,{"b":"x"}]}')]
    )
    listed = '[TOOL_CALLS][{"name": "f", "arguments": {"a": tr'
    assert split_everywhere(make, listed) == ParsedTools("", [ToolCall("call_0", "f", "{}")])


def test_an_element_that_is_not_a_call_ends_the_list() -> None:
    text = '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"bad": 1}]'
    result = split_everywhere(make, text)
    assert result.tool_calls == [ToolCall("call_0", "f", '{"a":1}')]
    assert result.content == ', {"bad": 1}]'


SAMPLES = [text for text, _, _ in VALID] + CONTENT


@settings(max_examples=150, deadline=None)
@given(cuts=cut_lists)
def test_random_chunkings_add_up(cuts: list[int]) -> None:
    for text in SAMPLES:
        expected = make(counter_ids()).parse(text)
        check_tool_deltas(run_tools(make(counter_ids()), chunks_at(text, cuts)), expected)
