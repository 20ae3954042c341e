"""hermes: ``<tool_call>`` JSON blocks, as Qwen2.5/Qwen3 and Hermes 2 Pro write them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from dynamo_gateway.parsers.base import (
    ContentDelta,
    IdFactory,
    ParsedTools,
    ToolArgumentsDelta,
    ToolCall,
    ToolCallStart,
)
from dynamo_gateway.parsers.hermes import HermesToolParser

from .streaming import (
    check_tool_deltas,
    chunks_at,
    counter_ids,
    cut_lists,
    run_tools,
    split_everywhere,
)

FORBIDDEN = ("<tool_call>", '"arguments"')


def make(ids: IdFactory) -> HermesToolParser:
    return HermesToolParser(ids=ids)


WEATHER = (
    '<tool_call>\n{"name": "get_current_temperature", "arguments": '
    '{"location": "San Francisco, CA, USA", "unit": "celsius"}}\n</tool_call>'
)
WEATHER_ARGS = '{"location":"San Francisco, CA, USA","unit":"celsius"}'

# (output, content, [(name, arguments)])
VALID = [
    (WEATHER, "", [("get_current_temperature", WEATHER_ARGS)]),
    (
        WEATHER + '\n<tool_call>\n{"name": "get_temperature_date", "arguments": '
        '{"location": "San Francisco, CA, USA", "date": "2024-10-01", "unit": "celsius"}}'
        "\n</tool_call>",
        "",
        [
            ("get_current_temperature", WEATHER_ARGS),
            (
                "get_temperature_date",
                '{"location":"San Francisco, CA, USA","date":"2024-10-01","unit":"celsius"}',
            ),
        ],
    ),
    (
        "I'll check the current temperature for you.\n\n" + WEATHER,
        "I'll check the current temperature for you.",
        [("get_current_temperature", WEATHER_ARGS)],
    ),
    ("The capital of France is Paris.\n", "The capital of France is Paris.\n", []),
    (
        # nested objects, raw and escaped unicode, escaped quotes, a tag inside a string
        '<tool_call>\n{"name": "search", "arguments": {"query": "café \\"Le Procope\\" \\u00e9", '
        '"filters": {"price": [1, 2.5e1, -3], "open": true, "note": null}, "emoji": "🙂", '
        '"text": "</tool_call> is a tag"}}\n</tool_call>',
        "",
        [
            (
                "search",
                '{"query":"café \\"Le Procope\\" \\u00e9","filters":{"price":[1,2.5e1,-3],'
                '"open":true,"note":null},"emoji":"🙂","text":"</tool_call> is a tag"}',
            )
        ],
    ),
    (
        # Hermes 2 Pro's prompt puts the arguments first
        '<tool_call>\n{"arguments": {"symbol": "TSLA"}, "name": "get_stock_fundamentals"}\n'
        "</tool_call>",
        "",
        [("get_stock_fundamentals", '{"symbol":"TSLA"}')],
    ),
    (
        "Sure.\n" + WEATHER + "\nDone, anything else?",
        "Sure.\nDone, anything else?",
        [("get_current_temperature", WEATHER_ARGS)],
    ),
    (
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        "",
        [("f", '{"a":1}')],
    ),
    ('<tool_call>\n{"name": "get_time"}\n</tool_call>', "", [("get_time", "{}")]),
    (
        '<tool_call>\n{"name": "write", "arguments": {"code": "line1\nline2"}}\n</tool_call>',
        "",
        [("write", '{"code":"line1\\nline2"}')],  # a raw newline escaped to strict JSON
    ),
    ('<tool_call>{"name":"f","arguments":{}}</tool_call>', "", [("f", "{}")]),
    ("Wrap each call in <tool_call> tags.", "Wrap each call in <tool_call> tags.", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), VALID)
def test_valid_outputs(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    forbidden = FORBIDDEN if calls else ()
    result = split_everywhere(make, text, forbidden)
    assert result.content == content
    assert [(c.name, c.arguments) for c in result.tool_calls] == calls
    assert [c.id for c in result.tool_calls] == [f"call_{i}" for i in range(len(calls))]


MALFORMED_AS_CONTENT = [
    '<tool_call>\n{"name": "get_wea',  # unterminated before the call is certain
    '<tool_call>\n{"name": "get_weather", "arguments": ',
    "<tool_call>\n{name: get_weather}\n</tool_call>",  # invalid JSON
    '<tool_call>\n["get_weather", {"city": "Paris"}]\n</tool_call>',  # wrong structure
    '<tool_call>\n{"function": "get_weather", "params": {}}\n</tool_call>',
    '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',
    '<tool_call>\n{"arguments": {"a": 1}, "name": "f"',  # arguments first, never closed
    "<tool_call>",
    "text <tool_ca",
]


@pytest.mark.parametrize("text", MALFORMED_AS_CONTENT)
def test_malformed_output_is_content(text: str) -> None:
    result = split_everywhere(make, text)
    assert result == ParsedTools(text.rstrip() if text.endswith("\n") else text, [])


def test_truncated_call_keeps_valid_arguments() -> None:
    # Once announced, a call stays a call: cut off, its arguments are closed.
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "San Fra'
    result = split_everywhere(make, text)
    assert result == ParsedTools("", [ToolCall("call_0", "get_weather", '{"city":"San Fra"}')])
    cut_in_key = '<tool_call>\n{"name": "f", "arguments": {"a": [1, 2], "b'
    assert split_everywhere(make, cut_in_key).tool_calls[0].arguments == '{"a":[1,2]}'
    cut_in_escape = '<tool_call>\n{"name": "f", "arguments": {"a": "x\\u00'
    assert split_everywhere(make, cut_in_escape).tool_calls[0].arguments == '{"a":"x"}'


def test_invalid_json_after_the_call_started_drops_the_rest_of_its_block() -> None:
    text = (
        '<tool_call>\n{"name": "f", "arguments": {"a": 1,, "b": 2}}\n</tool_call>\nThen some text.'
    )
    result = split_everywhere(make, text)
    assert result == ParsedTools("Then some text.", [ToolCall("call_0", "f", '{"a":1}')])


def test_content_streams_before_the_call_and_arguments_grow() -> None:
    stream = make(counter_ids()).stream()
    assert stream.feed("Let me look that up. <tool_") == [ContentDelta("Let me look that up.")]
    assert stream.feed('call>\n{"name": "search", "arguments": {"q": "dyn') == [
        ToolCallStart(0, "call_0", "search"),
        ToolArgumentsDelta(0, '{"q":"dyn'),
    ]
    assert stream.feed("amo") == [ToolArgumentsDelta(0, "amo")]
    assert stream.feed('", "n": 1') == [ToolArgumentsDelta(0, '"')]  # key and number held
    assert stream.feed("0}}\n</tool_call>") == [ToolArgumentsDelta(0, ',"n":10}')]
    assert stream.finish() == []


def test_a_partial_marker_is_held_then_released() -> None:
    stream = make(counter_ids()).stream()
    assert stream.feed("a <tool") == [ContentDelta("a")]
    assert stream.feed("box>") == [ContentDelta(" <toolbox>")]
    assert stream.finish() == []


def test_each_request_gets_fresh_random_ids() -> None:
    parser = HermesToolParser()
    first = parser.parse(WEATHER).tool_calls[0].id
    second = parser.parse(WEATHER).tool_calls[0].id
    assert first != second
    assert first.startswith("call_") and len(first) == len("call_") + 24


SAMPLES = [text for text, _, _ in VALID] + MALFORMED_AS_CONTENT


@settings(max_examples=150, deadline=None)
@given(cuts=cut_lists)
def test_random_chunkings_add_up(cuts: list[int]) -> None:
    for text in SAMPLES:
        expected = make(counter_ids()).parse(text)
        check_tool_deltas(run_tools(make(counter_ids()), chunks_at(text, cuts)), expected)
