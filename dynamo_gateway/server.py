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


def plugins_for(settings: Settings) -> Plugins:
    return load_plugins(only=settings.plugins, trace=settings.trace_hooks)


async def serve(settings: Settings, *, ready: Callable[[str], None] | None = None) -> None:
    """Run the embedded gateway until SIGINT/SIGTERM."""
    async with embedded(settings) as gateway:
        await run_http(build_app(gateway), settings, ready=ready)


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
        await run_http(build_app(gateway), settings, ready=ready)


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
        yield Gateway(settings, manager)
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        await manager.aclose()
        await discovery.aclose()
        await events.aclose()


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
    app: ASGIApp, settings: Settings, *, ready: Callable[[str], None] | None = None
) -> None:
    """Serve `app` until a shutdown signal, then drain for up to GRACEFUL_TIMEOUT_S."""
    fe = settings.frontend
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    url = f"http://{fe.host}:{fe.port}"
    if fe.server == "uvicorn":
        runner = _uvicorn(app, settings, stop)
    else:
        runner = _hypercorn(app, settings, stop)
    task = loop.create_task(runner())
    await asyncio.sleep(0)
    if ready is not None:
        ready(url)
    await task


def _hypercorn(
    app: ASGIApp, settings: Settings, stop: asyncio.Event
) -> Callable[[], Coroutine[Any, Any, None]]:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    fe = settings.frontend
    config = Config()
    config.bind = [f"{fe.host}:{fe.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.keep_alive_timeout = 75
    # Bodies are bounded by the app (413 with an OpenAI error); keep hypercorn's own
    # limit above ours so that the app answers first.
    config.h11_max_incomplete_size = max(config.h11_max_incomplete_size, 64 * 1024)

    async def run() -> None:
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)

    return run


def _uvicorn(
    app: ASGIApp, settings: Settings, stop: asyncio.Event
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
        host=fe.host,
        port=fe.port,
        loop="none",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=int(GRACEFUL_TIMEOUT_S),
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
