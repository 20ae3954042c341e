"""The OpenAI-compatible HTTP frontend, a plain ASGI app built on starlette.

Request flow (chat and text completions)::

    auth -> admission (429) -> bounded body (413) -> decode + validate (400)
      -> model pool (404) -> template + tokenize + context check (400)
      -> route to a worker -> engine stream -> detokenize + stop strings
      -> SSE chunks or one JSON body

A disconnect watcher runs beside each generation request, so a client that
goes away cancels its request all the way into the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dynamo_gateway.errors import (
    ClientError,
    EngineError,
    GatewayError,
    MethodNotAllowedError,
    NotFoundError,
    UnavailableError,
)
from dynamo_gateway.frontend import lifecycle
from dynamo_gateway.frontend.admin import Drain, admin_routes
from dynamo_gateway.frontend.encoding import error_body
from dynamo_gateway.frontend.generation import complete_response, stream_response
from dynamo_gateway.frontend.http import (
    DisconnectWatcher,
    JSONBytes,
    SSEResponse,
    error_response,
    read_body,
)
from dynamo_gateway.frontend.metrics import DynamoNames, FrontendMetrics, counter, gauge
from dynamo_gateway.frontend.openapi import openapi_json
from dynamo_gateway.frontend.preparation import (
    OutputParsers,
    Prepared,
    prepare_chat,
    prepare_completion,
)
from dynamo_gateway.frontend.responses import ResponseBuilder
from dynamo_gateway.frontend.status import RecentErrors, status_routes
from dynamo_gateway.frontend.tenants import UNAUTHENTICATED, Gate, Ticket
from dynamo_gateway.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    decode_body,
    decode_request,
)
from dynamo_gateway.protocol.responses import ResponsesRequest, to_chat
from dynamo_gateway.runtime.pool import ModelManager, ModelPool
from dynamo_gateway.settings import Settings

if TYPE_CHECKING:
    from dynamo_gateway.runtime.local import LocalFleet

Endpoint = Literal["chat", "completions", "responses"]

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's convention for "client closed the request"


class _RouterMetrics:
    """Metric families from routers that keep stats (the `kv` router's `stats()`)."""

    def __init__(self) -> None:
        labels = ["model"]
        self.blocks = counter("router_prompt_blocks", "Full prompt blocks routed", labels)
        self.matched = counter(
            "router_matched_blocks",
            "Routed prompt blocks already cached on the chosen worker",
            labels,
        )
        self.hit_rate = gauge("router_prefix_hit_rate", "matched / routed prompt blocks", labels)
        self.decisions = counter("router_decisions", "Routing decisions", labels)
        self.seconds = counter(
            "router_decision_seconds", "Time spent deciding, by phase", ["model", "phase"]
        )
        self.latency = gauge(
            "router_decision_latency_seconds",
            "Decision latency over recent requests, by quantile",
            ["model", "quantile"],
        )
        self.indexer_blocks = gauge("router_indexer_blocks", "Blocks in the KV index", labels)
        self.indexer_bytes = gauge("router_indexer_bytes", "Approximate KV index memory", labels)

    def add(self, model: str, router: object) -> None:
        stats_of = getattr(router, "stats", None)
        if stats_of is None:
            return
        st = stats_of()
        self.blocks.add_metric([model], st.request_blocks)
        self.matched.add_metric([model], st.matched_blocks)
        self.hit_rate.add_metric([model], st.hit_rate)
        self.decisions.add_metric([model], st.decisions)
        for phase in ("hashing", "matching", "selection"):
            self.seconds.add_metric([model, phase], getattr(st, f"{phase}_s"))
        self.latency.add_metric([model, "0.5"], st.decision_p50_s)
        self.latency.add_metric([model, "0.99"], st.decision_p99_s)
        self.indexer_blocks.add_metric([model], st.indexer_blocks)
        self.indexer_bytes.add_metric([model], st.indexer_bytes)

    def families(self) -> list[Metric]:
        return [
            self.blocks,
            self.matched,
            self.hit_rate,
            self.decisions,
            self.seconds,
            self.latency,
            self.indexer_blocks,
            self.indexer_bytes,
        ]


def _model_info(pools: dict[str, ModelPool]) -> list[Metric]:
    """Dynamo's per-model configuration gauges (``dynamo_frontend_model_*``)."""
    context = gauge("model_context_length", "Context window of the model, in tokens", ["model"])
    block = gauge("model_kv_cache_block_size", "KV block size of the model's workers", ["model"])
    migration = gauge(
        "model_migration_limit", "Times a request may move to another worker", ["model"]
    )
    for name, pool in pools.items():
        context.add_metric([name], pool.card.max_model_len)
        sizes = [
            w.view.block_size for w in [*pool.workers.values(), *pool.prefill_workers.values()]
        ]
        if sizes:
            block.add_metric([name], max(sizes))
        migration.add_metric([name], pool.migration_limit)
    return [context, block, migration]


class Gateway:
    """State shared by the endpoints of one frontend."""

    def __init__(self, settings: Settings, manager: ModelManager) -> None:
        self.settings = settings
        self.manager = manager
        fe = settings.frontend
        self.gate = Gate(fe)  # API keys -> tenants, their limits, fair admission
        self.admission = self.gate.queue  # `.inflight`: requests holding a slot
        self.drain = Drain()  # POST /admin/drain
        self.metrics = FrontendMetrics()
        self.metrics.add_collector(self._worker_metrics)
        self.metrics.add_collector(self.gate.metrics)
        # Dynamo's frontend metric names beside ours (dashboards made for Dynamo).
        self._dynamo_names: CollectorRegistry | None = None
        if fe.dynamo_metric_names:
            self._dynamo_names = CollectorRegistry(auto_describe=False)
            self._dynamo_names.register(DynamoNames(self.metrics.registry))
        self.started = int(time.time())
        self.recent_errors = RecentErrors()  # for /status
        self.fleet: LocalFleet | None = None  # the embedded gateway's in-process workers
        self.parsers = OutputParsers(
            manager.registry, fe.tool_call_parser, fe.reasoning_parser
        )  # fmt: skip
        if fe.tool_call_parser is not None:
            manager.registry.tool_parsers.get(fe.tool_call_parser)  # unknown: fail at start
        if fe.reasoning_parser is not None:
            manager.registry.reasoning_parsers.get(fe.reasoning_parser)

    def _worker_metrics(self) -> Iterable[Metric]:
        workers = gauge("workers", "Live workers, by model and role", ["model", "role"])
        active = gauge(
            "worker_active_requests", "Requests running on a worker", ["model", "worker"]
        )
        waiting = gauge(
            "worker_waiting_requests", "Requests queued on a worker", ["model", "worker"]
        )
        used = gauge("worker_kv_blocks_used", "KV blocks in use on a worker", ["model", "worker"])
        total = gauge("worker_kv_blocks_total", "KV capacity of a worker", ["model", "worker"])
        migrations = counter(
            "migrations", "Requests resumed on another worker after theirs was lost", ["model"]
        )
        kv_events = counter("kv_events", "KV events delivered to the router", ["model"])
        kv_resyncs = counter(
            "kv_resyncs", "KV snapshots applied after an event gap or a new worker", ["model"]
        )
        remote = counter(
            "remote_prefill", "Requests prefilled on a prefill worker, KV moved", ["model"]
        )
        local = counter(
            "local_prefill",
            "Requests of a disaggregated model prefilled on their decode worker, by reason",
            ["model", "reason"],
        )
        router_metrics = _RouterMetrics()
        for name, pool in self.manager.pools.items():
            router_metrics.add(name, pool.router)
            migrations.add_metric([name], pool.migrations)
            if pool.remote_prefills or pool.local_prefills or pool.prefill_workers:
                remote.add_metric([name], pool.remote_prefills)
                for reason, n in pool.local_prefills.items():
                    local.add_metric([name, reason], n)
            if pool.kv_sync is not None:
                kv_events.add_metric([name], pool.kv_sync.events_delivered)
                kv_resyncs.add_metric([name], pool.kv_sync.snapshots_applied)
            roles: dict[str, int] = {}
            for wid, w in [*pool.workers.items(), *pool.prefill_workers.items()]:
                roles[w.record.role.value] = roles.get(w.record.role.value, 0) + 1
                w.refresh_load()
                load = w.view.load
                active.add_metric([name, wid], load.active_requests)
                waiting.add_metric([name, wid], load.waiting_requests)
                used.add_metric([name, wid], load.kv_blocks_used)
                total.add_metric([name, wid], load.kv_blocks_total)
            for role, count in roles.items():
                workers.add_metric([name, role], count)
        return [
            workers,
            active,
            waiting,
            used,
            total,
            migrations,
            remote,
            local,
            kv_events,
            kv_resyncs,
            *router_metrics.families(),
            *_model_info(self.manager.pools),
        ]

    # -- generation endpoints --------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    async def responses(self, request: Request) -> Response:
        return await self._generate(request, "responses")

    async def _generate(self, request: Request, endpoint: Endpoint) -> Response:
        model = "-"
        tenant = UNAUTHENTICATED
        ticket: Ticket | None = None
        watcher: DisconnectWatcher | None = None
        handed_off = False
        try:
            tenant = self.gate.authenticate(request.headers.get("authorization", ""))
            if self.drain.everything:
                raise self._draining()
            self.gate.check_rates(tenant)  # 429 rate_limit_exceeded
            ticket = await self.gate.enter(tenant)  # may wait its turn; 429 too_many_requests
            lifecycle.phase("preprocess")  # body, decode, template, tokens (tracing on)
            fe = self.settings.frontend
            body = await read_body(request, fe.max_body_bytes, fe.body_timeout_s)
            session = request.headers.get("x-session-id")
            responses_req: ResponsesRequest | None = None
            if endpoint == "completions":
                text_req = decode_request(body, CompletionRequest)
                model = text_req.model
                pool = self.manager.get(model)
                prep: Prepared = await prepare_completion(pool, text_req, session)
            else:
                if endpoint == "responses":
                    responses_req = decode_body(body, ResponsesRequest)
                    chat_req = to_chat(responses_req)
                else:
                    chat_req = decode_request(body, ChatCompletionRequest)
                model = chat_req.model
                pool = self.manager.get(model)
                prep = await prepare_chat(pool, chat_req, session, self.parsers)
            lifecycle.phase_done()
            if self.drain.blocks(model):
                raise self._draining(model)
            if not pool.workers:
                raise UnavailableError(f"no live worker serves model {model!r}", retry_after=1)
            self.gate.charge(tenant, prompt=prep.prompt_tokens)
            prep.stream_interval = self.settings.frontend.stream_interval
            watcher = DisconnectWatcher(request.receive)
            watcher.start()
            mm = self.gate.metered(self.metrics.model(model, tenant), tenant)
            mm.inflight.inc()
            lifecycle.admitted(mm, text_req.nvext if endpoint == "completions" else chat_req.nvext)
            builder = (
                ResponseBuilder(responses_req, prep, mm) if responses_req is not None else None
            )
            if prep.stream:
                prepared = prep

                async def produce(emit: Callable[[bytes], Awaitable[None]]) -> None:
                    try:
                        if builder is not None:
                            await builder.stream(emit)
                        else:
                            await stream_response(prepared, mm, emit)
                    except ClientError as exc:  # SSEResponse sends it; counted in on_close
                        self.recent_errors.add(model, endpoint, exc.status, exc.type, exc.message)
                        raise

                admitted = ticket

                def on_close(disconnected: bool, status: int) -> None:
                    mm.inflight.dec()
                    admitted.release()
                    status = CLIENT_CLOSED if disconnected else status
                    self.metrics.requests.labels(model, endpoint, str(status), tenant).inc()

                handed_off = True
                return SSEResponse(produce, watcher, on_close)
            try:
                if builder is not None:
                    result = await builder.complete()
                else:
                    result = await complete_response(prep, mm)
            finally:
                mm.inflight.dec()
            self.metrics.requests.labels(model, endpoint, "200", tenant).inc()
            return JSONBytes(msgspec.json.encode(result))
        except asyncio.CancelledError:
            if watcher is None or not watcher.absorb():
                raise
            self.metrics.requests.labels(model, endpoint, str(CLIENT_CLOSED), tenant).inc()
            return Response(status_code=CLIENT_CLOSED)
        except ClientError as exc:
            self._count_error(model, endpoint, exc.status, exc.type, exc.message, tenant)
            return error_response(exc)
        except EngineError as exc:
            self._count_error(model, endpoint, exc.status, exc.type, str(exc), tenant)
            log.error("engine error: %s", exc)
            return JSONBytes(
                msgspec.json.encode(error_body(str(exc), exc.type, code=exc.code)), status_code=500
            )
        finally:
            if not handed_off:
                if ticket is not None:
                    ticket.release()
                if watcher is not None:
                    watcher.stop()

    def _count_error(
        self,
        model: str,
        endpoint: str,
        status: int,
        type_: str,
        message: str,
        tenant: str = UNAUTHENTICATED,
    ) -> None:
        self.metrics.requests.labels(model, endpoint, str(status), tenant).inc()
        self.metrics.errors.labels(type_).inc()
        self.recent_errors.add(model, endpoint, status, type_, message)

    async def drain_for_shutdown(self, poll_s: float = 0.05) -> None:
        """Admit nothing more (503 ``draining`` with Retry-After; ``/ready`` 503) and
        return once no request holds or waits for a slot: the last streams are done."""
        self.drain.everything = True
        while self.admission.inflight > 0 or self.admission.queued > 0:
            await asyncio.sleep(poll_s)

    def _draining(self, model: str | None = None) -> UnavailableError:
        what = f"model {model!r}" if model is not None else "the gateway"
        return UnavailableError(
            f"{what} is draining and admits no new requests",
            code="draining",
            retry_after=self.settings.frontend.retry_after_s,
        )

    # -- other endpoints ------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        self.gate.authenticate(request.headers.get("authorization", ""))
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.started,
                "owned_by": "dynamo-gateway",
                "max_model_len": pool.card.max_model_len,
            }
            for name, pool in sorted(self.manager.pools.items())
        ]
        return JSONBytes(msgspec.json.encode({"object": "list", "data": data}))

    async def live(self, request: Request) -> Response:
        return JSONBytes(b'{"status":"live"}')

    async def ready(self, request: Request) -> Response:
        models = {name: pool.live_workers() for name, pool in self.manager.pools.items()}
        # A model is servable once it has a worker that decodes (prefill-only ones can't).
        ready = bool(models) and all(p.workers for p in self.manager.pools.values())
        body: dict[str, Any] = {"status": "ready" if ready else "not ready", "models": models}
        if self.drain.active:
            # Draining the frontend (or every model) takes it out of a load balancer;
            # one drained model among others only shows here.
            body["draining"] = ["*"] if self.drain.everything else sorted(self.drain.models)
            if self.drain.everything or set(models) <= self.drain.models:
                ready = False
                body["status"] = "draining"
        return JSONBytes(msgspec.json.encode(body), status_code=200 if ready else 503)

    async def health(self, request: Request) -> Response:
        report: dict[str, Any] = {}
        healthy = bool(self.manager.pools)
        for name, pool in self.manager.pools.items():
            workers: dict[str, str] = {}
            for wid, worker in [*pool.workers.items(), *pool.prefill_workers.items()]:
                try:
                    await worker.check_health()
                    workers[wid] = "healthy"
                except GatewayError as exc:
                    workers[wid] = f"unhealthy: {exc}"
                    healthy = False
            report[name] = workers
        body = {"status": "healthy" if healthy else "unhealthy", "models": report}
        return JSONBytes(msgspec.json.encode(body), status_code=200 if healthy else 503)

    async def prometheus(self, request: Request) -> Response:
        body = generate_latest(self.metrics.registry)
        if self._dynamo_names is not None:
            body += generate_latest(self._dynamo_names)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


class GatewayApp:
    """The ASGI app: generation requests go straight to their handlers, the rest
    through starlette.

    Starlette's middleware wraps `send` twice for every streamed chunk; the two
    generation endpoints handle their own errors, so they skip that stack.
    """

    def __init__(self, gateway: Gateway, fallback: ASGIApp) -> None:
        self.gateway = gateway
        self.fallback = fallback
        self._fast: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/v1/chat/completions": gateway.chat_completions,
            "/v1/completions": gateway.completions,
            "/v1/responses": gateway.responses,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self._fast.get(scope["path"])
            if handler is not None:
                # Request id (in every response and log line), trace, timing: `lifecycle`.
                with lifecycle.RequestLifecycle.begin(scope) as life:
                    try:
                        response = await handler(Request(scope, receive))
                    except Exception as exc:  # a bug, not bad input: still an OpenAI body
                        response = _internal_error(self.gateway, scope["path"], exc)
                    await response(scope, receive, life.send(send))
                return
        await self.fallback(scope, receive, send)


def _internal_error(gateway: Gateway, path: str, exc: Exception) -> Response:
    log.exception("unhandled error on %s", path, exc_info=exc)
    gateway.metrics.errors.labels("server_error").inc()
    # The exception's text may hold anything: /status shows only its class.
    gateway.recent_errors.add("-", path, 500, "server_error", type(exc).__name__)
    body = error_body("internal server error", "server_error", code="internal_error")
    return JSONBytes(msgspec.json.encode(body), status_code=500)


def build_app(gateway: Gateway) -> GatewayApp:
    # Built once, at start: a document that cannot be built fails `serve`, not a request.
    document = openapi_json()

    async def openapi(request: Request) -> Response:
        return JSONBytes(document)

    routes = [
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/responses", gateway.responses, methods=["POST"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/live", gateway.live, methods=["GET"]),
        Route("/ready", gateway.ready, methods=["GET"]),
        Route("/metrics", gateway.prometheus, methods=["GET"]),
        *status_routes(gateway),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    fe = gateway.settings.frontend
    if fe.admin_port is None and fe.admin_key is not None:  # else its own port, or none
        routes += admin_routes(gateway, fe.admin_key.get_secret_value())

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            response = error_response(MethodNotAllowedError(f"method {request.method} not allowed"))
            response.headers.update(exc.headers or {})  # RFC 9110: a 405 names its Allow
            return response
        if exc.status_code == 404:
            return error_response(NotFoundError(f"no route for {request.url.path}"))
        return error_response(ClientError(str(exc.detail)))

    async def on_client_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ClientError)
        return error_response(exc)

    async def on_error(request: Request, exc: Exception) -> Response:
        return _internal_error(gateway, request.url.path, exc)

    starlette = Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: on_http_exception,
            ClientError: on_client_error,
            Exception: on_error,
        },
    )
    return GatewayApp(gateway, starlette)
