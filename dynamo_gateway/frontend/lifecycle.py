"""One generation request from arrival to its last byte: its id, timing and trace.

`GatewayApp` opens a `RequestLifecycle` for each generation request and makes it
current for the request's task (`CURRENT`, a context variable: tasks the request
starts inherit it); the code that runs the request finds it there
(`generation.ChoiceRun`), so nothing in between has to carry it. It owns:

- the request id: the client's ``X-Request-Id`` if it is valid, else a new one;
  sent back on every response (errors included) and stamped on every log line
  (`telemetry.logs`); the engine requests carry it to the workers;
- the trace (`telemetry.tracing`): the server span, ``preprocess``,
  ``time_to_first_token``, and per choice ``stream`` with its ``route``;
- the queued-requests gauge and the request-duration histogram;
- the response metadata of Dynamo's ``nvext.extra_fields`` (``worker_id``,
  ``timing``).

Times for metrics and ``timing`` come from `clock.now()` (a replay's virtual
clock); span times are wall-clock nanoseconds, as OpenTelemetry wants.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.types import Message, Scope, Send

from dynamo_gateway import clock
from dynamo_gateway.protocol.engine import RequestContext
from dynamo_gateway.telemetry import tracing
from dynamo_gateway.telemetry.logs import REQUEST_ID, TRACE_ID, request_id_or_new

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from dynamo_gateway.disagg.flow import DisaggRouted
    from dynamo_gateway.frontend.metrics import ModelMetrics
    from dynamo_gateway.frontend.preparation import Choice
    from dynamo_gateway.protocol.openai import NvExt
    from dynamo_gateway.runtime.pool import ModelPool, Routed

__all__ = ["CURRENT", "RequestLifecycle", "admitted", "phase", "phase_done", "stream_ended"]

log = logging.getLogger(__name__)

CURRENT: ContextVar[RequestLifecycle | None] = ContextVar(
    "dynamo_gateway_request_lifecycle", default=None
)

REQUEST_ID_HEADER = b"x-request-id"


class RequestLifecycle:
    """See the module docstring. Use as ``with life:`` around handling the request."""

    __slots__ = (
        "_phase",
        "_tokens",
        "dispatched",
        "extra_fields",
        "finished",
        "first_token_at",
        "metrics",
        "queued",
        "received",
        "received_ms",
        "received_ns",
        "request_id",
        "route_s",
        "routed",
        "span",
        "status",
    )

    def __init__(self, request_id: str, span: Span | None = None) -> None:
        self.request_id = request_id
        self.received = clock.now()
        self.received_ns = time.time_ns()
        self.received_ms = self.received_ns // 1_000_000
        self.span = span
        self.extra_fields: frozenset[str] = frozenset()
        self.metrics: ModelMetrics | None = None  # once the model is known
        self.queued = False
        self.first_token_at: float | None = None
        self.dispatched: float | None = None  # the first choice handed to a worker
        self.route_s: float | None = None
        self.routed: Routed | DisaggRouted | None = None  # the first choice's
        self.status = 0  # the HTTP status sent (0: none yet)
        self.finished = False
        self._phase: Span | None = None
        self._tokens: tuple[Token[Any], ...] = ()

    @classmethod
    def begin(cls, scope: Scope) -> RequestLifecycle:
        """The lifecycle of the request `scope` describes: its id and, when tracing is
        on, a server span continuing the client's ``traceparent``."""
        given = traceparent = tracestate = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                given = value
            elif name == b"traceparent":
                traceparent = value
            elif name == b"tracestate":
                tracestate = value
        life = cls(request_id_or_new(given))
        if tracing.active():
            life.span = tracing.server_span(
                f"{scope['method']} {scope['path']}",
                traceparent.decode("latin-1") if traceparent else None,
                tracestate.decode("latin-1") if tracestate else None,
                {
                    "http.request.method": scope["method"],
                    "url.path": scope["path"],
                    "dynamo.request_id": life.request_id,
                },
                start_time=life.received_ns,
            )
        return life

    # -- the request's task ---------------------------------------------------------------

    def __enter__(self) -> RequestLifecycle:
        self._tokens = (
            CURRENT.set(self),
            REQUEST_ID.set(self.request_id),
            TRACE_ID.set(tracing.trace_id(self.span)),
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.finish(exc)
        finally:
            current, rid, tid = self._tokens
            CURRENT.reset(current)
            REQUEST_ID.reset(rid)
            TRACE_ID.reset(tid)

    def send(self, send: Send) -> Send:
        """`send`, adding ``X-Request-Id`` to the response's start message."""
        return _HeaderSend(send, self)

    # -- steps --------------------------------------------------------------------------------

    def admit(self, metrics: ModelMetrics, nvext: NvExt | None) -> None:
        """The model is known and the request runs: it waits for a first token."""
        self.metrics = metrics
        if nvext is not None and nvext.extra_fields:
            self.extra_fields = frozenset(nvext.extra_fields)
        if not self.queued and self.first_token_at is None:
            metrics.queued.inc()
            self.queued = True

    def route(self, pool: ModelPool, choice: Choice) -> tuple[Routed | DisaggRouted, Span | None]:
        """Route `choice` (`ModelPool.route`) with the request's id and trace context in
        its engine request; its ``stream`` span (the caller ends it) or None."""
        stream = tracing.child(self.span, "stream", {"dynamo.choice": choice.index})
        traceparent, tracestate = tracing.carrier(stream)
        request = msgspec.structs.replace(
            choice.engine_request,
            context=RequestContext(
                request_id=self.request_id, traceparent=traceparent, tracestate=tracestate
            ),
        )
        decision = tracing.child(stream, "route")
        started = clock.now()
        try:
            routed = pool.route(choice.route, request)
        except BaseException as exc:
            tracing.fail(decision, exc)
            tracing.fail(stream, exc)
            for s in (decision, stream):
                if s is not None:
                    s.end()
            raise
        now = clock.now()
        worker = routed.worker.record.worker_id
        prefill = _prefill_worker(routed)
        if decision is not None:
            decision.set_attribute("dynamo.worker_id", worker)
            if prefill is not None:
                decision.set_attribute("dynamo.prefill_worker_id", prefill)
            decision.end()
        if self.routed is None:
            self.routed = routed
            self.route_s = now - started
            self.dispatched = now
        log.debug(
            "choice %d of model %s routed to %s%s",
            choice.index,
            pool.name,
            worker,
            f" (prefill on {prefill})" if prefill is not None else "",
        )
        return routed, stream

    def first_token(self) -> None:
        """A choice produced its first output (only the request's first one counts)."""
        if self.first_token_at is not None:
            return
        self.first_token_at = clock.now()
        if self.queued and self.metrics is not None:
            self.metrics.queued.dec()
            self.queued = False
        ttft = tracing.child(self.span, "time_to_first_token", start_time=self.received_ns)
        if ttft is not None:
            ttft.end()

    def nvext(self) -> dict[str, Any] | None:
        """The response's ``nvext`` for the ``extra_fields`` asked for (None: none)."""
        if not self.extra_fields:
            return None
        out: dict[str, Any] = {}
        routed = self.routed
        if "worker_id" in self.extra_fields and routed is not None:
            decode = routed.worker.record.worker_id
            out["worker_id"] = {
                "prefill_worker_id": _prefill_worker(routed) or decode,
                "decode_worker_id": decode,
            }
        if "timing" in self.extra_fields:
            now = clock.now()
            timing: dict[str, Any] = {"request_received_ms": self.received_ms}
            if self.dispatched is not None:
                timing["queue_ms"] = _ms(self.dispatched - self.received)
            if self.route_s is not None:
                timing["routing_ms"] = _ms(self.route_s)
            if self.first_token_at is not None:
                timing["ttft_ms"] = _ms(self.first_token_at - self.received)
            timing["total_time_ms"] = _ms(now - self.received)
            out["timing"] = timing
        return out

    def finish(self, exc: BaseException | None = None) -> None:
        """The response is sent (or abandoned): gauges, duration, the server span."""
        if self.finished:
            return
        self.finished = True
        if self.queued and self.metrics is not None:
            self.metrics.queued.dec()
            self.queued = False
        if self.metrics is not None:
            self.metrics.duration.observe(clock.now() - self.received)
        if self._phase is not None:  # preprocessing ended in an error response
            self._phase.set_attribute("dynamo.failed", True)
            self._phase.end()
            self._phase = None
        s = self.span
        if s is None:
            return
        if self.status:
            s.set_attribute("http.response.status_code", self.status)
        if exc is not None:
            tracing.fail(s, exc)
        elif self.status >= 500:
            from opentelemetry.trace import Status, StatusCode

            s.set_status(Status(StatusCode.ERROR, f"HTTP {self.status}"))
        s.end()


class _HeaderSend:
    """An ASGI `send` that adds ``X-Request-Id`` to the start message and notes the
    status; every other message passes straight through (one dict lookup)."""

    __slots__ = ("_header", "_life", "_send")

    def __init__(self, send: Send, life: RequestLifecycle) -> None:
        self._send = send
        self._life = life
        self._header = (REQUEST_ID_HEADER, life.request_id.encode("ascii"))

    def __call__(self, message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            self._life.status = message["status"]
            message["headers"] = [*message.get("headers", ()), self._header]
        return self._send(message)


def _prefill_worker(routed: Routed | DisaggRouted) -> str | None:
    prefill = getattr(routed, "prefill", None)
    return prefill.record.worker_id if prefill is not None else None


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


# -- for the endpoint code: no-ops outside a request -------------------------------------------


def admitted(metrics: ModelMetrics, nvext: NvExt | None) -> None:
    """The current request's model is known and it runs (see `RequestLifecycle.admit`)."""
    life = CURRENT.get()
    if life is not None:
        life.admit(metrics, nvext)


def phase(name: str) -> None:
    """Open the current request's `name` span (one phase at a time; tracing on)."""
    life = CURRENT.get()
    if life is not None and life.span is not None:
        life._phase = tracing.child(life.span, name)


def phase_done() -> None:
    """Close the phase `phase()` opened (an error response leaves it to `finish`)."""
    life = CURRENT.get()
    if life is not None and life._phase is not None:
        life._phase.end()
        life._phase = None


def stream_ended(
    s: Span | None, tokens: int, finish_reason: str | None, error: BaseException | None
) -> None:
    """End a choice's ``stream`` span with what came of it."""
    if s is None:
        return
    s.set_attribute("gen_ai.usage.output_tokens", tokens)
    if finish_reason is not None:
        s.set_attribute("gen_ai.response.finish_reason", finish_reason)
    if error is not None:
        tracing.fail(s, error)
    s.end()
