"""``llama3_json``: Llama 3.1 / 3.2 / 3.3 JSON tool calling.

With custom tools the model answers with the call and nothing else::

    {"name": "get_weather", "parameters": {"city": "Paris"}}

optionally preceded by ``<|python_tag|>`` (seen when special tokens are kept),
several calls separated by ``;``. ``arguments`` is accepted for
``parameters``, and a ``"type": "function"`` member is allowed. Only output
that *starts* with a call object is read as calls; a JSON object with other
keys (a plain JSON answer) is content as soon as such a key is read. Text after
the calls is content; so is everything after a call that breaks.
"""

from __future__ import annotations

from dynamo_gateway.parsers._call import CallReader, Result
from dynamo_gateway.parsers._stream import StreamBase, StreamingToolParser, skip_ws
from dynamo_gateway.parsers.base import IdFactory, ToolStream

PYTHON_TAG = "<|python_tag|>"
ARG_KEYS = ("parameters", "arguments")
ALLOWED_KEYS = frozenset({"name", "type", "id", *ARG_KEYS})

_START, _TAG, _OBJECT, _AFTER, _SEPARATOR, _PLAIN = range(6)


class Llama3JsonToolParser(StreamingToolParser):
    """Parses ``{"name": ..., "parameters": {...}}; {...}`` outputs."""

    def stream(self) -> ToolStream:
        return _Llama3JsonStream(self.ids)


def _reader() -> CallReader:
    return CallReader(ARG_KEYS, require_args=True, allowed_keys=ALLOWED_KEYS)


class _Llama3JsonStream(StreamBase):
    def __init__(self, ids: IdFactory) -> None:
        super().__init__(ids)
        self._state = _START
        self._reader = _reader()

    def _step(self, i: int, final: bool) -> int | None:
        buf = self._buf
        state = self._state
        if state == _PLAIN:
            self._content(buf[i:])
            return len(buf) if len(buf) > i else None
        if state == _OBJECT:
            j = self._read(self._reader, i)
            result = self._reader.result
            if result is Result.REJECT:
                self._reject()
                self._state = _PLAIN
            elif result is Result.CALL:
                self._state = _AFTER
            elif result is Result.BROKEN:
                self._state = _PLAIN
            return j if j > i or result is not None else None
        j = skip_ws(buf, i)
        if state != _AFTER:  # after a call, whitespace is dropped; before one it may be content
            self._raw.append(buf[i:j])
        if j == len(buf):
            return j if j > i else None
        if state == _START and buf[j] == "<":
            rest = buf[j : j + len(PYTHON_TAG)]
            if rest == PYTHON_TAG:
                self._raw.append(rest)
                self._state = _TAG
                return j + len(rest)
            if PYTHON_TAG.startswith(rest) and not final:
                return j if j > i else None
        if buf[j] == "{":
            self._reader = _reader()
            self._state = _OBJECT
            return j
        if state == _AFTER and buf[j] == ";":
            self._raw = [";"]
            self._state = _SEPARATOR
            return j + 1
        if state != _AFTER:
            self._reject()
        self._state = _PLAIN
        return j

    def _eof(self) -> None:
        if self._state == _OBJECT:
            self._reader.finish()
            self._pump(self._reader)
            if self._reader.result is Result.REJECT:
                self._reject()
        elif self._state in (_START, _TAG):
            self._reject()
        # a trailing ";" (_SEPARATOR) only separated the last call from nothing: dropped
        self._state = _PLAIN
