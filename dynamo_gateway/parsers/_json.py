"""An incremental JSON scanner: validates one value as it arrives and writes it compact.

NOTE on streaming arguments: the scanner records *safe points*, positions in
its compact output where the text so far can be closed into valid JSON by
appending ``closer`` (closing brackets, and a quote inside a string value).
Streams emit arguments only up to the last safe point, so what they have sent
never needs taking back: an object key, a ``:`` or ``,``, a number or literal
still being written, or a half-written escape is held until it is complete.
If the output breaks off there, ``closer`` ends the arguments validly.

Insignificant whitespace is dropped; raw control characters inside strings
(which models write but strict JSON forbids) are escaped; everything else is
kept as the model wrote it, escapes included.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from dataclasses import dataclass

_WS = " \t\n\r"
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?\Z")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_STRING_RUN = re.compile(r'[^"\\\x00-\x1f]+')
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_SHORT_ESCAPES = frozenset('"\\/bfnrt')
_HEX = frozenset("0123456789abcdefABCDEF")
_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}

# States: what the scanner expects next.
_VALUE = 0  # any value
_OBJ_FIRST = 1  # after "{": a key or "}"
_OBJ_KEY = 2  # after "," in an object: a key
_COLON = 3  # after a key
_ARR_FIRST = 4  # after "[": a value or "]"
_AFTER = 5  # after a value inside a container: "," or the closer
_STRING = 6
_NUMBER_STATE = 7
_LITERAL = 8
_DONE = 9
_ERROR = 10


@dataclass
class Member:
    """A member of the top-level object: its key and its value's span in the output."""

    key: str
    start: int
    end: int | None = None


class JsonScanner:
    """Scans one JSON value; see the module docstring.

    With ``members=True`` and an object as the value, the scanner records each
    top-level member and pauses (returns from `feed`) right after a top-level
    key, at the first character of a top-level value and at its end, so the
    caller can decide at exact positions.
    """

    def __init__(self, *, members: bool = False) -> None:
        self._pieces: list[str] = []  # the compact output, in pieces
        self._offsets: list[int] = []  # where each piece starts
        self._size = 0  # total length of the compact output
        self._stack: list[str] = []  # "{" or "[" per open container
        self._state = _VALUE
        self._key = False  # the open string is an object key
        self._escape = 0  # 0: none; 1: after a backslash; 2..5: \u digits still due
        self._pending = ""  # number or literal being read
        self._key_start = 0
        self._track = members
        self.members: list[Member] = []
        self.safe = 0
        """Length of the output that can be closed validly."""
        self.closer = ""
        """What closes ``text(0, safe)`` into valid JSON."""

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def error(self) -> bool:
        return self._state == _ERROR

    @property
    def size(self) -> int:
        return self._size

    def text(self, start: int = 0, end: int | None = None) -> str:
        """The compact output between two positions (cheap for a short span)."""
        stop = self._size if end is None else end
        if stop <= start:
            return ""
        k = max(bisect_right(self._offsets, start) - 1, 0)
        parts: list[str] = []
        while k < len(self._pieces) and self._offsets[k] < stop:
            offset = self._offsets[k]
            piece = self._pieces[k]
            parts.append(piece[max(start - offset, 0) : stop - offset])
            k += 1
        return "".join(parts)

    def feed(self, text: str, i: int = 0) -> int:
        """Consume ``text`` from ``i``; return the index of the first unconsumed character.

        Stops early when the value is complete, on the first invalid
        character (left unconsumed), or at a member event (see the class).
        """
        n = len(text)
        while i < n and self._state < _DONE:
            state = self._state
            if state == _STRING:
                if self._escape == 0:
                    run = _STRING_RUN.match(text, i)
                    if run is not None:
                        self._put(run.group())
                        i = run.end()
                        if not self._key:
                            self.safe = self._size
                        continue
                paused = self._string_char(text[i])
                i += 1
                if paused:
                    return i
                continue
            ch = text[i]
            if state in (_NUMBER_STATE, _LITERAL):
                if state == _NUMBER_STATE and ch in _NUMBER_CHARS:
                    self._pending += ch
                    i += 1
                    continue
                if state == _LITERAL:
                    want = _LITERALS[self._pending[0]]
                    if want[len(self._pending)] != ch:
                        self._state = _ERROR
                        return i
                    self._pending += ch
                    i += 1
                    if self._pending == want:
                        self._put(want)
                        self._pending = ""
                        if self._value_done():
                            return i
                    continue
                # a number ends at the first character that cannot continue it
                ended, paused = self._end_number()
                if not ended or paused:
                    return i
                continue
            if ch in _WS:
                i += 1
                continue
            paused = self._structural(ch)
            if self._state == _ERROR:
                return i
            i += 1
            if paused:
                return i
        return i

    def finish(self) -> None:
        """The text ended: a number that was still open is complete if valid."""
        if self._state == _NUMBER_STATE:
            self._end_number()

    # internals

    def _put(self, piece: str) -> None:
        self._pieces.append(piece)
        self._offsets.append(self._size)
        self._size += len(piece)

    def _closers(self) -> str:
        return "".join("}" if c == "{" else "]" for c in reversed(self._stack))

    def _mark_safe(self, prefix: str = "") -> None:
        self.safe = self._size
        self.closer = prefix + self._closers()

    def _track_here(self) -> bool:
        """The scanner is directly inside the top-level object."""
        return self._track and self._stack == ["{"]

    def _value_done(self) -> bool:
        """A value ended; returns whether to pause (a top-level member ended)."""
        if not self._stack:
            self._state = _DONE
            self._mark_safe()
            return False
        self._state = _AFTER
        self._mark_safe()
        if self._track_here() and self.members and self.members[-1].end is None:
            self.members[-1].end = self._size
            return True
        return False

    def _start_value(self, ch: str) -> bool:
        """``ch`` opens a value; returns whether to pause (a top-level member started)."""
        member = self._track_here() and bool(self.members) and self.members[-1].end is None
        if member:
            self.members[-1].start = self._size
        if ch == "{" or ch == "[":
            self._stack.append(ch)
            self._put(ch)
            self._state = _OBJ_FIRST if ch == "{" else _ARR_FIRST
            self._mark_safe()
        elif ch == '"':
            self._put(ch)
            self._state = _STRING
            self._key = False
            self._mark_safe('"')
        elif ch == "-" or ch.isdigit():
            self._pending = ch
            self._state = _NUMBER_STATE
        elif ch in _LITERALS:
            self._pending = ch
            self._state = _LITERAL
        else:
            self._state = _ERROR
            return False
        return member

    def _structural(self, ch: str) -> bool:
        state = self._state
        if state == _VALUE:
            return self._start_value(ch)
        if state == _ARR_FIRST:
            if ch == "]":
                return self._close("[")
            return self._start_value(ch)
        if state in (_OBJ_FIRST, _OBJ_KEY):
            if ch == '"':
                self._key_start = self._size
                self._put(ch)
                self._state = _STRING
                self._key = True
                return False
            if ch == "}" and state == _OBJ_FIRST:
                return self._close("{")
        elif state == _COLON:
            if ch == ":":
                self._put(ch)
                self._state = _VALUE
                return False
        elif state == _AFTER:
            if ch == ",":
                self._put(ch)
                self._state = _OBJ_KEY if self._stack[-1] == "{" else _VALUE
                return False
            if ch == "}" or ch == "]":
                return self._close("{" if ch == "}" else "[")
        self._state = _ERROR
        return False

    def _close(self, opener: str) -> bool:
        if not self._stack or self._stack[-1] != opener:
            self._state = _ERROR
            return False
        self._stack.pop()
        self._put("}" if opener == "{" else "]")
        return self._value_done()

    def _string_char(self, ch: str) -> bool:
        """One character inside a string that the fast path did not take."""
        if self._escape == 1:
            if ch in _SHORT_ESCAPES:
                self._escape = 0
            elif ch == "u":
                self._escape = 5
            else:
                self._state = _ERROR
                return False
            self._put(ch)
        elif self._escape > 1:
            if ch not in _HEX:
                self._state = _ERROR
                return False
            self._put(ch)
            self._escape = 0 if self._escape == 2 else self._escape - 1
        elif ch == "\\":
            self._put(ch)
            self._escape = 1
            return False  # not a safe point: the escape is incomplete
        elif ch == '"':
            self._put(ch)
            if self._key:
                self._state = _COLON
                if self._track_here():
                    raw = self.text(self._key_start, self._size)
                    self.members.append(Member(json.loads(raw), self._size))
                    return True
                return False
            return self._value_done()
        else:  # a raw control character: escape it so the output stays strict JSON
            self._put(_CONTROL_ESCAPES.get(ch, f"\\u{ord(ch):04x}"))
        if self._escape == 0 and not self._key:
            self.safe = self._size
        return False

    def _end_number(self) -> tuple[bool, bool]:
        """``(valid, pause)`` for the number just read."""
        if not _NUMBER.match(self._pending):
            self._state = _ERROR
            return False, False
        self._put(self._pending)
        self._pending = ""
        return True, self._value_done()


def compact(value: object) -> str:
    """A JSON value as compact text, non-ASCII kept as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
