"""Running prepared choices against the worker pool and shaping their output.

NOTE on the streaming hot path: per engine output (one or more tokens), the
work is one detokenizer push, one chunk build (`ChunkEncoder.text`), one ITL
observation and one ASGI send. Engines coalesce tokens while the consumer is
busy, so a loaded frontend sends fewer, larger chunks instead of falling behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from dynamo_gateway import clock
from dynamo_gateway.disagg.flow import DisaggRouted
from dynamo_gateway.errors import EngineError, UnavailableError
from dynamo_gateway.frontend.encoding import (
    DONE,
    ChunkEncoder,
    LogprobFormatter,
    error_body,
    sse,
    usage_dict,
)
from dynamo_gateway.frontend.metrics import ModelMetrics
from dynamo_gateway.frontend.preparation import Choice, Prepared
from dynamo_gateway.preprocess import IncrementalDetokenizer
from dynamo_gateway.protocol.engine import EngineOutput, FinishReason, TokenLogprob
from dynamo_gateway.runtime.pool import Routed

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
        "logprobs",
        "metrics",
        "prep",
        "text_len",
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

    def _route(self) -> Routed | DisaggRouted:
        c = self.choice
        return self.prep.pool.route(c.route, c.engine_request)

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
        try:
            routed = self._route()
        except (UnavailableError, EngineError) as exc:  # reported in the stream's tail
            self.error = exc
            return
        try:
            outs = routed.outputs
            out = await anext(outs)
            routed.first_token()
            if out.cached_tokens is not None:
                self.cached_tokens = out.cached_tokens
            now = perf()
            metrics.ttft.observe(now - last)
            last = now
            while True:
                n = len(out.token_ids)
                if n:
                    self.completion_tokens += n
                    text = detok.push(out.token_ids)
                    if fmt is not None and out.logprobs:
                        lp = fmt.format(out.logprobs, self.text_len)
                        self.text_len += len(text)
                        await emit(enc.rich(index, text, first=first_text, logprobs=lp))
                        first_text = False
                    elif text:
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
        if self.error is not None:
            return
        tail = "" if detok.stopped else detok.flush()
        await emit(enc.rich(index, tail, first=first_text, finish_reason=self.finish_reason))

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
                    routed.first_token()
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


def _account(prep: Prepared, runs: list[ChoiceRun], metrics: ModelMetrics) -> dict[str, Any]:
    usage = _usage(prep, runs)
    metrics.input_tokens.inc(usage["prompt_tokens"])
    metrics.output_tokens.inc(usage["completion_tokens"])
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    if cached:
        metrics.cached_tokens.inc(cached)
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
    usage = _account(prep, runs, metrics)
    if prep.include_usage:
        tail += enc.usage(usage)
    await emit(tail + DONE)


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
        if prep.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = lp
        choice["finish_reason"] = run.finish_reason or "stop"
        choices.append(choice)
    return {
        "id": prep.response_id,
        "object": "chat.completion" if prep.chat else "text_completion",
        "created": prep.created,
        "model": prep.model,
        "choices": choices,
        "usage": _account(prep, runs, metrics),
    }


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
