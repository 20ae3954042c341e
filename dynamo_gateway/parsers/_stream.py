"""The machinery the built-in tool streams share: buffer, content rule, call numbering."""

from __future__ import annotations

from typing import Any

from dynamo_gateway.parsers._call import CallReader
from dynamo_gateway.parsers._text import ContentEmitter
from dynamo_gateway.parsers.base import (
    ContentDelta,
    IdFactory,
    ParsedTools,
    ToolArgumentsDelta,
    ToolCallStart,
    ToolDelta,
    ToolStream,
    collect,
    new_call_id,
)

WS = " \t\n\r"


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WS:
        i += 1
    return i


class StreamBase:
    """A tool stream as a state machine over an input buffer.

    Subclasses implement `_step`, which handles the current state at
    ``self._buf[i:]`` and returns the next index, or ``None`` when it can make
    no progress without more text; and `_eof`, which settles whatever state
    the output ended in. Everything a step decides depends on the text only,
    never on where a delta happened to end.
    """

    def __init__(self, ids: IdFactory) -> None:
        self._ids = ids
        self._buf = ""
        self._out: list[ToolDelta] = []
        self._emitter = ContentEmitter()
        self._calls = 0
        self._finished = False
        self._raw: list[str] = []  # text of a would-be call, content if it is not one
        self._announced = False  # the current call's start was sent

    def feed(self, delta: str) -> list[ToolDelta]:
        if self._finished:  # a late delta after finish() has nowhere to go
            return []
        self._buf += delta
        self._run(final=False)
        return self._drain()

    def finish(self) -> list[ToolDelta]:
        if self._finished:
            return []
        self._finished = True
        self._run(final=True)
        self._eof()
        self._emit_text(self._emitter.finish())
        return self._drain()

    # for subclasses

    def _step(self, i: int, final: bool) -> int | None:
        raise NotImplementedError

    def _eof(self) -> None:
        raise NotImplementedError

    def _content(self, text: str) -> None:
        self._emit_text(self._emitter.text(text))

    def _reject(self) -> None:
        """The text gathered in ``_raw`` is not a call after all: it is content."""
        self._content("".join(self._raw))
        self._raw = []

    def _start(self, name: str) -> None:
        self._emitter.call()
        self._out.append(ToolCallStart(self._calls, self._ids(), name))
        self._calls += 1
        self._announced = True

    def _arguments(self, fragment: str) -> None:
        if fragment:
            self._out.append(ToolArgumentsDelta(self._calls - 1, fragment))

    def _pump(self, reader: CallReader) -> None:
        """Send what ``reader`` has settled: the call's start, then new argument text."""
        if not self._announced:
            if not reader.announced or reader.name is None:
                return
            self._start(reader.name)
        self._arguments(reader.take())
        if reader.result is not None:  # settled as a call (a rejection is never announced)
            self._announced = False
            self._raw = []

    def _read(self, reader: CallReader, i: int) -> int:
        """Feed ``reader`` from ``i``, keeping the raw text in case it is rejected."""
        j = reader.feed(self._buf, i)
        self._raw.append(self._buf[i:j])
        self._pump(reader)
        return j

    # internals

    def _run(self, final: bool) -> None:
        i = 0
        while True:
            j = self._step(i, final)
            if j is None:
                break
            i = j
        self._buf = self._buf[i:]

    def _emit_text(self, text: str) -> None:
        if not text:
            return
        if self._out and isinstance(self._out[-1], ContentDelta):
            self._out[-1] = ContentDelta(self._out[-1].text + text)
        else:
            self._out.append(ContentDelta(text))

    def _drain(self) -> list[ToolDelta]:
        out, self._out = self._out, []
        merged: list[ToolDelta] = []
        for delta in out:
            last = merged[-1] if merged else None
            if (
                isinstance(delta, ToolArgumentsDelta)
                and isinstance(last, ToolArgumentsDelta)
                and last.index == delta.index
            ):
                merged[-1] = ToolArgumentsDelta(delta.index, last.fragment + delta.fragment)
            else:
                merged.append(delta)
        return merged


class StreamingToolParser:
    """A `ToolParser` whose ``parse`` is its own stream run over the whole text.

    :param tools: the request's OpenAI ``tools`` array, for parsers that need
        the parameter schemas.
    :param ids: makes call ids (default: random ``call_...``).
    """

    def __init__(
        self, tools: list[dict[str, Any]] | None = None, *, ids: IdFactory | None = None
    ) -> None:
        self.tools = tools
        self.ids = ids or new_call_id

    def stream(self) -> ToolStream:
        raise NotImplementedError

    def parse(self, text: str) -> ParsedTools:
        stream = self.stream()
        return collect([*stream.feed(text), *stream.finish()])
