"""qwen3_coder: ``<function=f><parameter=a>value</parameter></function>``, typed by schema."""

from __future__ import annotations

from typing import Any

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
from dynamo_gateway.parsers.qwen3_coder import (
    Qwen3CoderToolParser,
    convert_value,
    parameter_types,
)

from .streaming import (
    check_tool_deltas,
    chunks_at,
    counter_ids,
    cut_lists,
    run_tools,
    split_everywhere,
)

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "search_products",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "limit": {"type": "integer"},
                    "max_price": {"type": "number"},
                    "in_stock": {"type": "boolean"},
                    "filters": {"type": "object"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "sort": {"anyOf": [{"type": "null"}, {"type": "string"}]},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "no_params"}},
]


def make(ids: IdFactory) -> Qwen3CoderToolParser:
    return Qwen3CoderToolParser(TOOLS, ids=ids)


def untyped(ids: IdFactory) -> Qwen3CoderToolParser:
    return Qwen3CoderToolParser(None, ids=ids)


SEARCH = (
    "<tool_call>\n<function=search_products>\n"
    "<parameter=query>\nwaterproof running shoes\n</parameter>\n"
    "<parameter=limit>\n5\n</parameter>\n"
    "<parameter=max_price>\n99.5\n</parameter>\n"
    "<parameter=in_stock>\nTrue\n</parameter>\n"
    '<parameter=filters>\n{"brand": "Ünï", "size": [42, 43]}\n</parameter>\n'
    "<parameter=tags>\n['trail', 'rain']\n</parameter>\n"
    "<parameter=sort>\nnull\n</parameter>\n"
    "</function>\n</tool_call>"
)
SEARCH_ARGS = (
    '{"query":"waterproof running shoes","limit":5,"max_price":99.5,"in_stock":true,'
    '"filters":{"brand":"Ünï","size":[42,43]},"tags":["trail","rain"],"sort":null}'
)
CODE = (
    "<tool_call>\n<function=write_file>\n<parameter=path>\nmain.py\n</parameter>\n"
    '<parameter=content>\ndef f():\n    return "<b>"  # a \\ slash\n\n</parameter>\n'
    "</function>\n</tool_call>"
)
CODE_ARGS = '{"path":"main.py","content":"def f():\\n    return \\"<b>\\"  # a \\\\ slash\\n"}'

VALID = [
    (SEARCH, "", [("search_products", SEARCH_ARGS)]),
    (
        "I'll search for that.\n\n" + SEARCH,
        "I'll search for that.",
        [("search_products", SEARCH_ARGS)],
    ),
    (
        CODE + "\n<tool_call>\n<function=no_params>\n</function>\n</tool_call>",
        "",
        [("write_file", CODE_ARGS), ("no_params", "{}")],
    ),
    (
        # </parameter> left out: the value ends at the next tag
        "<tool_call>\n<function=search_products>\n<parameter=query>\nboots\n"
        "<parameter=limit>\nmany\n</function>\n</tool_call>",
        "",
        [("search_products", '{"query":"boots","limit":"many"}')],  # not an integer: a string
    ),
    (
        # a repeated parameter keeps its first value; </function> left out
        "<tool_call>\n<function=search_products>\n<parameter=limit>\n1\n</parameter>\n"
        "<parameter=limit>\n2\n</parameter>\n</tool_call>",
        "",
        [("search_products", '{"limit":1}')],
    ),
    ("Nothing to call here.", "Nothing to call here.", []),
    ("Write <function=f> inside <tool_call>.", "Write <function=f> inside <tool_call>.", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), VALID)
def test_valid_outputs(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    result = split_everywhere(make, text, ("<function=", "<parameter=") if calls else ())
    assert result.content == content
    assert [(c.name, c.arguments) for c in result.tool_calls] == calls


def test_without_schemas_values_are_strings() -> None:
    result = split_everywhere(untyped, SEARCH)
    assert result.tool_calls[0].arguments == (
        '{"query":"waterproof running shoes","limit":"5","max_price":"99.5","in_stock":"True",'
        '"filters":"{\\"brand\\": \\"Ünï\\", \\"size\\": [42, 43]}",'
        '"tags":"[\'trail\', \'rain\']","sort":"null"}'
    )


CONTENT = [
    "<tool_call>\nnot xml at all\n</tool_call>",
    "<tool_call>\n<function=bad name>\n</function>\n</tool_call>",
    "<tool_call>\n<function=search_pro",  # unterminated before the call is certain
    "<tool_call>\n<func",
]


@pytest.mark.parametrize("text", CONTENT)
def test_non_calls_are_content(text: str) -> None:
    assert split_everywhere(make, text) == ParsedTools(text, [])


def test_truncated_call_keeps_complete_parameters() -> None:
    text = (
        "<tool_call>\n<function=search_products>\n<parameter=query>\nboots\n</parameter>\n"
        "<parameter=limit>\n1"
    )
    result = split_everywhere(make, text)
    assert result == ParsedTools("", [ToolCall("call_0", "search_products", '{"query":"boots"}')])


def test_malformed_parameter_tag_ends_the_call_and_its_block() -> None:
    text = (
        "<tool_call>\n<function=search_products>\n<parameter=query>\nx\n</parameter>\n"
        "<parameter=bad name>\ny\n</parameter>\n</function>\n</tool_call>\nAfter."
    )
    result = split_everywhere(make, text)
    assert result == ParsedTools("After.", [ToolCall("call_0", "search_products", '{"query":"x"}')])


def test_call_is_announced_at_the_function_tag_and_parameters_sent_whole() -> None:
    stream = make(counter_ids()).stream()
    assert stream.feed("Ok.\n<tool_call>\n<function=search_products>\n<parameter=query>\nrun") == [
        ContentDelta("Ok."),
        ToolCallStart(0, "call_0", "search_products"),
    ]
    assert stream.feed("ning\n</parameter>\n") == [ToolArgumentsDelta(0, '{"query":"running"')]
    assert stream.feed("</function>\n</tool_call>") == [ToolArgumentsDelta(0, "}")]
    assert stream.finish() == []


@pytest.mark.parametrize(
    ("text", "types", "value"),
    [
        ("42", ["integer"], 42),
        ("4.2", ["integer"], "4.2"),
        ("-3", ["number"], -3),
        ("1e3", ["number"], 1000.0),
        ("nan", ["number"], "nan"),
        ("FALSE", ["boolean"], False),
        ("yes", ["boolean"], "yes"),
        ("null", ["integer", "null"], None),
        ("null", ["string"], "null"),
        (" 7 ", ["string", "integer"], " 7 "),
        ('{"a": 1}', ["object"], {"a": 1}),
        ("{'a': (1, 2)}", ["object"], {"a": (1, 2)}),
        ("[1, 2]", ["object"], "[1, 2]"),
        ("[1, 2]", ["array"], [1, 2]),
        ("{'a': {1, 2}}", ["object"], "{'a': {1, 2}}"),  # a set is not JSON
        ("anything", [], "anything"),
    ],
)
def test_convert_value_by_declared_type(text: str, types: list[str], value: object) -> None:
    assert convert_value(text, types) == value


def test_parameter_types_reads_openai_tools() -> None:
    types = parameter_types(TOOLS)
    assert types["search_products"]["limit"] == ["integer"]
    assert types["search_products"]["sort"] == ["null", "string"]
    assert types["no_params"] == {}
    assert parameter_types([{"type": "function"}, {"function": {"name": 3}}]) == {}
    assert parameter_types(None) == {}


SAMPLES = [text for text, _, _ in VALID] + CONTENT


@settings(max_examples=150, deadline=None)
@given(cuts=cut_lists)
def test_random_chunkings_add_up(cuts: list[int]) -> None:
    for text in SAMPLES:
        expected = make(counter_ids()).parse(text)
        check_tool_deltas(run_tools(make(counter_ids()), chunks_at(text, cuts)), expected)
