"""Model output text -> what an assistant message holds: content, reasoning, tool calls.

A `Shaper` per generated choice takes the detokenized text as it streams and
yields `Piece`s: reasoning text (split off by a reasoning parser), content
text, and tool calls (a start with the call's id and name, then argument
fragments). How calls are found depends on ``tool_choice``:

- ``parse`` ("auto"): the model's own format, read by a tool-call parser;
- ``named``: the output is constrained to the named function's arguments, so
  all of it (after any reasoning) is that one call's arguments;
- ``required``: the output is constrained to a JSON array of
  ``{"name", "arguments"}`` objects; each call is sent once its element closes;
- ``none``: everything is content.

A request without tools or reasoning parser has no shaper: the frontend's plain
text path stays as fast as before. Pure: text in, pieces out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from dynamo_gateway.parsers import (
    ContentDelta,
    IdFactory,
    ReasoningParserFactory,
    ReasoningStream,
    ToolArgumentsDelta,
    ToolCall,
    ToolCallStart,
    ToolDelta,
    ToolParserFactory,
    ToolStream,
    new_call_id,
)

__all__ = ["Piece", "ReasoningDelta", "ShapeSpec", "Shaped", "Shaper"]

ToolMode = Literal["none", "parse", "named", "required"]


@dataclass(frozen=True)
class ReasoningDelta:
    """Text for ``delta.reasoning_content``."""

    text: str


Piece = ReasoningDelta | ContentDelta | ToolCallStart | ToolArgumentsDelta


@dataclass(frozen=True)
class ShapeSpec:
    """How one request's output is shaped (shared by its choices)."""

    tool_mode: ToolMode = "none"
    tool_parser: ToolParserFactory | None = None
    tools: list[dict[str, object]] | None = None  # the request's, for parsers that type arguments
    named: str | None = None  # the function of a named tool_choice
    reasoning: ReasoningParserFactory | None = None
    ids: IdFactory = new_call_id

    def shaper(self) -> Shaper:
        return Shaper(self)


@dataclass
class Shaped:
    """A whole output, shaped (the non-streaming answer)."""

    content: str = ""
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


class _Elements:
    """The complete top-level elements of a JSON array that arrives in pieces."""

    def __init__(self) -> None:
        self._buf: list[str] = []
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> list[str]:
        out = []
        for ch in text:
            if self._depth == 0:
                if ch == "[":
                    self._depth = 1
                continue
            if self._in_string:
                self._buf.append(ch)
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
                continue
            if ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:  # the array closed
                    continue
            if self._depth == 1 and ch in ",]":
                continue
            self._buf.append(ch)
            if self._depth == 1 and ch == "}":
                out.append("".join(self._buf).strip())
                self._buf = []
        return out


class Shaper:
    def __init__(self, spec: ShapeSpec) -> None:
        self.spec = spec
        self._reasoning: ReasoningStream | None = (
            spec.reasoning().stream() if spec.reasoning is not None else None
        )
        self._tools: ToolStream | None = None
        if spec.tool_mode == "parse" and spec.tool_parser is not None:
            self._tools = spec.tool_parser(spec.tools).stream()
        self._elements = _Elements() if spec.tool_mode == "required" else None
        self._named_started = False
        self.calls = 0  # tool calls started so far

    def feed(self, text: str) -> list[Piece]:
        if self._reasoning is None:
            return self._content(text)
        return self._split(self._reasoning.feed(text))

    def finish(self) -> list[Piece]:
        pieces: list[Piece] = []
        if self._reasoning is not None:
            pieces += self._split(self._reasoning.finish())
        if self._tools is not None:
            pieces += self._count(self._tools.finish())
        return pieces

    def shape(self, text: str) -> Shaped:
        """Shape a whole output at once."""
        return gather([*self.feed(text), *self.finish()])

    def _split(self, parts: Sequence[tuple[str, str]]) -> list[Piece]:
        out: list[Piece] = []
        for kind, text in parts:
            if kind == "reasoning":
                out.append(ReasoningDelta(text))
            else:
                out += self._content(text)
        return out

    def _content(self, text: str) -> list[Piece]:
        mode = self.spec.tool_mode
        if not text:
            return []
        if self._tools is not None:
            return self._count(self._tools.feed(text))
        if mode == "named":
            out: list[Piece] = []
            if not self._named_started:
                text = text.lstrip()
                if not text:
                    return []
                self._named_started = True
                self.calls = 1
                out.append(ToolCallStart(0, self.spec.ids(), self.spec.named or ""))
            out.append(ToolArgumentsDelta(0, text))
            return out
        if self._elements is not None:
            out = []
            for element in self._elements.feed(text):
                call = _call_of(element)
                if call is None:
                    continue
                name, arguments = call
                out.append(ToolCallStart(self.calls, self.spec.ids(), name))
                out.append(ToolArgumentsDelta(self.calls, arguments))
                self.calls += 1
            return out
        return [ContentDelta(text)]

    def _count(self, deltas: list[ToolDelta]) -> list[Piece]:
        for d in deltas:
            if isinstance(d, ToolCallStart):
                self.calls = max(self.calls, d.index + 1)
        return list(deltas)


def _call_of(element: str) -> tuple[str, str] | None:
    try:
        value = json.loads(element)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    return value["name"], json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def gather(pieces: list[Piece]) -> Shaped:
    """The pieces of a whole output, put together."""
    content: list[str] = []
    reasoning: list[str] = []
    starts: dict[int, ToolCallStart] = {}
    arguments: dict[int, list[str]] = {}
    for p in pieces:
        if isinstance(p, ReasoningDelta):
            reasoning.append(p.text)
        elif isinstance(p, ContentDelta):
            content.append(p.text)
        elif isinstance(p, ToolCallStart):
            starts[p.index] = p
            arguments.setdefault(p.index, [])
        else:
            arguments.setdefault(p.index, []).append(p.fragment)
    calls = [
        ToolCall(starts[i].id, starts[i].name, "".join(arguments[i]) or "{}")
        for i in sorted(starts)
    ]
    return Shaped("".join(content), "".join(reasoning) if reasoning else None, calls)
