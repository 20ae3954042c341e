"""OpenAI response bodies, built for speed on the streaming path.

A streamed chunk differs from the previous one only in its text, so each
request precomputes the bytes around the text once and a chunk costs one JSON
string encode and a concatenation. Non-streaming bodies and the rare chunks
(finish, usage, logprobs, errors) go through msgspec with plain dicts.
"""

from __future__ import annotations

from typing import Any

import msgspec

from dynamo_gateway.frontend.shaping import ReasoningDelta, Shaped
from dynamo_gateway.parsers import ContentDelta, ToolArgumentsDelta, ToolCallStart
from dynamo_gateway.protocol.engine import TokenLogprob

_enc = msgspec.json.encode
DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + _enc(obj) + b"\n\n"


class ChunkEncoder:
    """Streaming chunks of one response (chat or text completion)."""

    def __init__(self, *, chat: bool, response_id: str, created: int, model: str) -> None:
        self.chat = chat
        self.response_id = response_id
        self.created = created
        self.model = model
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        self._head = (
            b'data: {"id":' + _enc(response_id) + b',"object":"' + obj + b'","created":'
            + str(created).encode() + b',"model":' + _enc(model) + b',"choices":[{"index":'
        )  # fmt: skip
        if chat:
            self._mid = b',"delta":{"content":'
            self._mid_first = b',"delta":{"role":"assistant","content":'
            self._tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self._mid = self._mid_first = b',"text":'
            self._tail = b',"logprobs":null,"finish_reason":null}]}\n\n'
        self._index_bytes: dict[int, bytes] = {}
        self._c0 = self._head + b"0" + self._mid
        self._c0_first = self._head + b"0" + self._mid_first

    def _idx(self, index: int) -> bytes:
        b = self._index_bytes.get(index)
        if b is None:
            b = self._index_bytes[index] = str(index).encode()
        return b

    def text(self, index: int, text: str, *, first: bool = False) -> bytes:
        """A chunk carrying `text` for choice `index` (the hot path)."""
        if index == 0:
            return (self._c0_first if first else self._c0) + _enc(text) + self._tail
        mid = self._mid_first if first else self._mid
        return self._head + self._idx(index) + mid + _enc(text) + self._tail

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def rich(
        self,
        index: int,
        text: str,
        *,
        first: bool = False,
        logprobs: dict[str, Any] | None = None,
        finish_reason: str | None = None,
    ) -> bytes:
        """A chunk with logprobs and/or a finish reason."""
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text or first:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        return sse(self._envelope([choice]))

    def delta(self, index: int, delta: dict[str, Any], *, first: bool = False) -> bytes:
        """A chat chunk with any `delta` (reasoning, tool calls)."""
        if first:
            delta = {"role": "assistant", **delta}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        return sse(self._envelope([choice]))

    def usage(self, usage: dict[str, Any]) -> bytes:
        body = self._envelope([])
        body["usage"] = usage
        return sse(body)


def delta_of(
    piece: ReasoningDelta | ContentDelta | ToolCallStart | ToolArgumentsDelta,
) -> dict[str, Any]:
    """A shaped piece of output as a chat ``delta``."""
    if isinstance(piece, ReasoningDelta):
        return {"reasoning_content": piece.text}
    if isinstance(piece, ContentDelta):
        return {"content": piece.text}
    if isinstance(piece, ToolCallStart):
        call = {"name": piece.name, "arguments": ""}
        return {
            "tool_calls": [
                {"index": piece.index, "id": piece.id, "type": "function", "function": call}
            ]
        }
    return {"tool_calls": [{"index": piece.index, "function": {"arguments": piece.fragment}}]}


def message_of(shaped: Shaped, *, reasoning: bool) -> dict[str, Any]:
    """The assistant message of a shaped, non-streamed output."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": shaped.content if shaped.content or not shaped.tool_calls else None,
    }
    if reasoning:
        message["reasoning_content"] = shaped.reasoning
    if shaped.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in shaped.tool_calls
        ]
    return message


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# JSON has no -inf (msgspec would write null, which OpenAI clients reject as a
# logprob): a token the sampler masked out is reported with this value instead.
MIN_LOGPROB = -9999.0


def _lp(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB


class LogprobFormatter:
    """Turns engine logprobs into the chat or the completions shape."""

    def __init__(self, token_text: Any, token_bytes: Any, *, chat: bool) -> None:
        self._text = token_text
        self._bytes = token_bytes
        self.chat = chat

    def chat_content(self, items: list[TokenLogprob]) -> list[dict[str, Any]]:
        out = []
        for lp in items:
            out.append(
                {
                    "token": self._text(lp.token_id),
                    "logprob": _lp(lp.logprob),
                    "bytes": self._bytes(lp.token_id),
                    "top_logprobs": [
                        {"token": self._text(t), "logprob": _lp(v), "bytes": self._bytes(t)}
                        for t, v in lp.top
                    ],
                }
            )
        return out

    def completion(self, items: list[TokenLogprob], text_offset: int) -> dict[str, Any]:
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = text_offset
        for lp in items:
            tok = self._text(lp.token_id)
            tokens.append(tok)
            token_logprobs.append(_lp(lp.logprob))
            top.append({self._text(t): _lp(v) for t, v in lp.top})
            offsets.append(offset)
            offset += len(tok)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def format(self, items: list[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
        if self.chat:
            return {"content": self.chat_content(items)}
        return self.completion(items, text_offset)
