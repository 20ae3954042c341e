"""Checks that a parser's stream adds up to its ``parse``, however the text is split."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence

from hypothesis import strategies as st

from dynamo_gateway.parsers.base import (
    ContentDelta,
    IdFactory,
    ParsedTools,
    ReasoningParser,
    ReasoningPiece,
    ToolArgumentsDelta,
    ToolCallStart,
    ToolDelta,
    ToolParser,
    collect,
    collect_reasoning,
)

MakeToolParser = Callable[[IdFactory], ToolParser]


def counter_ids() -> IdFactory:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def chunks_at(text: str, cuts: Iterable[int]) -> list[str]:
    points = sorted({0, len(text), *(min(max(c, 0), len(text)) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def run_tools(parser: ToolParser, chunks: Iterable[str]) -> list[ToolDelta]:
    stream = parser.stream()
    out: list[ToolDelta] = []
    for chunk in chunks:
        out.extend(stream.feed(chunk))
    out.extend(stream.finish())
    return out


def check_tool_deltas(
    deltas: Sequence[ToolDelta], expected: ParsedTools, forbidden: Sequence[str] = ()
) -> None:
    """Well-formed deltas (calls numbered in order, arguments for the open call only,
    no empty pieces, no call text in content) that gather to ``expected``."""
    current = -1
    for delta in deltas:
        if isinstance(delta, ToolCallStart):
            assert delta.index == current + 1
            current = delta.index
        elif isinstance(delta, ToolArgumentsDelta):
            assert delta.index == current and delta.fragment
        else:
            assert isinstance(delta, ContentDelta) and delta.text
            assert not any(marker in delta.text for marker in forbidden), delta.text
    assert collect(deltas) == expected


def check_arguments_are_objects(result: ParsedTools) -> None:
    for call in result.tool_calls:
        assert isinstance(json.loads(call.arguments), dict), call
        assert call.id and call.name


def split_everywhere(make: MakeToolParser, text: str, forbidden: Sequence[str] = ()) -> ParsedTools:
    """``parse(text)``, after checking every two-chunk split and 1-character chunks."""
    expected = make(counter_ids()).parse(text)
    check_arguments_are_objects(expected)
    for k in range(len(text) + 1):
        deltas = run_tools(make(counter_ids()), [text[:k], text[k:]])
        check_tool_deltas(deltas, expected, forbidden)
    check_tool_deltas(run_tools(make(counter_ids()), text), expected, forbidden)
    return expected


def run_reasoning(parser: ReasoningParser, chunks: Iterable[str]) -> list[ReasoningPiece]:
    stream = parser.stream()
    out: list[ReasoningPiece] = []
    for chunk in chunks:
        out.extend(stream.feed(chunk))
    out.extend(stream.finish())
    return out


def reasoning_split_everywhere(
    make: Callable[[], ReasoningParser], text: str
) -> tuple[str | None, str]:
    expected = make().parse(text)
    for k in range(len(text) + 1):
        pieces = run_reasoning(make(), [text[:k], text[k:]])
        assert all(piece for _, piece in pieces)
        assert collect_reasoning(pieces) == expected, k
    assert collect_reasoning(run_reasoning(make(), text)) == expected
    return expected


cut_lists = st.lists(st.integers(min_value=0, max_value=2_000), max_size=12)
