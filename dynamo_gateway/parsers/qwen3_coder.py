"""``qwen3_coder``: XML-style calls (Qwen3-Coder, Qwen3-Next and their templates).

::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

Parameter values are raw text: one newline after ``<parameter=...>`` and one
before ``</parameter>`` belong to the layout and are dropped. Values become
JSON by the parameter's type in the request's tool schema (see
`convert_value`), or stay strings without one. As models sometimes leave out
``</parameter>``, a value also ends at the next ``<parameter=`` or at
``</function>``, and a missing ``</function>`` is tolerated before
``</tool_call>``. A ``<function=`` outside ``<tool_call>`` is content: text
about the format must not turn into calls.

The call is announced at ``<function=name>``; each parameter is sent when its
value ends. A parameter cut off by the end of the output is dropped and the
arguments closed. Inside a call, text between parameters is ignored, and a
malformed parameter tag ends the call, dropping the rest of the block.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

from dynamo_gateway.parsers._json import compact
from dynamo_gateway.parsers._stream import StreamBase, StreamingToolParser, skip_ws
from dynamo_gateway.parsers._text import scan
from dynamo_gateway.parsers.base import IdFactory, ToolStream

TOOL_CALL = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
FUNCTION = "<function="
FUNCTION_END = "</function>"
PARAMETER = "<parameter="
PARAMETER_END = "</parameter>"

_NAME = re.compile(r"[^\s<>=]{1,256}")
_INTEGER = re.compile(r"[+-]?\d+")
_MAX_NAME = 256

_TEXT, _OPEN, _FUNCTION_NAME, _BODY, _PARAMETER_NAME, _VALUE, _FUNCTION_END, _SKIP = range(8)

Schemas = dict[str, dict[str, list[str]]]
"""function name -> parameter name -> JSON-schema types."""


class Qwen3CoderToolParser(StreamingToolParser):
    """Parses ``<function=f><parameter=a>value</parameter></function>`` calls."""

    def stream(self) -> ToolStream:
        return _Qwen3CoderStream(self.ids, parameter_types(self.tools))


def _types(schema: object) -> list[str]:
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    found: list[str] = []
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or ():
            found.extend(_types(option))
    return found


def parameter_types(tools: list[dict[str, Any]] | None) -> Schemas:
    """The declared types of every tool's parameters, from an OpenAI ``tools`` array."""
    out: Schemas = {}
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if isinstance(properties, dict):
            out[function["name"]] = {str(k): _types(v) for k, v in properties.items()}
        else:
            out[function["name"]] = {}
    return out


def _json_safe(value: object) -> bool:
    try:
        compact(value)
    except (TypeError, ValueError):
        return False
    return True


def convert_value(text: str, types: list[str]) -> object:
    """A parameter's text as the first of its declared ``types`` it reads as.

    ``integer``, ``number`` (finite), ``boolean`` (``true``/``false``, any case),
    ``null`` (``null``/``None``), ``object`` and ``array`` (JSON, or a Python
    literal as models sometimes write). A value that reads as none of them, or a
    parameter without a declared type, stays a string.
    """
    stripped = text.strip()
    for kind in types:
        if kind == "string":
            return text
        if kind == "integer" and _INTEGER.fullmatch(stripped):
            return int(stripped)
        if kind == "number":
            if _INTEGER.fullmatch(stripped):
                return int(stripped)
            try:
                number = float(stripped)
            except ValueError:
                continue
            if math.isfinite(number):
                return number
        elif kind == "boolean" and stripped.lower() in ("true", "false"):
            return stripped.lower() == "true"
        elif kind == "null" and stripped in ("null", "None"):
            return None
        elif kind in ("object", "array"):
            wanted = dict if kind == "object" else list
            for load in (json.loads, ast.literal_eval):
                try:
                    value = load(stripped)
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    continue
                if isinstance(value, wanted) and _json_safe(value):
                    return value
    return text


class _Qwen3CoderStream(StreamBase):
    def __init__(self, ids: IdFactory, schemas: Schemas) -> None:
        super().__init__(ids)
        self._schemas = schemas
        self._state = _TEXT
        self._name = ""
        self._parameter = ""
        self._value: list[str] = []
        self._seen: set[str] = set()  # parameters sent, to drop repeats
        self._sent = 0  # parameters sent in the current call

    def _step(self, i: int, final: bool) -> int | None:
        buf = self._buf
        state = self._state
        if state == _TEXT:
            end, resume, marker = scan(buf, i, (TOOL_CALL,), final=final)
            self._content(buf[i:end])
            if marker is not None:
                self._raw = [marker]
                self._name = ""
                self._state = _OPEN
                return resume
            return end if end > i else None
        if state == _OPEN:
            j = skip_ws(buf, i)
            self._raw.append(buf[i:j])
            head = buf[j : j + len(FUNCTION)]
            if head == FUNCTION:
                self._raw.append(head)
                self._state = _FUNCTION_NAME
                return j + len(head)
            if FUNCTION.startswith(head) and not final:
                return j if j > i else None
            self._reject()
            self._state = _TEXT
            return j
        if state in (_FUNCTION_NAME, _PARAMETER_NAME):
            return self._tag_name(i, final)
        if state == _BODY:
            end, resume, marker = scan(
                buf, i, (PARAMETER, FUNCTION_END, TOOL_CALL_END), final=final
            )
            if marker == PARAMETER:
                self._parameter = ""
                self._state = _PARAMETER_NAME
            elif marker is not None:
                self._close_call()
                self._state = _FUNCTION_END if marker == FUNCTION_END else _TEXT
            return resume if resume > i or marker is not None else None
        if state == _VALUE:
            end, resume, marker = scan(
                buf, i, (PARAMETER_END, PARAMETER, FUNCTION_END), final=final
            )
            self._value.append(buf[i:end])
            if marker is not None:
                self._send_parameter()
                if marker == PARAMETER:
                    self._parameter = ""
                    self._state = _PARAMETER_NAME
                elif marker == FUNCTION_END:
                    self._close_call()
                    self._state = _FUNCTION_END
                else:
                    self._state = _BODY
            return resume if resume > i or marker is not None else None
        if state == _FUNCTION_END:
            j = skip_ws(buf, i)
            head = buf[j : j + len(TOOL_CALL_END)]
            if head == TOOL_CALL_END:
                self._state = _TEXT
                return j + len(head)
            if j < len(buf) and not TOOL_CALL_END.startswith(head):
                self._state = _TEXT  # no closing tag: what follows is read afresh
                return j
            if final:
                self._state = _TEXT
                return len(buf)  # a cut-off closing tag belongs to the call
            return j if j > i else None
        # _SKIP: drop the rest of a broken block
        end, resume, marker = scan(buf, i, (TOOL_CALL_END,), final=final)
        if marker is not None:
            self._state = _TEXT
            return resume
        return end if end > i else None

    def _tag_name(self, i: int, final: bool) -> int | None:
        """The ``name>`` after ``<function=`` or ``<parameter=``."""
        buf = self._buf
        run = _NAME.match(buf, i)
        j = run.end() if run else i
        function = self._state == _FUNCTION_NAME
        if function:
            self._raw.append(buf[i:j])
            self._name += buf[i:j]
        else:
            self._parameter += buf[i:j]
        size = len(self._name if function else self._parameter)
        if j == len(buf) and size <= _MAX_NAME and not final:
            return j if j > i else None
        if j < len(buf) and buf[j] == ">" and 0 < size <= _MAX_NAME:
            if function:
                self._start(self._name)
                self._raw = []
                self._sent = 0
                self._seen = set()
                self._state = _BODY
            else:
                self._value = []
                self._state = _VALUE
            return j + 1
        if function:
            self._reject()
            self._state = _TEXT
        else:
            self._close_call()
            self._state = _SKIP
        return j

    def _send_parameter(self) -> None:
        text = "".join(self._value)
        self._value = []
        text = text.removeprefix("\n").removesuffix("\n")
        if self._parameter in self._seen:
            return
        self._seen.add(self._parameter)
        types = self._schemas.get(self._name, {}).get(self._parameter, [])
        value = convert_value(text, types)
        prefix = "{" if self._sent == 0 else ","
        self._arguments(f"{prefix}{compact(self._parameter)}:{compact(value)}")
        self._sent += 1

    def _close_call(self) -> None:
        self._arguments("}" if self._sent else "{}")
        self._announced = False

    def _eof(self) -> None:
        if self._state in (_OPEN, _FUNCTION_NAME):
            self._reject()
        elif self._state in (_BODY, _PARAMETER_NAME, _VALUE):
            self._close_call()  # a parameter cut off mid-value is dropped
        self._state = _TEXT
