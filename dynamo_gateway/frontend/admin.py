"""Operator endpoints under ``/admin``: status, keys reload, drain and resume.

They are served on their own port (``--admin-port``, bound to 127.0.0.1 by
default) or, without one, on the main port behind ``--admin-key``; with
neither, there are none. An admin key, when set, is required on the admin
port too. Routes::

    GET  /admin/status            tenants and their usage, models, workers, drain state
    POST /admin/reload            re-read --api-keys-file (the old table stays on error)
    POST /admin/drain[?model=M]   stop admitting requests (for M, or all); in-flight finish
    POST /admin/resume[?model=M]  admit again
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dynamo_gateway.errors import (
    AuthenticationError,
    ClientError,
    ConfigError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
)
from dynamo_gateway.frontend.http import JSONBytes, error_response

if TYPE_CHECKING:
    from dynamo_gateway.frontend.app import Gateway

__all__ = ["Drain", "admin_app", "admin_routes"]


@dataclass
class Drain:
    """What the frontend no longer admits: everything, or some models."""

    everything: bool = False
    models: set[str] = field(default_factory=set)

    def blocks(self, model: str | None = None) -> bool:
        return self.everything or (model is not None and model in self.models)

    @property
    def active(self) -> bool:
        return self.everything or bool(self.models)


class _Admin:
    def __init__(self, gateway: Gateway, key: str | None) -> None:
        self.gateway = gateway
        self._key = key.encode() if key else None

    def _check(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, self._key):
            raise AuthenticationError("Incorrect or missing admin key.", code="invalid_admin_key")

    async def status(self, request: Request) -> Response:
        self._check(request)
        return _json(self.report())

    def report(self) -> dict[str, Any]:
        gw = self.gateway
        inflight = {
            s.labels["model"]: int(s.value)
            for family in gw.metrics.inflight.collect()
            for s in family.samples
        }
        models: dict[str, Any] = {}
        workers: dict[str, list[dict[str, Any]]] = {}
        for name, pool in sorted(gw.manager.pools.items()):
            models[name] = {
                "workers": len(pool.workers),
                "prefill_workers": len(pool.prefill_workers),
                "inflight": inflight.get(name, 0),
                "draining": gw.drain.blocks(name),
            }
            rows = workers[name] = []
            for wid, w in [*pool.workers.items(), *pool.prefill_workers.items()]:
                w.refresh_load()
                rows.append(
                    {
                        "id": wid,
                        "role": w.record.role.value,
                        "active": w.view.load.active_requests,
                        "waiting": w.view.load.waiting_requests,
                    }
                )
        return {
            "draining": gw.drain.everything,
            "draining_models": sorted(gw.drain.models),
            **gw.gate.snapshot(),
            "models": models,
            "workers": workers,
        }

    async def reload(self, request: Request) -> Response:
        self._check(request)
        try:
            tenants = self.gateway.gate.reload()
        except ConfigError as exc:
            raise InvalidRequestError(f"reload failed: {exc}", code="reload_failed") from None
        return _json({"status": "reloaded", "tenants": tenants})

    async def drain(self, request: Request) -> Response:
        return self._set_drain(request, on=True)

    async def resume(self, request: Request) -> Response:
        return self._set_drain(request, on=False)

    def _set_drain(self, request: Request, *, on: bool) -> Response:
        self._check(request)
        drain = self.gateway.drain
        model = request.query_params.get("model")
        if model is None:
            drain.everything = on
            if not on:
                drain.models.clear()
        elif model not in self.gateway.manager.pools:
            raise ModelNotFoundError(f"no model {model!r} is served here", param="model")
        elif on:
            drain.models.add(model)
        else:
            drain.models.discard(model)
        report = self.report()
        return _json(
            {
                "draining": drain.everything,
                "draining_models": sorted(drain.models),
                "inflight": report["inflight"],
                "queued": report["queued"],
            }
        )


def _json(body: Any) -> Response:
    return JSONBytes(msgspec.json.encode(body))


def admin_routes(gateway: Gateway, key: str | None) -> list[Route]:
    admin = _Admin(gateway, key)
    return [
        Route("/admin/status", admin.status, methods=["GET"]),
        Route("/admin/reload", admin.reload, methods=["POST"]),
        Route("/admin/drain", admin.drain, methods=["POST"]),
        Route("/admin/resume", admin.resume, methods=["POST"]),
    ]


def admin_app(gateway: Gateway) -> Starlette:
    """The app of ``--admin-port``: the admin routes only."""
    key = gateway.settings.frontend.admin_key

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return error_response(MethodNotAllowedError(f"method {request.method} not allowed"))
        return error_response(NotFoundError(f"no route for {request.url.path}"))

    async def on_client_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ClientError)
        return error_response(exc)

    return Starlette(
        routes=admin_routes(gateway, key.get_secret_value() if key else None),
        exception_handlers={HTTPException: on_http_exception, ClientError: on_client_error},
    )
