"""``pythonic``: a Python list of calls (Llama 3.2 and Llama 4 pythonic tool calling).

The model answers with the calls only, keyword arguments with literal values::

    [get_weather(city="Paris", days=3), get_time()]

Llama 4 may wrap the list in ``<|python_start|>`` ... ``<|python_end|>``. The
list is read with :mod:`ast`; values may be strings, numbers, booleans,
``None``, lists and dicts with string keys (tuples count as lists), and they
become JSON. Output that does not *start* with such a list is content, and a
list that is not entirely calls of that shape (``[1, 2]``, ``[Note] ...``,
``f(x)`` with a positional argument or a variable) is content too. The list is
sent once it closes, since no call is certain before the whole list parses.
Text after the list is content.
"""

from __future__ import annotations

import ast
import math

from dynamo_gateway.parsers._json import compact
from dynamo_gateway.parsers._stream import StreamBase, StreamingToolParser, skip_ws
from dynamo_gateway.parsers.base import IdFactory, ToolStream

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"

_START, _LIST, _AFTER, _PLAIN = range(4)
_QUOTES = "'\""
_OPEN = "([{"
_CLOSE = ")]}"


class PythonicToolParser(StreamingToolParser):
    """Parses ``[f(a=1, b="x"), g()]`` outputs."""

    def stream(self) -> ToolStream:
        return _PythonicStream(self.ids)


class _NotACall(ValueError):
    pass


def _literal(node: ast.expr) -> object:
    """A JSON-able value from a literal expression."""
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, bool | str | int):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise _NotACall
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _literal(node.operand)
        if isinstance(inner, bool) or not isinstance(inner, int | float):
            raise _NotACall
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[str, object] = {}
        for key, item in zip(node.keys, node.values, strict=True):
            if key is None:  # a ** expansion
                raise _NotACall
            name = _literal(key)
            if not isinstance(name, str):
                raise _NotACall
            out[name] = _literal(item)
        return out
    raise _NotACall


def parse_call_list(source: str) -> list[tuple[str, str]] | None:
    """``[(name, arguments JSON), ...]`` if ``source`` is a list of calls, else ``None``."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree.body, ast.List):
        return None
    calls: list[tuple[str, str]] = []
    try:
        for element in tree.body.elts:
            if not isinstance(element, ast.Call) or not isinstance(element.func, ast.Name):
                return None
            if element.args:
                return None
            arguments: dict[str, object] = {}
            for keyword in element.keywords:
                if keyword.arg is None:  # **kwargs
                    return None
                arguments[keyword.arg] = _literal(keyword.value)
            calls.append((element.func.id, compact(arguments)))
    except (_NotACall, RecursionError, ValueError):
        return None
    return calls


class _Brackets:
    """Finds where a Python bracket expression ends, skipping brackets inside strings."""

    def __init__(self) -> None:
        self.depth = 0
        self._quote = ""  # the open string's delimiter: ', ", ''' or """
        self._escape = False

    def feed(self, text: str, i: int, final: bool) -> int | None:
        """Index just after the closing bracket, or ``None`` (all of ``text`` consumed).

        Returns ``-1 - i`` when it must see more text before ``text[i]``
        (a quote that may open a triple-quoted string).
        """
        n = len(text)
        while i < n:
            ch = text[i]
            if self._quote:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif text.startswith(self._quote, i):
                    i += len(self._quote)
                    self._quote = ""
                    continue
                elif n - i < len(self._quote) and self._quote.startswith(text[i:]) and not final:
                    return -1 - i  # maybe the first quotes of the closing triple
                i += 1
                continue
            if ch in _QUOTES:
                if i + 3 > n and not final:
                    return -1 - i
                self._quote = ch * 3 if text.startswith(ch * 3, i) else ch
                i += len(self._quote)
                continue
            if ch in _OPEN:
                self.depth += 1
            elif ch in _CLOSE:
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
            i += 1
        return None


class _PythonicStream(StreamBase):
    def __init__(self, ids: IdFactory) -> None:
        super().__init__(ids)
        self._state = _START
        self._brackets = _Brackets()
        self._tagged = False
        self._list_at = 0  # where the list starts in ``_raw``

    def _step(self, i: int, final: bool) -> int | None:
        buf = self._buf
        state = self._state
        if state == _PLAIN:
            self._content(buf[i:])
            return len(buf) if len(buf) > i else None
        if state == _LIST:
            end = self._brackets.feed(buf, i, final)
            if end is None or end < 0:
                stop = len(buf) if end is None else -1 - end
                self._raw.append(buf[i:stop])
                return stop if stop > i else None
            self._raw.append(buf[i:end])
            self._settle("".join(self._raw[self._list_at :]))
            return end
        j = skip_ws(buf, i)
        if state == _START:
            self._raw.append(buf[i:j])
        if j == len(buf):
            return j if j > i else None
        tag = PYTHON_END if state == _AFTER else PYTHON_START
        if buf[j] == "<" and (state == _AFTER or not self._tagged):
            rest = buf[j : j + len(tag)]
            if rest == tag:
                if state == _AFTER:
                    self._state = _PLAIN
                else:
                    self._raw.append(rest)
                    self._tagged = True
                return j + len(tag)
            if tag.startswith(rest) and not final:
                return j if j > i else None
        if state == _START and buf[j] == "[":
            self._list_at = len(self._raw)
            self._state = _LIST
            return j
        if state == _START:
            self._reject()
        self._state = _PLAIN
        return j

    def _settle(self, source: str) -> None:
        calls = parse_call_list(source)
        if not calls:  # "[]" is an answer, not zero calls
            self._reject()
            self._state = _PLAIN
            return
        self._raw = []
        for name, arguments in calls:
            self._start(name)
            self._arguments(arguments)
        self._state = _AFTER

    def _eof(self) -> None:
        if self._state in (_START, _LIST):
            self._reject()
        self._state = _PLAIN
