"""The incremental JSON scanner: compact output, and safe points that always close validly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_gateway.parsers._json import JsonScanner

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**12), max_value=10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    value=json_values,
    indent=st.sampled_from([None, 2]),
    ascii_only=st.booleans(),
)
def test_every_prefix_closes_validly_and_the_whole_is_compact(
    value: object, indent: int | None, ascii_only: bool
) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    scanner = JsonScanner()
    for i, ch in enumerate(text):
        assert scanner.feed(ch) == 1, (i, text)
        # what a stream may have sent so far, closed, is valid JSON (a bare number or
        # literal has no safe point before it ends; arguments are always objects)
        if scanner.safe:
            json.loads(scanner.text(0, scanner.safe) + scanner.closer)
    scanner.finish()
    assert scanner.done and not scanner.error
    assert json.loads(scanner.text()) == value
    assert scanner.text() == json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":"))


@pytest.mark.parametrize(
    "text",
    ['{"a": 1,}', "[1,]", '{"a" 1}', "{'a': 1}", "[01]", '"\\x"', "tru e", "{]", "[}", "-"],
)
def test_invalid_json_stops_at_the_offending_character(text: str) -> None:
    scanner = JsonScanner()
    stop = scanner.feed(text)
    scanner.finish()
    assert scanner.error and not scanner.done
    assert stop < len(text) or text == "-"


def test_raw_control_characters_are_escaped() -> None:
    scanner = JsonScanner()
    scanner.feed('{"a": "x\ty\n\x01"}')
    assert scanner.done and scanner.text() == '{"a":"x\\ty\\n\\u0001"}'


def test_members_pause_at_key_value_start_and_end() -> None:
    scanner = JsonScanner(members=True)
    text = '{"name": "f", "arguments": {"x": 1}}'
    stops = []
    i = 0
    while not scanner.done:
        i = scanner.feed(text, i)
        stops.append(text[:i])
    assert stops[:4] == ['{"name"', '{"name": "', '{"name": "f"', '{"name": "f", "arguments"']
    assert [(m.key, scanner.text(m.start, m.end)) for m in scanner.members] == [
        ("name", '"f"'),
        ("arguments", '{"x":1}'),
    ]


def test_a_number_completes_at_the_end_of_text() -> None:
    scanner = JsonScanner()
    scanner.feed("[1, 23")
    assert scanner.text(0, scanner.safe) == "[1"
    scanner.finish()
    assert scanner.text(0, scanner.safe) + scanner.closer == "[1,23]"
