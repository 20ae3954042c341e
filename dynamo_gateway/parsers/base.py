"""The types every tool-call and reasoning parser speaks.

A parser turns model output text into OpenAI-shaped pieces. Parsers are pure:
no I/O, no tokenizer, text in and plain data out. Each request gets its own
parser from a factory (``factory(tools)`` for tool parsers, ``factory()`` for
reasoning parsers), so parsers may keep per-request state.

Streaming and whole-text parsing agree by definition: ``parse(text)`` is what a
fresh stream yields for ``feed(text)`` then ``finish()``, gathered by
:func:`collect`, and the built-ins are tested to give the same result however
the text is split into deltas.

**Content rule** (the same for ``parse`` and for a stream's ``ContentDelta``
texts): content is the output text outside tool calls, except that whitespace
touching a call is dropped (whitespace before a call, between calls and after
the last call). Where text stands on both sides of a run of calls, the
whitespace that preceded the run is kept once, as a separator. Output with no
call is passed through verbatim.

**Calls are committed once announced.** A stream announces a call
(`ToolCallStart`) as soon as its name is known and its arguments have started,
then streams the arguments as they grow, emitting only text that cannot turn
out wrong. Text that never becomes a call (an unknown structure, invalid JSON
or an unterminated marker before that point) is content. If the output breaks
off or becomes invalid after a call was announced, the call is kept and its
arguments are closed where the valid text stopped, so each call's fragments
always join to a JSON object.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable

IdFactory: TypeAlias = Callable[[], str]
"""Makes the ``id`` of each tool call; injected so tests can be deterministic."""


def new_call_id() -> str:
    """An OpenAI-style tool-call id: ``call_`` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    """One function call the model made."""

    id: str
    name: str
    arguments: str
    """A JSON object as compact text (no insignificant whitespace)."""


@dataclass(frozen=True)
class ParsedTools:
    """A whole output split into content and calls."""

    content: str
    """Text outside calls (see the content rule above); ``""`` if none."""
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ContentDelta:
    """Plain text for ``delta.content``."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A new call, numbered 0, 1, ... in output order; its arguments follow."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolArgumentsDelta:
    """More of call ``index``'s arguments text, to append to what came before."""

    index: int
    fragment: str


ToolDelta: TypeAlias = ContentDelta | ToolCallStart | ToolArgumentsDelta


@runtime_checkable
class ToolStream(Protocol):
    """Incremental parsing of one output, delta by delta."""

    def feed(self, delta: str) -> list[ToolDelta]:
        """Take the next piece of output text; return what can be told already."""
        ...

    def finish(self) -> list[ToolDelta]:
        """The output ended: flush whatever was held back. Call once, last."""
        ...


@runtime_checkable
class ToolParser(Protocol):
    """Splits model output into content and tool calls for one request."""

    def parse(self, text: str) -> ParsedTools:
        """Parse a whole output. Never raises on malformed model output."""
        ...

    def stream(self) -> ToolStream:
        """A fresh stream for one output."""
        ...


ToolParserFactory: TypeAlias = Callable[[list[dict[str, Any]] | None], ToolParser]
"""``factory(tools)`` with the request's OpenAI ``tools`` array (or ``None``)."""

Channel: TypeAlias = Literal["reasoning", "content"]
ReasoningPiece: TypeAlias = tuple[Channel, str]


@runtime_checkable
class ReasoningStream(Protocol):
    """Incremental splitting of one output into reasoning and content."""

    def feed(self, delta: str) -> list[ReasoningPiece]:
        """Take the next piece of output; return ``(channel, text)`` pieces."""
        ...

    def finish(self) -> list[ReasoningPiece]:
        """The output ended: flush what was held back. Call once, last."""
        ...


@runtime_checkable
class ReasoningParser(Protocol):
    """Splits a reasoning model's thinking from its answer, for one request."""

    end_marker: str
    """The text that ends the thinking (``"</think>"``): a structured-output
    constraint applies only after it."""

    def parse(self, text: str) -> tuple[str | None, str]:
        """``(reasoning, content)``; reasoning is ``None`` when there was none."""
        ...

    def stream(self) -> ReasoningStream:
        """A fresh stream for one output."""
        ...


ReasoningParserFactory: TypeAlias = Callable[[], ReasoningParser]


def collect(deltas: Iterable[ToolDelta]) -> ParsedTools:
    """Gather a stream's deltas into the whole result."""
    content: list[str] = []
    starts: list[ToolCallStart] = []
    args: list[list[str]] = []
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            content.append(delta.text)
        elif isinstance(delta, ToolCallStart):
            starts.append(delta)
            args.append([])
        else:
            args[delta.index].append(delta.fragment)
    calls = [ToolCall(s.id, s.name, "".join(a)) for s, a in zip(starts, args, strict=True)]
    return ParsedTools("".join(content), calls)


def collect_reasoning(pieces: Iterable[ReasoningPiece]) -> tuple[str | None, str]:
    """Gather a reasoning stream's pieces into ``(reasoning, content)``."""
    reasoning: list[str] = []
    content: list[str] = []
    for channel, text in pieces:
        (reasoning if channel == "reasoning" else content).append(text)
    return ("".join(reasoning) or None), "".join(content)
