"""Output shaping: reasoning, content and tool calls, streamed or whole (pure)."""

from __future__ import annotations

import itertools
import json

import pytest

from dynamo_gateway.frontend.shaping import Shaped, ShapeSpec, gather
from dynamo_gateway.parsers.hermes import HermesToolParser
from dynamo_gateway.parsers.reasoning import qwen3


def spec(**kw: object) -> ShapeSpec:
    counter = itertools.count()
    return ShapeSpec(ids=lambda: f"call_{next(counter)}", **kw)  # type: ignore[arg-type]


def split_everywhere(s: ShapeSpec, text: str) -> list[Shaped]:
    """`text` fed in two pieces at every position, each shaped afresh."""
    out = []
    for cut in range(len(text) + 1):
        shaper = s.shaper()
        out.append(gather([*shaper.feed(text[:cut]), *shaper.feed(text[cut:]), *shaper.finish()]))
    return out


def test_named_output_is_one_calls_arguments() -> None:
    s = spec(tool_mode="named", named="get_weather")
    text = ' {"city": "Paris"}'
    for shaped in split_everywhere(s, text):
        assert shaped.content == ""
        assert [(c.name, json.loads(c.arguments)) for c in shaped.tool_calls] == [
            ("get_weather", {"city": "Paris"})
        ]


def test_required_output_is_a_list_of_calls_sent_as_each_closes() -> None:
    s = spec(tool_mode="required")
    text = '[{"name": "a", "arguments": {"x": "}]"}}, {"name": "b", "arguments": {}}]'
    for shaped in split_everywhere(s, text):
        assert [(c.name, json.loads(c.arguments)) for c in shaped.tool_calls] == [
            ("a", {"x": "}]"}),
            ("b", {}),
        ]
    shaper = s.shaper()
    first = shaper.feed(text[:40])  # the first element has closed, the second has not
    assert len(gather(first).tool_calls) == 1
    assert shaper.calls == 1


def test_auto_uses_the_parser_after_reasoning() -> None:
    s = spec(tool_mode="parse", tool_parser=lambda tools: HermesToolParser(), reasoning=qwen3)
    text = (
        "<think>The user wants weather.</think>Let me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    for shaped in split_everywhere(s, text):
        assert shaped.reasoning == "The user wants weather."
        assert shaped.content == "Let me check."
        assert [c.name for c in shaped.tool_calls] == ["get_weather"]


@pytest.mark.parametrize("mode", ["none", "parse"])
def test_plain_text_passes_through(mode: str) -> None:
    s = spec(tool_mode=mode, tool_parser=lambda tools: HermesToolParser())
    for shaped in split_everywhere(s, "Just an answer, no <b>calls</b>."):
        assert shaped == Shaped("Just an answer, no <b>calls</b>.", None, [])
