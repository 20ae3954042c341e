"""`POST /v1/responses`: the OpenAI Responses API over the chat pipeline.

The request becomes a chat request (`protocol.responses.to_chat`), runs like
one (template, constraint, tool and reasoning parsers), and its shaped pieces
become Responses output items: a ``reasoning`` item, ``message`` items with
``output_text`` parts, and ``function_call`` items. Streaming sends the typed
events in the API's order - ``response.created``, ``response.in_progress``,
then per item ``response.output_item.added``, its deltas
(``response.output_text.delta``, ``response.function_call_arguments.delta``,
``response.reasoning_text.delta``) and their ``.done`` events, ``response.output_item.done``
- and ``response.completed`` (``response.incomplete`` when the output hit
``max_output_tokens``), each with a ``sequence_number``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from dynamo_gateway.frontend.generation import ChoiceRun, account
from dynamo_gateway.frontend.metrics import ModelMetrics
from dynamo_gateway.frontend.preparation import Prepared
from dynamo_gateway.frontend.shaping import Piece, ReasoningDelta
from dynamo_gateway.parsers import ToolArgumentsDelta, ToolCallStart
from dynamo_gateway.protocol.responses import ResponsesRequest

__all__ = ["ResponseBuilder"]

Emit = Callable[[bytes], Awaitable[None]]


def _builtins(value: object, default: object) -> Any:
    return default if value is None else msgspec.to_builtins(value)


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def _event(payload: dict[str, Any]) -> bytes:
    kind: str = payload["type"]
    return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(payload) + b"\n\n"


@dataclass
class _Item:
    """One output item being built."""

    kind: str  # "message" | "function_call" | "reasoning"
    id: str
    text: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""

    def done(self) -> dict[str, Any]:
        text = "".join(self.text)
        if self.kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            return {
                "type": "message",
                "id": self.id,
                "status": "completed",
                "role": "assistant",
                "content": [part],
            }
        if self.kind == "function_call":
            return {
                "type": "function_call",
                "id": self.id,
                "call_id": self.call_id,
                "name": self.name,
                "arguments": text or "{}",
                "status": "completed",
            }
        return {
            "type": "reasoning",
            "id": self.id,
            "summary": [],
            "content": [{"type": "reasoning_text", "text": text}],
        }

    def added(self) -> dict[str, Any]:
        if self.kind == "message":
            return {
                "type": "message",
                "id": self.id,
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
        if self.kind == "function_call":
            return {
                "type": "function_call",
                "id": self.id,
                "call_id": self.call_id,
                "name": self.name,
                "arguments": "",
                "status": "in_progress",
            }
        return {"type": "reasoning", "id": self.id, "summary": [], "content": []}


class ResponseBuilder:
    """Turns one prepared chat run into a Response object, or its event stream."""

    def __init__(self, req: ResponsesRequest, prep: Prepared, metrics: ModelMetrics) -> None:
        self.req = req
        self.prep = prep
        self.metrics = metrics
        self.id = _id("resp")
        self.created_at = int(time.time())
        self.run = ChoiceRun(prep, prep.choices[0], metrics)
        self.items: list[_Item] = []
        self._seq = 0
        self._open: _Item | None = None  # the item deltas go to

    def _response(self, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        req = self.req
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": req.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": _builtins(req.text.format if req.text else None, {"type": "text"})},
            "tool_choice": _builtins(req.tool_choice, "auto"),
            "tools": [msgspec.to_builtins(t) for t in req.tools or ()],
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": "disabled",
            "usage": None,
            "user": req.user,
            "metadata": req.metadata or {},
        }
        if status == "incomplete":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        return body

    def _usage(self) -> dict[str, Any]:
        usage = account(self.prep, [self.run], self.metrics)
        return {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": usage["prompt_tokens_details"],
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"],
        }

    def _status(self) -> str:
        return "incomplete" if self.run.finish_reason == "length" else "completed"

    async def complete(self) -> dict[str, Any]:
        """The whole Response object (non-streaming)."""
        async for piece in self.run.pieces():
            self._take(piece)
        body = self._response(self._status(), [item.done() for item in self.items])
        body["usage"] = self._usage()
        return body

    def _take(self, piece: Piece) -> tuple[_Item, bool, str]:
        """File `piece` under its output item: (the item, whether it is new, its text)."""
        if isinstance(piece, ToolCallStart):
            item, new, text = (
                _Item("function_call", _id("fc"), call_id=piece.id, name=piece.name),
                True,
                "",
            )
        elif isinstance(piece, ToolArgumentsDelta):
            calls = [i for i in self.items if i.kind == "function_call"]
            item, new, text = calls[piece.index], False, piece.fragment
        else:
            kind = "reasoning" if isinstance(piece, ReasoningDelta) else "message"
            open_ = self._open
            if open_ is not None and open_.kind == kind:
                item, new = open_, False
            else:
                item, new = _Item(kind, _id("rs" if kind == "reasoning" else "msg")), True
            text = piece.text
        if new:
            self.items.append(item)
            self._open = item
        if text:
            item.text.append(text)
        return item, new, text

    # -- streaming ---------------------------------------------------------------------

    def _emit_payload(self, payload: dict[str, Any]) -> bytes:
        payload["sequence_number"] = self._seq
        self._seq += 1
        return _event(payload)

    async def stream(self, emit: Emit) -> None:
        """The event stream (see the module docstring)."""
        ev = self._emit_payload
        await emit(
            ev({"type": "response.created", "response": self._response("in_progress", [])})
            + ev({"type": "response.in_progress", "response": self._response("in_progress", [])})
        )
        async for piece in self.run.pieces():
            previous = self._open
            item, new, text = self._take(piece)
            chunks: list[bytes] = []
            if new and previous is not None:
                chunks.append(self._close(previous))
            index = self.items.index(item)
            if new:
                chunks.append(
                    ev(
                        {
                            "type": "response.output_item.added",
                            "output_index": index,
                            "item": item.added(),
                        }
                    )
                )
                if item.kind == "message":
                    chunks.append(
                        ev(
                            {
                                "type": "response.content_part.added",
                                "item_id": item.id,
                                "output_index": index,
                                "content_index": 0,
                                "part": {
                                    "type": "output_text",
                                    "text": "",
                                    "annotations": [],
                                    "logprobs": [],
                                },
                            }
                        )
                    )
            if text:
                chunks.append(ev(self._delta(item, index, text)))
            if chunks:
                await emit(b"".join(chunks))
        tail = b""
        if self._open is not None:
            tail += self._close(self._open)
        final = self._response(self._status(), [item.done() for item in self.items])
        final["usage"] = self._usage()
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        await emit(tail + ev({"type": kind, "response": final}))

    def _delta(self, item: _Item, index: int, text: str) -> dict[str, Any]:
        if item.kind == "message":
            return {
                "type": "response.output_text.delta",
                "item_id": item.id,
                "output_index": index,
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            }
        if item.kind == "function_call":
            return {
                "type": "response.function_call_arguments.delta",
                "item_id": item.id,
                "output_index": index,
                "delta": text,
            }
        return {
            "type": "response.reasoning_text.delta",
            "item_id": item.id,
            "output_index": index,
            "content_index": 0,
            "delta": text,
        }

    def _close(self, item: _Item) -> bytes:
        ev = self._emit_payload
        index = self.items.index(item)
        done = item.done()
        text = "".join(item.text)
        out = b""
        if item.kind == "message":
            part = done["content"][0]
            out += ev(
                {
                    "type": "response.output_text.done",
                    "item_id": item.id,
                    "output_index": index,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                }
            )
            out += ev(
                {
                    "type": "response.content_part.done",
                    "item_id": item.id,
                    "output_index": index,
                    "content_index": 0,
                    "part": part,
                }
            )
        elif item.kind == "function_call":
            out += ev(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item.id,
                    "output_index": index,
                    "name": item.name,
                    "arguments": done["arguments"],
                }
            )
        else:
            out += ev(
                {
                    "type": "response.reasoning_text.done",
                    "item_id": item.id,
                    "output_index": index,
                    "content_index": 0,
                    "text": text,
                }
            )
        out += ev({"type": "response.output_item.done", "output_index": index, "item": done})
        return out
