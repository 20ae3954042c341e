"""Marker hold-back and the content whitespace rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynamo_gateway.parsers._text import ContentEmitter, partial_marker, scan

MARKERS = ("<tool_call>", "[TOOL_CALLS]")


@pytest.mark.parametrize(
    ("text", "held"),
    [
        ("hello", 0),
        ("hello <", 1),
        ("hello <tool_c", 7),
        ("a [TOOL", 5),
        ("<tool_call", 10),
        ("<", 1),
    ],
)
def test_hold_back_only_a_possible_marker_start(text: str, held: int) -> None:
    assert partial_marker(text, MARKERS) == held


def test_scan_finds_the_earliest_marker_or_holds_a_prefix() -> None:
    assert scan("ab[TOOL_CALLS]x<tool_call>", 0, MARKERS, final=False) == (2, 14, "[TOOL_CALLS]")
    assert scan("ab <too", 0, MARKERS, final=False) == (3, 3, None)
    assert scan("ab <too", 0, MARKERS, final=True) == (7, 7, None)


def _run(events: list[str | None], pieces: int = 1) -> str:
    """``None`` is a call; a string is content, fed in ``pieces`` parts."""
    emitter = ContentEmitter()
    out = []
    for event in events:
        if event is None:
            emitter.call()
            continue
        size = max(1, len(event) // pieces)
        for k in range(0, len(event), size):
            out.append(emitter.text(event[k : k + size]))
    out.append(emitter.finish())
    return "".join(out)


@pytest.mark.parametrize(
    ("events", "content"),
    [
        (["  plain text \n"], "  plain text \n"),  # no call: verbatim
        (["Let me check.\n\n", None], "Let me check."),
        ([" \n", None, "\n", None, "\n"], ""),
        (["Sure.\n", None, "\nDone."], "Sure.\nDone."),
        (["A ", None, " ", None, " B"], "A B"),
        ([None, "\n\nAfter."], "After."),
        (["A", None, "B "], "AB "),
    ],
)
def test_whitespace_touching_calls_is_dropped(events: list[str | None], content: str) -> None:
    assert _run(events) == content


@given(
    events=st.lists(st.none() | st.text(alphabet=" \nab", max_size=6), max_size=8),
    pieces=st.integers(1, 4),
)
def test_the_rule_does_not_depend_on_splitting(events: list[str | None], pieces: int) -> None:
    assert _run(events, pieces) == _run(events)
