"""OpenTelemetry spans of a request, across the frontend and its workers.

Off unless `configure()` is given an exporter (``--otlp-endpoint``,
``--trace-file``, or an exporter object in tests). Off, `active()` is False,
nothing is imported from OpenTelemetry, and every helper returns at its first
line: a request pays a few `None` checks and no per-token work.

The spans of one request (docs/operations.md#tracing)::

    frontend  POST /v1/chat/completions      SERVER, continues the client's traceparent
                preprocess                   decode, template, tokenize
                time_to_first_token          arrival -> first token
                stream                       one per choice: route -> last token
                  route                      the router's decision (dynamo.worker_id)
                  worker_call | prefill_leg | decode_leg     CLIENT, one per worker call
    worker          engine.generate          SERVER, child of the call above
                      kv_transfer            decode leg: the KV pull from the prefill worker

Propagation is W3C trace context: each worker call carries its span's
``traceparent`` in `EngineRequest.context`, across the TCP request plane.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from dynamo_gateway.disagg.params import is_remote_prefill, wants_remote_decode
from dynamo_gateway.errors import ConfigError
from dynamo_gateway.protocol.engine import EngineOutput, EngineRequest

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from dynamo_gateway.disagg.params import PrefillDone
    from dynamo_gateway.settings import TracingSettings

__all__ = [
    "active",
    "carrier",
    "child",
    "configure",
    "engine_call",
    "fail",
    "instrument_kv_transfers",
    "server_span",
    "shutdown",
    "span",
    "trace_id",
    "worker_call",
]

Start = Callable[[EngineRequest], AsyncIterator[EngineOutput]]

_LEG_SPANS = {"prefill": "prefill_leg", "decode": "decode_leg", "aggregated": "worker_call"}
_NULL: AbstractContextManager[None] = nullcontext()


@dataclass
class _Tracing:
    tracer: Tracer
    provider: TracerProvider
    propagator: TraceContextTextMapPropagator
    # Decode legs waiting for their KV, by transfer id: the span their pull goes under.
    transfers: dict[str, Span] = field(default_factory=dict)


_on: _Tracing | None = None


def active() -> bool:
    return _on is not None


def configure(
    settings: TracingSettings, service: str, *, exporter: SpanExporter | None = None
) -> bool:
    """Turn tracing on for this process if `settings` name an exporter or `exporter` is
    given (tests: an in-memory one); True if on. Raises `ConfigError` without
    OpenTelemetry installed (the ``tracing`` extra)."""
    global _on
    if exporter is None and not settings.enabled:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        raise ConfigError(
            "tracing needs OpenTelemetry: pip install 'dynamo-gateway[tracing]'"
        ) from None
    shutdown()
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name or service}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    if settings.otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError(
                "--otlp-endpoint needs the OTLP exporter: pip install 'dynamo-gateway[tracing]'"
            ) from None
        # Batched, off the event loop: a slow collector never stalls a request.
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=_traces_url(settings.otlp_endpoint)))
        )
    if settings.span_file is not None:
        from dynamo_gateway.telemetry.spanfile import JsonLinesSpanExporter

        # Written as each span ends, so a test (or a tail -f) sees it at once.
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(settings.span_file)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _on = _Tracing(provider.get_tracer("dynamo_gateway"), provider, TraceContextTextMapPropagator())
    return True


def _traces_url(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def shutdown() -> None:
    """Export what is pending and turn tracing off (idempotent)."""
    global _on
    on, _on = _on, None
    if on is not None:
        on.provider.shutdown()


# -- spans ----------------------------------------------------------------------------------


def server_span(
    name: str,
    traceparent: str | None,
    tracestate: str | None,
    attributes: dict[str, Any],
    *,
    start_time: int | None = None,
) -> Span | None:
    """A SERVER span continuing the caller's W3C trace context (a new trace without)."""
    on = _on
    if on is None:
        return None
    from opentelemetry.trace import SpanKind

    parent = None
    if traceparent:
        headers = {"traceparent": traceparent}
        if tracestate:
            headers["tracestate"] = tracestate
        parent = on.propagator.extract(headers)
    return on.tracer.start_span(
        name, context=parent, kind=SpanKind.SERVER, attributes=attributes, start_time=start_time
    )


def child(
    parent: Span | None,
    name: str,
    attributes: dict[str, Any] | None = None,
    *,
    start_time: int | None = None,
) -> Span | None:
    """A span under `parent`; None when `parent` is (tracing off, or not traced)."""
    on = _on
    if parent is None or on is None:
        return None
    from opentelemetry.trace import set_span_in_context

    return on.tracer.start_span(
        name, context=set_span_in_context(parent), attributes=attributes, start_time=start_time
    )


def span(
    parent: Span | None, name: str, attributes: dict[str, Any] | None = None
) -> AbstractContextManager[Span | None]:
    """`child()` as a `with` block that ends it (and marks an exception); a shared no-op
    when `parent` is None."""
    if parent is None or _on is None:
        return _NULL
    return _span(parent, name, attributes)


@contextmanager
def _span(parent: Span, name: str, attributes: dict[str, Any] | None) -> Iterator[Span | None]:
    s = child(parent, name, attributes)
    assert s is not None
    try:
        yield s
    except BaseException as exc:
        fail(s, exc)
        raise
    finally:
        s.end()


def fail(s: Span | None, exc: BaseException) -> None:
    """Mark `s` failed by `exc` (a cancellation is recorded as such, not as an error)."""
    if s is None:
        return
    import asyncio

    from opentelemetry.trace import Status, StatusCode

    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        s.set_attribute("dynamo.cancelled", True)
        return
    s.record_exception(exc)
    s.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def carrier(s: Span | None) -> tuple[str, str]:
    """``(traceparent, tracestate)`` of `s`; empty strings when there is none."""
    on = _on
    if s is None or on is None:
        return "", ""
    from opentelemetry.trace import set_span_in_context

    headers: dict[str, str] = {}
    on.propagator.inject(headers, context=set_span_in_context(s))
    return headers.get("traceparent", ""), headers.get("tracestate", "")


def trace_id(s: Span | None) -> str | None:
    """The 32-hex-digit trace id of `s` (None without a valid one)."""
    if s is None:
        return None
    ctx = s.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.trace_id else None


# -- calls to a worker, on both sides of the request plane ------------------------------------


def _leg(request: EngineRequest) -> str:
    params = request.kv_transfer_params
    if wants_remote_decode(params):
        return "prefill"
    if is_remote_prefill(params):
        return "decode"
    return "aggregated"


def worker_call(
    worker_id: str, request: EngineRequest, start: Start
) -> AsyncIterator[EngineOutput]:
    """Frontend side: `start(request)` in a CLIENT span named by the leg, whose trace
    context replaces the caller's in the request the worker gets. Just
    `start(request)` when tracing is off or the request comes from no traced caller."""
    if _on is None or request.context is None:
        return start(request)
    return _traced(worker_id, request, start, server=False)


def engine_call(
    worker_id: str, request: EngineRequest, start: Start
) -> AsyncIterator[EngineOutput]:
    """Worker side: the engine's stream in a SERVER span, a child of the frontend's call."""
    if _on is None:
        return start(request)
    return _traced(worker_id, request, start, server=True)


def _traced(
    worker_id: str, request: EngineRequest, start: Start, *, server: bool
) -> AsyncIterator[EngineOutput]:
    from opentelemetry.trace import SpanKind, set_span_in_context

    on = _on
    assert on is not None
    ctx = request.context
    parent = None
    if ctx is not None and ctx.traceparent:
        parent = on.propagator.extract(
            {"traceparent": ctx.traceparent, "tracestate": ctx.tracestate}
        )
    leg = _leg(request)
    s = on.tracer.start_span(
        "engine.generate" if server else _LEG_SPANS[leg],
        context=parent,
        kind=SpanKind.SERVER if server else SpanKind.CLIENT,
        attributes={
            "dynamo.worker_id": worker_id,
            "dynamo.leg": leg,
            "dynamo.engine_request_id": request.request_id,
            "dynamo.request_id": ctx.request_id if ctx is not None else "",
            "gen_ai.usage.input_tokens": len(request.prompt_token_ids)
            + len(request.resumed_token_ids),
            "gen_ai.request.max_tokens": request.sampling.max_tokens,
        },
    )
    if ctx is not None and not server:
        headers: dict[str, str] = {}
        on.propagator.inject(headers, context=set_span_in_context(s))
        request = msgspec.structs.replace(
            request,
            context=msgspec.structs.replace(
                ctx,
                traceparent=headers.get("traceparent", ""),
                tracestate=headers.get("tracestate", ""),
            ),
        )
    transfer_id = None
    if leg == "decode" and request.kv_transfer_params is not None:
        transfer_id = str(request.kv_transfer_params.get("transfer_id", "")) or None
        if transfer_id is not None:
            on.transfers[transfer_id] = s
    try:
        stream = start(request)
    except BaseException as exc:
        _close(on, s, transfer_id)
        fail(s, exc)
        s.end()
        raise
    return _follow(on, s, stream, transfer_id)


def _close(on: _Tracing, s: Span, transfer_id: str | None) -> None:
    if transfer_id is not None and on.transfers.get(transfer_id) is s:
        del on.transfers[transfer_id]


async def _follow(
    on: _Tracing, s: Span, stream: AsyncIterator[EngineOutput], transfer_id: str | None
) -> AsyncIterator[EngineOutput]:
    """`stream`, recording its first output, tokens and end on `s` (then ending it)."""
    first = True
    tokens = 0
    reason = None
    try:
        async for out in stream:
            if first:
                first = False
                s.add_event("first_token")
                if out.cached_tokens is not None:
                    s.set_attribute("dynamo.cached_tokens", out.cached_tokens)
            tokens += len(out.token_ids)
            if out.finish_reason is not None:
                reason = out.finish_reason
            yield out
    except BaseException as exc:
        fail(s, exc)
        raise
    finally:
        _close(on, s, transfer_id)
        s.set_attribute("gen_ai.usage.output_tokens", tokens)
        if reason is not None:
            s.set_attribute("gen_ai.response.finish_reason", reason.value)
        aclose = getattr(stream, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        finally:
            s.end()


# -- KV transfers ------------------------------------------------------------------------------


def instrument_kv_transfers(engine: object) -> None:
    """`kv_transfer` spans for the KV pulls of `engine`'s disaggregation agent, each under
    the decode leg (engine span) whose handoff it reads.

    `KvTransferAgent` has no tracing seam of its own, so while tracing is on its
    `pull` is wrapped on this one instance; with tracing off nothing changes.
    """
    on = _on
    agent = getattr(engine, "kv_transfer_agent", None)
    if on is None or agent is None:
        return
    pull: Callable[[PrefillDone, Sequence[int], Sequence[int]], Awaitable[int]] = agent.pull

    async def traced_pull(done: PrefillDone, src_ids: Sequence[int], dst_ids: Sequence[int]) -> int:
        parent = on.transfers.get(done.transfer_id)
        s = child(
            parent,
            "kv_transfer",
            {
                "dynamo.kv.transfer_id": done.transfer_id,
                "dynamo.kv.source": done.remote_engine_id,
                "dynamo.kv.blocks": len(src_ids),
                "dynamo.kv.transport": agent.pick(done) or "",
            },
        )
        if s is None:  # an untraced request
            return await pull(done, src_ids, dst_ids)
        try:
            nbytes = await pull(done, src_ids, dst_ids)
            s.set_attribute("dynamo.kv.bytes", nbytes)
            return nbytes
        except BaseException as exc:
            fail(s, exc)
            raise
        finally:
            s.end()

    agent.pull = traced_pull
