"""Worker pools following discovery, and routing bookkeeping, with in-process mockers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from dynamo_gateway.errors import ModelNotFoundError
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.plugins import Plugins, load_plugins
from dynamo_gateway.protocol.engine import EngineRequest, SamplingParams
from dynamo_gateway.protocol.kv_events import AllBlocksCleared, KvEvent
from dynamo_gateway.router.base import RouterBase, RouteRequest, WorkerView
from dynamo_gateway.runtime.discovery import MemoryDiscovery
from dynamo_gateway.runtime.events import MemoryEventPlane
from dynamo_gateway.runtime.local import LocalFleet, start_local_workers
from dynamo_gateway.runtime.pool import InprocResolver, ModelManager
from dynamo_gateway.settings import Settings, load_settings


class Recorder(RouterBase):
    """Routes to the first worker and records every callback."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.kv_events: list[KvEvent] = []

    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView:
        return workers[0]

    def on_routed(self, request: RouteRequest, worker: WorkerView) -> None:
        self.calls.append(("routed", request.request_id))

    def on_first_token(self, request_id: str) -> None:
        self.calls.append(("first", request_id))

    def on_finished(self, request_id: str) -> None:
        self.calls.append(("finished", request_id))

    def on_kv_event(self, event: KvEvent) -> None:
        self.kv_events.append(event)


def recorder_plugins(make: Callable[[], Recorder]) -> Plugins:
    """Plugins with the built-ins plus a `recorder` router made by `make()`."""
    from dynamo_gateway import hookimpl

    class P:
        @staticmethod
        @hookimpl
        def dynamo_gateway_register_routers(register: object) -> None:
            register("recorder", lambda ctx: make())  # type: ignore[operator]

    return load_plugins(entry_points=False, extra=[(P, "rec")])


@contextlib.asynccontextmanager
async def fleet(
    demo_model: Path, plugins: Plugins, settings: Settings, frontends: int = 1
) -> AsyncIterator[tuple[list[ModelManager], LocalFleet]]:
    """`frontends` managers following two in-process mocker workers of `demo`."""
    discovery, events, resolver = MemoryDiscovery(), MemoryEventPlane(), InprocResolver()
    managers = [
        ModelManager(settings, plugins.registry, resolver, events) for _ in range(frontends)
    ]
    follows = [asyncio.create_task(m.follow(discovery)) for m in managers]
    card = ModelCard.load(demo_model, served_name="demo")
    workers = await start_local_workers(
        settings, plugins.registry, card, discovery=discovery, events=events,
        resolver=resolver, count=2,
    )  # fmt: skip
    try:
        async with asyncio.timeout(10):
            while not all(
                "demo" in m.pools and len(m.pools["demo"].workers) == 2 for m in managers
            ):
                await asyncio.sleep(0.01)
        yield managers, workers
    finally:
        await workers.stop_all()
        await discovery.aclose()
        for task in follows:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for m in managers:
            await m.aclose()
        await events.aclose()


def _serving_both(manager: ModelManager) -> bool:
    pool = manager.pools.get("demo")
    return pool is not None and len(pool.workers) == 2


async def test_pool_follows_discovery_and_tracks_requests(demo_model: Path) -> None:
    recorder = Recorder()
    plugins = recorder_plugins(lambda: recorder)
    settings = load_settings(router="recorder", mocker={"speedup": 1000.0})
    async with fleet(demo_model, plugins, settings) as ([manager], workers):
        pool = manager.get("demo")
        with pytest.raises(ModelNotFoundError):
            manager.get("other")

        prompt = list(range(5, 5 + 40))
        req = EngineRequest(
            request_id="r1", prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=4)
        )
        got = []
        async for out in pool.stream(RouteRequest("r1", prompt), req):
            got.extend(out.token_ids)
        assert len(got) == 4
        assert recorder.calls == [("routed", "r1"), ("first", "r1"), ("finished", "r1")]
        assert all(w.view.inflight == 0 for w in pool.workers.values())
        # KV events reach the router through the event plane, after each worker's
        # initial sync (an AllBlocksCleared numbered 0: the workers started empty).
        for _ in range(50):
            if any(e.event_id >= 1 for e in recorder.kv_events):
                break
            await asyncio.sleep(0.01)
        synced = [e for e in recorder.kv_events if e.event_id == 0]
        assert {e.worker_id for e in synced} == set(pool.workers)
        assert all(isinstance(e.data, AllBlocksCleared) for e in synced)
        live = [e for e in recorder.kv_events if e.event_id >= 1]
        assert live and live[0].event_id == 1

        # Abandoning a stream mid-way still balances the books.
        req2 = EngineRequest(
            request_id="r2", prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=500)
        )
        stream = pool.stream(RouteRequest("r2", prompt), req2)
        await anext(stream)
        first_worker = next(iter(pool.workers.values()))
        assert first_worker.view.inflight == 1
        await stream.aclose()  # type: ignore[attr-defined]
        assert first_worker.view.inflight == 0
        assert recorder.calls[-1] == ("finished", "r2")
        assert first_worker.engine.load().active_requests == 0  # type: ignore[attr-defined]

        # Workers leaving shrink the pool, the last one removes the model.
        await workers.stop_all()
        await asyncio.sleep(0.05)
        assert "demo" not in manager.pools


async def test_router_replica_sync_mirrors_routing_to_other_frontends(demo_model: Path) -> None:
    """Two frontends over the same workers: each router sees the other's requests
    (prefixed with the publishing frontend's id) in lifecycle order, not its own twice."""
    settings = load_settings(
        router="recorder", mocker={"speedup": 1000.0}, runtime={"router_replica_sync": True}
    )
    async with fleet(demo_model, recorder_plugins(Recorder), settings, frontends=2) as ((a, b), _):
        async with asyncio.timeout(10):
            await asyncio.sleep(0.05)  # both managers subscribed
            prompt = list(range(7, 47))
            req = EngineRequest(
                request_id="r1", prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=4)
            )
            async for _ in a.get("demo").stream(RouteRequest("r1", prompt, "s1"), req):
                pass
            router_a, router_b = (m.get("demo").router for m in (a, b))
            mirrored = f"{a.frontend_id}/r1"
            want = [("routed", mirrored), ("first", mirrored), ("finished", mirrored)]
            for _ in range(300):
                if router_b.calls == want:  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0.01)
            assert router_b.calls == want  # type: ignore[attr-defined]
        assert router_a.calls == [("routed", "r1"), ("first", "r1"), ("finished", "r1")]  # type: ignore[attr-defined]
