"""Running the gateway on hypercorn or uvicorn, with a graceful shutdown on
SIGINT/SIGTERM: the embedded `serve` (frontend, router and workers in one
process) or a distributed `frontend` over workers found through discovery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from starlette.types import ASGIApp

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.frontend.app import Gateway, build_app
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.plugins import Plugins, load_plugins
from dynamo_gateway.protocol.engine import WorkerRole
from dynamo_gateway.runtime.connect import connect_discovery, connect_events
from dynamo_gateway.runtime.discovery import MemoryDiscovery
from dynamo_gateway.runtime.events import MemoryEventPlane
from dynamo_gateway.runtime.local import LocalFleet, local_worker_id
from dynamo_gateway.runtime.pool import InprocResolver, ModelManager
from dynamo_gateway.runtime.remote import RemoteResolver
from dynamo_gateway.settings import Settings

log = logging.getLogger(__name__)

# Seconds in-flight requests get to finish after a shutdown signal.
GRACEFUL_TIMEOUT_S = 10.0
STARTUP_SYNC_TIMEOUT_S = 30.0  # a starting frontend waits this long for known models


def plugins_for(settings: Settings) -> Plugins:
    return load_plugins(only=settings.plugins, trace=settings.trace_hooks)


async def serve(settings: Settings, *, ready: Callable[[str], None] | None = None) -> None:
    """Run the embedded gateway until SIGINT/SIGTERM."""
    async with embedded(settings) as gateway:
        await _run_gateway(gateway, ready)


@contextlib.asynccontextmanager
async def embedded(
    settings: Settings, plugins: Plugins | None = None, *, start_workers: bool = True
) -> AsyncIterator[Gateway]:
    """Frontend state, router and workers of every configured model, in this process.

    Yields the `Gateway` once every model has its workers; stops them on exit.
    Used by `serve` and by tests that drive the app in-process. Without
    `start_workers` the fleet (``gateway.fleet``) starts empty: something else
    (a planner) adds workers, and a model exists once its first one registers.
    """
    if not settings.models:
        raise ConfigError("--model is required: a local model directory (see `demo-model`)")
    plugins = plugins or plugins_for(settings)
    cards = [
        ModelCard.load(m.path, served_name=m.name, max_model_len=settings.max_model_len)
        for m in settings.models
    ]
    names = [card.served_name for card in cards]
    if len(set(names)) != len(names):
        raise ConfigError(f"two models share a served name: {names}; use --served-model-name")
    discovery = MemoryDiscovery()
    events = MemoryEventPlane()
    resolver = InprocResolver()
    # In-process engines live and die with the frontend: nothing to migrate to, so
    # streams skip the migration wrapper.
    manager = ModelManager(settings, plugins.registry, resolver, events, migration_limit=0)
    follow = asyncio.get_running_loop().create_task(manager.follow(discovery))
    fleet = LocalFleet(
        settings, plugins.registry, discovery, events, resolver,
        cards={card.served_name: card for card in cards},
    )  # fmt: skip
    # Disaggregated: prefill-only workers and decode workers, KV moved in-process.
    plan = [(WorkerRole.AGGREGATED, settings.workers)]
    if settings.prefill_workers:
        plan = [
            (WorkerRole.PREFILL, settings.prefill_workers),
            (WorkerRole.DECODE, settings.decode_workers or 1),
        ]
    try:
        for card in cards if start_workers else ():
            for role, count in plan:
                for i in range(count):
                    worker_id = local_worker_id(card, settings.engine, role, i)
                    await fleet.start(card, worker_id, role=role)
            await _wait_for_pool(manager, card.served_name, sum(n for _, n in plan))
        gateway = Gateway(settings, manager)
        gateway.fleet = fleet
        yield gateway
    finally:
        await fleet.stop_all()
        await discovery.aclose()
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        await manager.aclose()
        await events.aclose()


async def serve_frontend(settings: Settings, *, ready: Callable[[str], None] | None = None) -> None:
    """Run a frontend over the workers that discovery finds, until SIGINT/SIGTERM."""
    async with distributed(settings) as gateway:
        await _run_gateway(gateway, ready)


async def _run_gateway(gateway: Gateway, ready: Callable[[str], None] | None) -> None:
    await run_http(
        build_app(gateway),
        gateway.settings,
        ready=ready,
        admin=_admin_app(gateway),
        drain=gateway.drain_for_shutdown,
    )


def _admin_app(gateway: Gateway) -> ASGIApp | None:
    """The ``--admin-port`` app (without one, `build_app` mounts /admin behind the key)."""
    if gateway.settings.frontend.admin_port is None:
        return None
    from dynamo_gateway.frontend.admin import admin_app

    return admin_app(gateway)


@contextlib.asynccontextmanager
async def distributed(settings: Settings, plugins: Plugins | None = None) -> AsyncIterator[Gateway]:
    """Frontend state over remote workers: follows `runtime.discovery` and listens
    to `runtime.events`; workers come and go while it runs."""
    plugins = plugins or plugins_for(settings)
    rt = settings.runtime
    discovery = await connect_discovery(plugins.registry, rt.discovery, settings)
    try:
        events = await connect_events(plugins.registry, rt.events, settings)
    except BaseException:
        await discovery.aclose()
        raise
    resolver = RemoteResolver(
        connections=rt.connections_per_worker, request_timeout_s=rt.request_timeout_s
    )
    manager = ModelManager(settings, plugins.registry, resolver, events)
    follow = asyncio.get_running_loop().create_task(manager.follow(discovery))
    try:
        # Serve only once the models registered now are known: a frontend that
        # (re)starts under traffic would otherwise answer 404 for a model it has not
        # read from discovery yet.
        await _wait_for_models(manager, {r.model for r in await discovery.list()})
        yield Gateway(settings, manager)
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        await manager.aclose()
        await discovery.aclose()
        await events.aclose()


async def _wait_for_models(
    manager: ModelManager, models: set[str], timeout: float = STARTUP_SYNC_TIMEOUT_S
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not models <= manager.pools.keys():
        if loop.time() > deadline:
            missing = sorted(models - manager.pools.keys())
            log.warning("serving before the pools of %s were ready", ", ".join(missing))
            return
        await asyncio.sleep(0.02)


async def _wait_for_pool(
    manager: ModelManager, model: str, workers: int = 1, timeout: float = 30.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def joined() -> int:
        pool = manager.pools.get(model)
        return len(pool.workers) + len(pool.prefill_workers) if pool is not None else 0

    while joined() < workers:
        if loop.time() > deadline:
            raise ConfigError(f"workers for {model!r} did not register within {timeout} s")
        await asyncio.sleep(0.01)


async def run_http(
    app: ASGIApp,
    settings: Settings,
    *,
    ready: Callable[[str], None] | None = None,
    admin: ASGIApp | None = None,
    drain: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve `app` (and `admin` on the admin port) until a shutdown signal, then
    drain for up to GRACEFUL_TIMEOUT_S. HTTPS on both with `frontend.tls_cert`.

    `drain` (the gateway's `Gateway.drain_for_shutdown`) runs first, while the
    listeners still answer: new requests get a retryable 503 and the ones in flight
    finish. Only then are the listeners stopped, so no stream is cut by the server
    closing its connections."""
    fe = settings.frontend
    for path in (fe.tls_cert, fe.tls_key):
        if path is not None and not path.is_file():
            raise ConfigError(f"TLS file {path} does not exist")
    stop = asyncio.Event()  # stops the listeners
    signalled = asyncio.Event() if drain is not None else stop
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, signalled.set)
    scheme = "https" if fe.tls_cert is not None else "http"
    url = f"{scheme}://{fe.host}:{fe.port}"
    server = _uvicorn if fe.server == "uvicorn" else _hypercorn
    runners = [server(app, settings, stop, (fe.host, fe.port))]
    if admin is not None and fe.admin_port is not None:
        runners.append(server(admin, settings, stop, (fe.admin_host, fe.admin_port)))
        log.info("admin endpoints on %s://%s:%d/admin/", scheme, fe.admin_host, fe.admin_port)
    tasks = [loop.create_task(runner()) for runner in runners]
    if drain is not None:
        tasks.append(loop.create_task(_drain_then_stop(signalled, drain, stop)))
    await asyncio.sleep(0)
    if ready is not None:
        ready(url)
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        stop.set()  # one listener failed (a busy port): stop the other too
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _drain_then_stop(
    signalled: asyncio.Event, drain: Callable[[], Awaitable[None]], stop: asyncio.Event
) -> None:
    try:
        await signalled.wait()
        log.info("draining: no new requests; waiting for those in flight")
        await asyncio.wait_for(drain(), GRACEFUL_TIMEOUT_S)
    except TimeoutError:
        log.warning("draining: requests still in flight after %g s", GRACEFUL_TIMEOUT_S)
    finally:
        stop.set()


def _hypercorn(
    app: ASGIApp, settings: Settings, stop: asyncio.Event, bind: tuple[str, int]
) -> Callable[[], Coroutine[Any, Any, None]]:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    fe = settings.frontend
    config = Config()
    config.bind = [f"{bind[0]}:{bind[1]}"]
    if fe.tls_cert is not None and fe.tls_key is not None:
        config.certfile = str(fe.tls_cert)
        config.keyfile = str(fe.tls_key)
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.keep_alive_timeout = fe.keep_alive_s
    # hypercorn's default backlog (100) overflows when a burst of clients connects at
    # once: the kernel drops their handshakes and those clients stall for seconds.
    config.backlog = fe.backlog
    # Bodies are bounded by the app (413 with an OpenAI error); keep hypercorn's own
    # limit above ours so that the app answers first.
    config.h11_max_incomplete_size = max(config.h11_max_incomplete_size, 64 * 1024)

    async def run() -> None:
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)

    return run


def _uvicorn(
    app: ASGIApp, settings: Settings, stop: asyncio.Event, bind: tuple[str, int]
) -> Callable[[], Coroutine[Any, Any, None]]:
    try:
        import uvicorn
    except ImportError:
        raise ConfigError(
            "--server uvicorn needs uvicorn: pip install 'uvicorn[standard]'"
        ) from None
    fe = settings.frontend
    config = uvicorn.Config(
        app,
        host=bind[0],
        port=bind[1],
        ssl_certfile=str(fe.tls_cert) if fe.tls_cert is not None else None,
        ssl_keyfile=str(fe.tls_key) if fe.tls_key is not None else None,
        loop="none",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=int(GRACEFUL_TIMEOUT_S),
        timeout_keep_alive=max(1, round(fe.keep_alive_s)),
        backlog=fe.backlog,
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        async def trigger() -> None:
            await stop.wait()
            server.should_exit = True

        watcher = asyncio.get_running_loop().create_task(trigger())
        try:
            # uvicorn captures SIGINT/SIGTERM itself while serving and re-raises
            # them afterwards, which then reaches our handler too.
            await server.serve()
        finally:
            watcher.cancel()

    return run


def run_async(main: Awaitable[None]) -> None:
    """Run `main` on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)  # type: ignore[arg-type]
        return
    if sys.version_info >= (3, 12):  # pragma: no cover
        asyncio.run(main, loop_factory=uvloop.new_event_loop)  # type: ignore[arg-type]
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)  # type: ignore[arg-type]
