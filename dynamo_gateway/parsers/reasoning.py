"""Reasoning parsers for ``<think>``...``</think>`` models.

- ``deepseek_r1``: the chat template opens ``<think>`` itself (DeepSeek-R1 and
  its distills, Qwen3 "Thinking-2507", QwQ), so the output starts inside the
  thinking: everything before ``</think>`` is reasoning, and an output that
  never closes it is all reasoning. A ``<think>`` the model repeats at the
  start is dropped.
- ``qwen3``: the model opens the thinking itself (Qwen3 hybrid models); a
  ``<think>`` at the start (after whitespace) begins reasoning, and without
  one the whole output is content (thinking switched off). An unclosed
  ``<think>`` makes the rest reasoning.

Whitespace rule (``parse`` and streams alike): reasoning is stripped at both
ends, the content after ``</think>`` loses its leading whitespace, and output
with no reasoning at all is passed through verbatim. Markers after the
reasoning has ended are ordinary content.
"""

from __future__ import annotations

from dynamo_gateway.parsers._stream import skip_ws
from dynamo_gateway.parsers._text import scan
from dynamo_gateway.parsers.base import (
    Channel,
    ReasoningPiece,
    ReasoningStream,
    collect_reasoning,
)

THINK_START = "<think>"
THINK_END = "</think>"

_START, _REASONING, _AFTER, _CONTENT = range(4)


class ThinkReasoningParser:
    """Splits ``<think>`` reasoning from content.

    :param starts_in_reasoning: the output begins inside the thinking, because
        the prompt already opened it.
    """

    end_marker = THINK_END

    def __init__(self, *, starts_in_reasoning: bool) -> None:
        self.starts_in_reasoning = starts_in_reasoning

    def stream(self) -> ReasoningStream:
        return _ThinkStream(self.starts_in_reasoning)

    def parse(self, text: str) -> tuple[str | None, str]:
        stream = self.stream()
        return collect_reasoning([*stream.feed(text), *stream.finish()])


def deepseek_r1() -> ThinkReasoningParser:
    return ThinkReasoningParser(starts_in_reasoning=True)


def qwen3() -> ThinkReasoningParser:
    return ThinkReasoningParser(starts_in_reasoning=False)


class _ThinkStream:
    def __init__(self, starts_in_reasoning: bool) -> None:
        self._starts_in_reasoning = starts_in_reasoning
        self._state = _START
        self._buf = ""
        self._out: list[ReasoningPiece] = []
        self._pending = ""  # reasoning's trailing whitespace, dropped if it ends there
        self._begun = False  # some reasoning was emitted (so leading whitespace is gone)
        self._finished = False

    def feed(self, delta: str) -> list[ReasoningPiece]:
        if self._finished:
            return []
        self._buf += delta
        self._run(final=False)
        return self._drain()

    def finish(self) -> list[ReasoningPiece]:
        if self._finished:
            return []
        self._finished = True
        self._run(final=True)
        return self._drain()

    def _run(self, final: bool) -> None:
        i = 0
        while True:
            j = self._step(i, final)
            if j is None:
                break
            i = j
        self._buf = self._buf[i:]

    def _step(self, i: int, final: bool) -> int | None:
        buf = self._buf
        if self._state == _START:
            j = skip_ws(buf, i)
            head = buf[j : j + len(THINK_START)]
            if head == THINK_START:
                self._state = _REASONING
                return j + len(head)
            if THINK_START.startswith(head) and not final:
                return None  # whitespace or a partial "<think>": wait
            if self._starts_in_reasoning:
                self._state = _REASONING
                return j
            self._state = _CONTENT
            return i
        if self._state == _REASONING:
            end, resume, marker = scan(buf, i, (THINK_END,), final=final)
            self._reasoning(buf[i:end])
            if marker is not None:
                self._pending = ""
                self._state = _AFTER
                return resume
            return end if end > i else None
        if self._state == _AFTER:
            j = skip_ws(buf, i)
            if j < len(buf):
                self._state = _CONTENT
            return j if j > i or self._state == _CONTENT else None
        if len(buf) > i:
            self._emit("content", buf[i:])
            return len(buf)
        return None

    def _reasoning(self, text: str) -> None:
        whole = self._pending + text
        body = whole.rstrip()
        self._pending = whole[len(body) :]
        if not self._begun:
            body = body.lstrip()
        if body:
            self._begun = True
            self._emit("reasoning", body)

    def _emit(self, channel: Channel, text: str) -> None:
        if self._out and self._out[-1][0] == channel:
            self._out[-1] = (channel, self._out[-1][1] + text)
        else:
            self._out.append((channel, text))

    def _drain(self) -> list[ReasoningPiece]:
        out, self._out = self._out, []
        return out
