"""Running prepared choices against the worker pool and shaping their output.

NOTE on the streaming hot path: per engine output, the work is one
detokenizer push and one chunk build (`ChunkEncoder.text`) per token, one ITL
observation and one ASGI send. Engines coalesce tokens while the consumer is
busy; the frontend still sends one SSE event per token (clients read ITL from
events, agents stream tool arguments), written in one send, unless
``frontend.stream_interval`` asks for coalesced events.

A request with tools or a reasoning parser routes its text through a `Shaper`
(`frontend.shaping`), whose pieces become ``reasoning_content``, ``content``
and ``tool_calls`` deltas; one without keeps the plain text path.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from dynamo_gateway import clock
from dynamo_gateway.disagg.flow import DisaggRouted
from dynamo_gateway.errors import EngineError, UnavailableError
from dynamo_gateway.frontend.encoding import (
    DONE,
    ChunkEncoder,
    LogprobFormatter,
    delta_of,
    error_body,
    message_of,
    sse,
    usage_dict,
)
from dynamo_gateway.frontend.lifecycle import CURRENT, RequestLifecycle, stream_ended
from dynamo_gateway.frontend.metrics import ModelMetrics
from dynamo_gateway.frontend.preparation import Choice, Prepared
from dynamo_gateway.frontend.shaping import Piece, Shaped, Shaper
from dynamo_gateway.parsers import ContentDelta
from dynamo_gateway.preprocess import IncrementalDetokenizer
from dynamo_gateway.protocol.engine import EngineOutput, FinishReason, TokenLogprob
from dynamo_gateway.runtime.pool import Routed

if TYPE_CHECKING:
    from opentelemetry.trace import Span

_FINISH = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
}


Emit = Callable[[bytes], Awaitable[None]]


class ChoiceRun:
    """One choice's stream: engine outputs in, text and bookkeeping out."""

    __slots__ = (
        "cached_tokens",
        "choice",
        "completion_tokens",
        "detok",
        "error",
        "finish_reason",
        "life",
        "logprobs",
        "metrics",
        "prep",
        "shaper",
        "span",
        "text_len",
        "tool_calls",
    )

    def __init__(self, prep: Prepared, choice: Choice, metrics: ModelMetrics) -> None:
        self.prep = prep
        self.choice = choice
        self.metrics = metrics
        # The prompt's last ids give decoders that look back (SentencePiece's
        # leading space) the context a mid-text token needs.
        self.detok = IncrementalDetokenizer(
            prep.pool.tokenizer, stop=prep.stop, prompt_ids=choice.prompt_ids
        )
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self.error: EngineError | UnavailableError | None = None
        self.logprobs: list[TokenLogprob] = []
        self.text_len = 0
        self.shaper: Shaper | None = prep.shape.shaper() if prep.shape is not None else None
        self.tool_calls = 0  # calls the shaper found (finish_reason "tool_calls")
        self.life: RequestLifecycle | None = CURRENT.get()  # None outside an HTTP request
        self.span: Span | None = None  # this choice's "stream" span (tracing on)

    def _route(self) -> Routed | DisaggRouted:
        c = self.choice
        if self.life is None:
            return self.prep.pool.route(c.route, c.engine_request)
        routed, self.span = self.life.route(self.prep.pool, c)
        return routed

    def _first_token(self, routed: Routed | DisaggRouted) -> None:
        routed.first_token()
        if self.life is not None:
            self.life.first_token()

    def _ended(self) -> None:
        """End the choice's span (in a `finally`: the exception in flight is its error)."""
        if self.span is not None:
            error = self.error or sys.exc_info()[1]
            stream_ended(self.span, self.completion_tokens, self.finish_reason, error)
            self.span = None

    def _end(self, out: EngineOutput) -> bool:
        """Record a terminal output; True if the stream is over."""
        if self.detok.stopped:
            self.finish_reason = "stop"
            return True
        reason = out.finish_reason
        if reason is None:
            return False
        mapped = _FINISH.get(reason)
        if mapped is not None:
            self.finish_reason = mapped
        elif reason is FinishReason.ABORT:
            self.error = UnavailableError(
                out.error or "the worker aborted the request", retry_after=1
            )
        else:
            self.error = EngineError(out.error or "the engine failed the request")
        return True

    async def stream(self, enc: ChunkEncoder, emit: Emit) -> None:
        """Emit this choice's chunks, ending with its finish chunk (the hot path)."""
        index = self.choice.index
        detok = self.detok
        metrics = self.metrics
        itl = metrics.itl
        fmt = _formatter(self.prep) if self.prep.logprobs is not None else None
        first_text = True
        last = self.prep.started
        perf = clock.now
        interval = self.prep.stream_interval
        held: list[str] = []  # text of tokens not sent yet (stream_interval > 1)
        held_tokens = 0
        shaper = self.shaper
        try:
            routed = self._route()
        except (UnavailableError, EngineError) as exc:  # reported in the stream's tail
            self.error = exc
            return
        try:
            outs = routed.outputs
            out = await anext(outs)
            self._first_token(routed)
            if out.cached_tokens is not None:
                self.cached_tokens = out.cached_tokens
            now = perf()
            metrics.ttft.observe(now - last)
            last = now
            while True:
                n = len(out.token_ids)
                if n:
                    self.completion_tokens += n
                    if fmt is not None and out.logprobs:
                        text = detok.push(out.token_ids)
                        lp = fmt.format(out.logprobs, self.text_len)
                        self.text_len += len(text)
                        await emit(enc.rich(index, text, first=first_text, logprobs=lp))
                        first_text = False
                    elif shaper is not None:
                        events = []
                        for token in out.token_ids:
                            for chunk in self._shaped(
                                enc, shaper.feed(detok.push((token,))), first_text
                            ):
                                events.append(chunk)
                                first_text = False
                        if events:
                            await emit(b"".join(events))
                    elif interval == 1 and n == 1:
                        text = detok.push(out.token_ids)
                        if text:
                            await emit(enc.text(index, text, first=first_text))
                            first_text = False
                    elif interval == 1:
                        # Tokens that queued while this consumer was busy: still one event
                        # per token (clients read ITL from events), written at once.
                        events = []
                        for token in out.token_ids:
                            text = detok.push((token,))
                            if text:
                                events.append(enc.text(index, text, first=first_text))
                                first_text = False
                        if events:
                            await emit(b"".join(events))
                    else:
                        held.append(detok.push(out.token_ids))
                        held_tokens += n
                        if held_tokens >= interval:
                            text, held, held_tokens = "".join(held), [], 0
                            if text:
                                await emit(enc.text(index, text, first=first_text))
                                first_text = False
                if (out.finish_reason is not None or detok.stopped) and self._end(out):
                    break
                out = await anext(outs)
                now = perf()
                if out.token_ids:
                    itl.observe((now - last) / len(out.token_ids))
                last = now
        except StopAsyncIteration:
            self.error = EngineError("the engine stream ended without a finish reason")
        except (UnavailableError, EngineError) as exc:
            self.error = exc
        finally:
            await routed.close()
            self._ended()
        if self.error is not None:
            return
        tail = "".join(held) + ("" if detok.stopped else detok.flush())
        if shaper is not None:
            pieces = [*shaper.feed(tail), *shaper.finish()]
            chunks = self._shaped(enc, pieces, first_text)
            if chunks:
                first_text = False
            self.tool_calls = shaper.calls
            tail = ""
            if chunks:
                await emit(b"".join(chunks))
        await emit(enc.rich(index, tail, first=first_text, finish_reason=self._finish()))

    def _shaped(self, enc: ChunkEncoder, pieces: list[Piece], first: bool) -> list[bytes]:
        """One chunk per shaped piece (the first carries the assistant role)."""
        index = self.choice.index
        out = []
        for piece in pieces:
            if isinstance(piece, ContentDelta):
                if not piece.text:
                    continue
                out.append(enc.text(index, piece.text, first=first))
            else:
                out.append(enc.delta(index, delta_of(piece), first=first))
            first = False
        return out

    def _finish(self) -> str | None:
        """The finish reason: a natural end with tool calls is "tool_calls"."""
        if self.tool_calls and self.finish_reason == "stop":
            return "tool_calls"
        return self.finish_reason

    async def pieces(self) -> AsyncIterator[Piece]:
        """The output as shaped pieces, token by token (the Responses API's stream).

        Raises the request's error (a `ClientError` or `EngineError`) instead of
        recording it, since there is no chat chunk to carry it.
        """
        detok = self.detok
        shaper = self.shaper
        last = self.prep.started
        routed = self._route()
        try:
            first = True
            async for out in routed.outputs:
                now = clock.now()
                if first:
                    first = False
                    self._first_token(routed)
                    self.metrics.ttft.observe(now - last)
                    if out.cached_tokens is not None:
                        self.cached_tokens = out.cached_tokens
                elif out.token_ids:
                    self.metrics.itl.observe((now - last) / len(out.token_ids))
                last = now
                self.completion_tokens += len(out.token_ids)
                for token in out.token_ids:
                    text = detok.push((token,))
                    if text:
                        for piece in shaper.feed(text) if shaper else [ContentDelta(text)]:
                            yield piece
                if (out.finish_reason is not None or detok.stopped) and self._end(out):
                    break
            else:
                self.error = EngineError("the engine stream ended without a finish reason")
        finally:
            await routed.close()
            self._ended()
        if self.error is not None:
            raise self.error
        tail = "" if detok.stopped else detok.flush()
        rest: list[Piece] = []
        if shaper is not None:
            rest = [*shaper.feed(tail), *shaper.finish()]
            self.tool_calls = shaper.calls
        elif tail:
            rest = [ContentDelta(tail)]
        for piece in rest:
            yield piece

    def shape(self, text: str) -> Shaped | None:
        """The whole output shaped (non-streaming), or None without a shaper."""
        if self.shaper is None:
            return None
        shaped = self.shaper.shape(text)
        self.tool_calls = len(shaped.tool_calls)
        return shaped

    async def collect(self) -> tuple[str, list[TokenLogprob]]:
        """Run to the end; the whole text and the logprobs (non-streaming)."""
        parts: list[str] = []
        detok = self.detok
        want_logprobs = self.prep.logprobs is not None
        first = True
        routed = self._route()
        try:
            async for out in routed.outputs:
                if first:
                    first = False
                    self._first_token(routed)
                    self.metrics.ttft.observe(clock.now() - self.prep.started)
                    if out.cached_tokens is not None:
                        self.cached_tokens = out.cached_tokens
                self.completion_tokens += len(out.token_ids)
                if out.token_ids:
                    parts.append(detok.push(out.token_ids))
                if want_logprobs and out.logprobs:
                    self.logprobs.extend(out.logprobs)
                if (out.finish_reason is not None or detok.stopped) and self._end(out):
                    break
            else:
                self.error = EngineError("the engine stream ended without a finish reason")
        finally:
            await routed.close()
            self._ended()
        if self.error is not None:
            raise self.error
        if not detok.stopped:
            parts.append(detok.flush())
        return "".join(parts), self.logprobs


def _formatter(prep: Prepared) -> LogprobFormatter:
    tok = prep.pool.tokenizer
    return LogprobFormatter(tok.token_text, tok.token_bytes, chat=prep.chat)


def _usage(prep: Prepared, runs: list[ChoiceRun]) -> dict[str, Any]:
    completion = sum(r.completion_tokens for r in runs)
    # A prompt sampled n times is counted (and its cache hits reported) once.
    cached = sum(r.cached_tokens for r in runs if r.choice.index % prep.n == 0)
    return usage_dict(prep.prompt_tokens, completion, cached)


def account(prep: Prepared, runs: list[ChoiceRun], metrics: ModelMetrics) -> dict[str, Any]:
    usage = _usage(prep, runs)
    metrics.input_tokens.inc(usage["prompt_tokens"])
    metrics.output_tokens.inc(usage["completion_tokens"])
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    if cached:
        metrics.cached_tokens.inc(cached)
    metrics.isl.observe(usage["prompt_tokens"])
    metrics.osl.observe(usage["completion_tokens"])
    metrics.cached_per_request.observe(cached)
    return usage


async def stream_response(prep: Prepared, metrics: ModelMetrics, emit: Emit) -> None:
    """Emit the SSE body of a streaming request, `data: [DONE]` included."""
    enc = ChunkEncoder(
        chat=prep.chat, response_id=prep.response_id, created=prep.created, model=prep.model
    )
    runs = [ChoiceRun(prep, c, metrics) for c in prep.choices]
    if len(runs) == 1:
        await runs[0].stream(enc, emit)
    else:
        await _interleave(runs, enc, emit)
    tail = b""
    failed = next((r.error for r in runs if r.error is not None), None)
    if failed is not None:
        tail += sse(error_body(str(failed), failed.type, code=failed.code))
    usage = account(prep, runs, metrics)
    if prep.include_usage:
        tail += enc.usage(usage)
    nvext = _nvext()
    if nvext is not None:  # Dynamo's response metadata: its own chunk, the last one
        tail += sse(_chunk_envelope(prep) | {"nvext": nvext})
    await emit(tail + DONE)


def _nvext() -> dict[str, Any] | None:
    """The current request's ``nvext`` response metadata, if it asked for any."""
    life = CURRENT.get()
    return life.nvext() if life is not None else None


def _chunk_envelope(prep: Prepared) -> dict[str, Any]:
    return {
        "id": prep.response_id,
        "object": "chat.completion.chunk" if prep.chat else "text_completion",
        "created": prep.created,
        "model": prep.model,
        "choices": [],
    }


async def _interleave(runs: list[ChoiceRun], enc: ChunkEncoder, emit: Emit) -> None:
    """Run several choices at once; one task sends, so chunks never interleave mid-write."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def put(chunk: bytes) -> None:
        queue.put_nowait(chunk)

    async def run(r: ChoiceRun) -> None:
        try:
            await r.stream(enc, put)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(run(r)) for r in runs]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                await emit(item)
        for t in tasks:
            t.result()  # surface a choice's exception
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def complete_response(prep: Prepared, metrics: ModelMetrics) -> dict[str, Any]:
    """The JSON body of a non-streaming request."""
    runs = [ChoiceRun(prep, c, metrics) for c in prep.choices]
    results = await _gather_or_cancel([r.collect() for r in runs])
    fmt = _formatter(prep) if prep.logprobs is not None else None
    choices: list[dict[str, Any]] = []
    for run, (text, logprobs) in zip(runs, results, strict=True):
        lp = fmt.format(logprobs) if fmt is not None else None
        choice: dict[str, Any] = {"index": run.choice.index}
        shaped = run.shape(text)
        if prep.chat and shaped is not None:
            choice["message"] = message_of(
                shaped, reasoning=prep.shape is not None and prep.shape.reasoning is not None
            )
        elif prep.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = lp
        choice["finish_reason"] = run._finish() or "stop"
        choices.append(choice)
    body = {
        "id": prep.response_id,
        "object": "chat.completion" if prep.chat else "text_completion",
        "created": prep.created,
        "model": prep.model,
        "choices": choices,
        "usage": account(prep, runs, metrics),
    }
    nvext = _nvext()
    if nvext is not None:
        body["nvext"] = nvext
    return body


async def _gather_or_cancel(
    coros: list[Any],
) -> list[tuple[str, list[TokenLogprob]]]:
    if len(coros) == 1:
        return [await coros[0]]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
