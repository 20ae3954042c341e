"""llama3_json: Llama 3.1/3.2/3.3 JSON tool calls, ``{"name": ..., "parameters": ...}``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from dynamo_gateway.parsers.base import ContentDelta, IdFactory, ParsedTools, ToolCall
from dynamo_gateway.parsers.llama3_json import Llama3JsonToolParser

from .streaming import (
    check_tool_deltas,
    chunks_at,
    counter_ids,
    cut_lists,
    run_tools,
    split_everywhere,
)


def make(ids: IdFactory) -> Llama3JsonToolParser:
    return Llama3JsonToolParser(ids=ids)


WEATHER = '{"name": "get_weather", "parameters": {"location": "San Francisco, CA"}}'

VALID = [
    (WEATHER, "", [("get_weather", '{"location":"San Francisco, CA"}')]),
    (
        '<|python_tag|>{"name": "get_weather", "parameters": {"location": "Paris"}}',
        "",
        [("get_weather", '{"location":"Paris"}')],
    ),
    (
        '{"name": "get_weather", "parameters": {"location": "Paris"}}; '
        '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}',
        "",
        [
            ("get_weather", '{"location":"Paris"}'),
            ("get_time", '{"timezone":"Europe/Paris"}'),
        ],
    ),
    (
        '\n{"type": "function", "name": "search", "arguments": {"q": "naïve \\"x\\"", '
        '"opts": {"k": [1, {"deep": true}]}}}',
        "",
        [("search", '{"q":"naïve \\"x\\"","opts":{"k":[1,{"deep":true}]}}')],
    ),
    (
        '{"parameters": {"location": "Oslo"}, "name": "get_weather"}',
        "",
        [("get_weather", '{"location":"Oslo"}')],
    ),
    (
        WEATHER + "\nLet me know if you need more.",
        "Let me know if you need more.",
        [("get_weather", '{"location":"San Francisco, CA"}')],
    ),
    (WEATHER + ";", "", [("get_weather", '{"location":"San Francisco, CA"}')]),
    ("Hello! How can I help you today?", "Hello! How can I help you today?", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), VALID)
def test_valid_outputs(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    result = split_everywhere(make, text, ('"parameters"',) if calls else ())
    assert result.content == content
    assert [(c.name, c.arguments) for c in result.tool_calls] == calls


CONTENT = [
    '{"temperature": 21, "unit": "C"}',  # a JSON answer, not a call
    '{"name": "Alice", "age": 30}',
    'Here is the call: {"name": "get_weather", "parameters": {}}',  # calls come first only
    '<|python_tag|>brave_search.call(query="weather")',  # a built-in tool, not JSON
    '{"name": "get_weather", "parameters": ',  # unterminated before the call is certain
    '{"name": "get_weather", "parameters": "Paris"}',  # parameters not an object
    '{"name": "get_weather"}',  # no parameters
    '{"name": get_weather}',  # invalid JSON
    "<|python_ta",
]


@pytest.mark.parametrize("text", CONTENT)
def test_non_calls_are_content(text: str) -> None:
    assert split_everywhere(make, text) == ParsedTools(text, [])


def test_a_json_answer_is_released_at_its_first_foreign_key() -> None:
    stream = make(counter_ids()).stream()
    assert stream.feed('{"name": "Alice", "ag') == []
    assert stream.feed('e": 30}') == [ContentDelta('{"name": "Alice", "age": 30}')]


def test_truncated_call_is_closed() -> None:
    text = '{"name": "get_weather", "parameters": {"location": "Par'
    result = split_everywhere(make, text)
    assert result == ParsedTools("", [ToolCall("call_0", "get_weather", '{"location":"Par"}')])


def test_text_after_a_broken_call_is_content() -> None:
    text = '{"name": "f", "parameters": {"a": 1} oops'
    result = split_everywhere(make, text)
    assert result == ParsedTools("oops", [ToolCall("call_0", "f", '{"a":1}')])


SAMPLES = [text for text, _, _ in VALID] + CONTENT


@settings(max_examples=150, deadline=None)
@given(cuts=cut_lists)
def test_random_chunkings_add_up(cuts: list[int]) -> None:
    for text in SAMPLES:
        expected = make(counter_ids()).parse(text)
        check_tool_deltas(run_tools(make(counter_ids()), chunks_at(text, cuts)), expected)
