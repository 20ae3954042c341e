"""``hermes``: JSON calls in ``<tool_call>`` tags (Hermes 2 Pro / 3, Qwen2.5, Qwen3).

The model writes each call as a JSON object inside its own tags, any number
in a row, optionally after some text::

    Let me check.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Qwen's templates put ``name`` first, so the arguments stream as they are
written; Hermes 2 Pro's prompt puts ``arguments`` first, so such a call is sent
whole once its object is complete. A block whose JSON is not a call object is
content. If a committed call breaks, the rest of its block, up to
``</tool_call>``, is dropped.
"""

from __future__ import annotations

from dynamo_gateway.parsers._call import CallReader, Result
from dynamo_gateway.parsers._stream import StreamBase, StreamingToolParser, skip_ws
from dynamo_gateway.parsers._text import scan
from dynamo_gateway.parsers.base import IdFactory, ToolStream

START = "<tool_call>"
END = "</tool_call>"

_TEXT, _OPEN, _OBJECT, _CLOSE, _SKIP = range(5)


class HermesToolParser(StreamingToolParser):
    """Parses ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks."""

    def stream(self) -> ToolStream:
        return _HermesStream(self.ids)


class _HermesStream(StreamBase):
    def __init__(self, ids: IdFactory) -> None:
        super().__init__(ids)
        self._state = _TEXT
        self._reader = CallReader(("arguments",))

    def _step(self, i: int, final: bool) -> int | None:
        buf = self._buf
        state = self._state
        if state == _TEXT:
            end, resume, marker = scan(buf, i, (START,), final=final)
            self._content(buf[i:end])
            if marker is not None:
                self._raw = [marker]
                self._state = _OPEN
                return resume
            return end if end > i else None
        if state == _OPEN:
            j = skip_ws(buf, i)
            self._raw.append(buf[i:j])
            if j == len(buf):
                return j if j > i else None
            if buf[j] == "{":
                self._reader = CallReader(("arguments",))
                self._state = _OBJECT
            else:
                self._reject()
                self._state = _TEXT
            return j
        if state == _OBJECT:
            j = self._read(self._reader, i)
            result = self._reader.result
            if result is Result.REJECT:
                self._reject()
                self._state = _TEXT
            elif result is Result.CALL:
                self._state = _CLOSE
            elif result is Result.BROKEN:
                self._state = _SKIP
            return j if j > i or result is not None else None
        if state == _CLOSE:
            j = skip_ws(buf, i)
            rest = buf[j : j + len(END)]
            if rest == END:
                self._state = _TEXT
                return j + len(END)
            if j == len(buf) or (END.startswith(rest) and len(rest) < len(END)):
                # wait for more (or, at the end, drop a cut-off "</tool_c")
                if final:
                    self._state = _TEXT
                    return len(buf)
                return j if j > i else None
            self._state = _TEXT  # no closing tag: whatever follows is read afresh
            return j
        # _SKIP: drop the rest of a broken block
        end, resume, marker = scan(buf, i, (END,), final=final)
        if marker is not None:
            self._state = _TEXT
            return resume
        return end if end > i else None

    def _eof(self) -> None:
        if self._state == _OPEN:
            self._reject()
        elif self._state == _OBJECT:
            self._reader.finish()
            self._pump(self._reader)
            if self._reader.result is Result.REJECT:
                self._reject()
        self._state = _TEXT
