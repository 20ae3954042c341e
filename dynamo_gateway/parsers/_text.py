"""Text helpers shared by the streams: marker search with hold-back, content whitespace."""

from __future__ import annotations

from collections.abc import Sequence


def find_marker(text: str, markers: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest occurrence of any marker at or after ``start``: ``(index, marker)``."""
    best: tuple[int, str] | None = None
    for marker in markers:
        at = text.find(marker, start)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, marker)
    return best


def partial_marker(text: str, markers: Sequence[str], start: int = 0) -> int:
    """Length of the longest suffix of ``text[start:]`` that is a proper prefix of a marker.

    That suffix must be held back: the next delta may complete the marker.
    """
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text) - start), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


def scan(
    text: str, start: int, markers: Sequence[str], *, final: bool
) -> tuple[int, int, str | None]:
    """Find the next marker in ``text[start:]``.

    Returns ``(end, resume, marker)``: ``text[start:end]`` is certainly not part
    of a marker; ``marker`` was found at ``end`` and ``resume`` is just after
    it, or ``marker`` is ``None`` and ``text[end:]`` (a possible marker prefix,
    empty when ``final``) must wait for more text.
    """
    found = find_marker(text, markers, start)
    if found is not None:
        at, marker = found
        return at, at + len(marker), marker
    end = len(text) if final else len(text) - partial_marker(text, markers, start)
    return end, end, None


class ContentEmitter:
    """Applies the content rule of `dynamo_gateway.parsers.base` to a stream's text.

    ``text()`` takes content in output order and returns what may be emitted
    now; ``call()`` marks a tool call at the current point. Whitespace is held
    until the next non-whitespace text shows whether it touches a call. The
    result does not depend on how the text is split.
    """

    def __init__(self) -> None:
        self._pending = ""  # trailing whitespace not yet emitted
        self._after_call = False  # calls since the last non-whitespace content
        self._separator = ""  # whitespace that preceded the current run of calls
        self._emitted = False  # any non-whitespace content emitted

    def text(self, text: str) -> str:
        buf = self._pending + text
        body = buf.rstrip()
        self._pending = buf[len(body) :]
        if not body:
            return ""
        if self._after_call:
            body = (self._separator if self._emitted else "") + body.lstrip()
            self._after_call = False
        self._emitted = True
        return body

    def call(self) -> None:
        if not self._after_call:
            self._separator = self._pending
            self._after_call = True
        self._pending = ""

    def finish(self) -> str:
        tail = "" if self._after_call else self._pending
        self._pending = ""
        return tail
