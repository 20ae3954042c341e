"""``mistral``: calls after the ``[TOOL_CALLS]`` token, in both of Mistral's forms.

As mistral-common documents its tokenizers, content comes first and the calls
follow:

- tokenizers v2 to v7 (Mistral 7B v0.3, Nemo, ...): one JSON list of calls,
  ``[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]``;
- v11 and later (Small 3.1+, Devstral, Magistral, ...): each call as
  ``[TOOL_CALLS]f[ARGS]{...}``, optionally ``[TOOL_CALLS]f[CALL_ID]abc123[ARGS]{...}``,
  repeated for several calls. A name followed directly by ``{`` is accepted
  too (``[ARGS]`` dropped as a special token). The model's call id is not used:
  ids come from the id factory like every parser's.

``[TOOL_CALLS]`` followed by anything else is content. After a call that
breaks, the rest of the output is content.
"""

from __future__ import annotations

import re

from dynamo_gateway.parsers._call import ArgsReader, CallReader, Result
from dynamo_gateway.parsers._stream import StreamBase, StreamingToolParser, skip_ws
from dynamo_gateway.parsers._text import scan
from dynamo_gateway.parsers.base import IdFactory, ToolStream

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_CALL_ID = re.compile(r"[A-Za-z0-9_\-]+")

(
    _TEXT,
    _MARKED,
    _LIST_OPEN,
    _LIST_NEXT,
    _LIST_AFTER,
    _ELEMENT,
    _NAME_STATE,
    _ID,
    _ARGS_OPEN,
    _ARGS,
    _PLAIN,
) = range(11)


class MistralToolParser(StreamingToolParser):
    """Parses ``[TOOL_CALLS][{...}]`` and ``[TOOL_CALLS]name[ARGS]{...}`` outputs."""

    def stream(self) -> ToolStream:
        return _MistralStream(self.ids)


def _reader() -> CallReader:
    return CallReader(("arguments",), require_args=True)


class _MistralStream(StreamBase):
    def __init__(self, ids: IdFactory) -> None:
        super().__init__(ids)
        self._state = _TEXT
        self._reader = _reader()
        self._args = ArgsReader()
        self._name = ""
        self._in_list = False

    def _step(self, i: int, final: bool) -> int | None:
        buf = self._buf
        state = self._state
        if state == _TEXT:
            end, resume, marker = scan(buf, i, (TOOL_CALLS,), final=final)
            self._content(buf[i:end])
            if marker is not None:
                self._raw = [marker]
                self._state = _MARKED
                return resume
            return end if end > i else None
        if state == _PLAIN:
            self._content(buf[i:])
            return len(buf) if len(buf) > i else None
        if state == _ELEMENT:
            return self._element(i)
        if state in (_NAME_STATE, _ID):
            return self._name_or_id(i, final)
        if state == _ARGS:
            j = self._args.feed(buf, i)
            self._arguments(self._args.take())
            if self._args.result is not None:
                self._announced = False
                self._state = _TEXT if self._args.result is Result.CALL else _PLAIN
            return j if j > i or self._args.result is not None else None
        j = skip_ws(buf, i)
        if state != _LIST_AFTER:
            self._raw.append(buf[i:j])
        if j == len(buf):
            return j if j > i else None
        ch = buf[j]
        if state == _MARKED:
            if ch == "[":
                self._raw.append(ch)
                self._in_list = True
                self._state = _LIST_OPEN
                return j + 1
            if ch == "{":
                self._in_list = False
                self._reader = _reader()
                self._state = _ELEMENT
                return j
            if _NAME.match(ch):
                self._name = ""
                self._state = _NAME_STATE
                return j
        elif state in (_LIST_OPEN, _LIST_NEXT):
            if ch == "{":
                self._reader = _reader()
                self._state = _ELEMENT
                return j
            if ch == "]" and state == _LIST_OPEN:  # an empty list: no calls
                self._raw = []
                self._state = _TEXT
                return j + 1
        elif state == _LIST_AFTER:
            if ch == ",":
                self._raw = [ch]
                self._state = _LIST_NEXT
                return j + 1
            self._state = _TEXT if ch == "]" else _PLAIN
            return j + 1 if ch == "]" else j
        elif state == _ARGS_OPEN and ch == "{":
            self._raw = []
            self._start(self._name)
            self._args = ArgsReader()
            self._state = _ARGS
            return j
        self._reject()
        self._state = _PLAIN if self._calls else _TEXT
        return j

    def _element(self, i: int) -> int | None:
        j = self._read(self._reader, i)
        result = self._reader.result
        if result is Result.REJECT:
            self._reject()
            self._state = _PLAIN if self._calls else _TEXT
        elif result is Result.CALL:
            self._state = _LIST_AFTER if self._in_list else _TEXT
        elif result is Result.BROKEN:
            self._state = _PLAIN
        return j if j > i or result is not None else None

    def _name_or_id(self, i: int, final: bool) -> int | None:
        """``name`` then ``[CALL_ID]id`` and/or ``[ARGS]``, or ``{`` straight after the name."""
        buf = self._buf
        pattern = _NAME if self._state == _NAME_STATE else _CALL_ID
        run = pattern.match(buf, i)
        j = run.end() if run else i
        if self._state == _NAME_STATE:
            self._name += buf[i:j]
        self._raw.append(buf[i:j])
        if j == len(buf):
            return j if j > i else None
        for marker, state in ((ARGS, _ARGS_OPEN), (CALL_ID, _ID)):
            if buf.startswith(marker, j) and (marker == ARGS or self._state == _NAME_STATE):
                self._raw.append(marker)
                self._state = state
                return j + len(marker)
            if marker.startswith(buf[j : j + len(marker)]) and not final:
                return j if j > i else None
        if buf[j] == "{" and self._state == _NAME_STATE:
            self._state = _ARGS_OPEN
            return j
        self._reject()
        self._state = _PLAIN if self._calls else _TEXT
        return j

    def _eof(self) -> None:
        if self._state == _ELEMENT:
            self._reader.finish()
            self._pump(self._reader)
            if self._reader.result is Result.REJECT:
                self._reject()
        elif self._state == _ARGS:
            self._args.finish()
            self._arguments(self._args.take())
        elif self._state in (_MARKED, _LIST_OPEN, _LIST_NEXT, _NAME_STATE, _ID, _ARGS_OPEN):
            self._reject()
        self._state = _PLAIN
