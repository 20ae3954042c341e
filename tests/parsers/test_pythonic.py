"""pythonic: ``[f(a=1, b="x"), g()]`` as Llama 3.2 and Llama 4 write calls."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from dynamo_gateway.parsers.base import IdFactory, ParsedTools
from dynamo_gateway.parsers.pythonic import PythonicToolParser, parse_call_list

from .streaming import (
    check_tool_deltas,
    chunks_at,
    counter_ids,
    cut_lists,
    run_tools,
    split_everywhere,
)


def make(ids: IdFactory) -> PythonicToolParser:
    return PythonicToolParser(ids=ids)


VALID = [
    (
        '[get_weather(city="San Francisco", metric="celsius")]',
        "",
        [("get_weather", '{"city":"San Francisco","metric":"celsius"}')],
    ),
    (
        '[get_weather(city="Paris"), get_time(timezone="Europe/Paris"), get_date()]',
        "",
        [
            ("get_weather", '{"city":"Paris"}'),
            ("get_time", '{"timezone":"Europe/Paris"}'),
            ("get_date", "{}"),
        ],
    ),
    (
        '<|python_start|>[get_weather(city="Tokyo")]<|python_end|>',
        "",
        [("get_weather", '{"city":"Tokyo"}')],
    ),
    (
        "[search(query='caf\\u00e9 \"Le Procope\" it\\'s', filters={'max': 3, 'tags': ['a', "
        '\'b\']}, exact=False, limit=None, ratio=-0.5, pair=(1, 2), text="""a ] b""")]',
        "",
        [
            (
                "search",
                '{"query":"café \\"Le Procope\\" it\'s","filters":{"max":3,"tags":["a","b"]},'
                '"exact":false,"limit":null,"ratio":-0.5,"pair":[1,2],"text":"a ] b"}',
            )
        ],
    ),
    ("  [get_date()]\n\nDone.", "Done.", [("get_date", "{}")]),
    ("The weather is sunny.", "The weather is sunny.", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), VALID)
def test_valid_outputs(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    result = split_everywhere(make, text, ("(", "<|python") if calls else ())
    assert result.content == content
    assert [(c.name, c.arguments) for c in result.tool_calls] == calls


CONTENT = [
    "[get_weather('Paris')]",  # positional arguments have no names
    "[get_weather(city=city_name)]",  # a variable, not a literal
    '[get_weather(city=open("/etc/passwd").read())]',
    "[get_weather(**kwargs)]",
    "[weather.get(city='x')]",  # not a plain name
    "[1, 2, 3]",
    "[]",
    "[Note] the tools are down.",
    'Here: [get_weather(city="Paris")]',  # calls come first only
    '[get_weather(city="Par',  # unterminated
    "[f(x=1e999)]",  # not representable in JSON
    "[f(x={1: 2})]",  # a non-string key
    "<|python_start|>",
]


@pytest.mark.parametrize("text", CONTENT)
def test_non_calls_are_content(text: str) -> None:
    assert split_everywhere(make, text) == ParsedTools(text, [])


def test_parse_call_list_reads_literals_only() -> None:
    assert parse_call_list("[f(a=[1, {'b': None}], c=-2)]") == [
        ("f", '{"a":[1,{"b":null}],"c":-2}')
    ]
    assert parse_call_list("[f(a=-True)]") is None
    assert parse_call_list("[f(a=b'x')]") is None
    assert parse_call_list("f(a=1)") is None
    assert parse_call_list("[" * 10_000) is None


SAMPLES = [text for text, _, _ in VALID] + CONTENT


@settings(max_examples=150, deadline=None)
@given(cuts=cut_lists)
def test_random_chunkings_add_up(cuts: list[int]) -> None:
    for text in SAMPLES:
        expected = make(counter_ids()).parse(text)
        check_tool_deltas(run_tools(make(counter_ids()), chunks_at(text, cuts)), expected)
