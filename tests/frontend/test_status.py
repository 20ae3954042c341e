"""/status and /status.json in-process: what the data says, that the page loads
nothing from elsewhere, and the planner's decisions reaching a frontend."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import pytest

from dynamo_gateway.frontend.app import Gateway, build_app
from dynamo_gateway.frontend.status import (
    CONTENT_SECURITY_POLICY,
    MAX_MESSAGE_CHARS,
    PAGE,
    RecentErrors,
    status_report,
)
from dynamo_gateway.planner.config import load_config
from dynamo_gateway.planner.connector import ManagedWorker, WorkerSpec, WorkerState
from dynamo_gateway.planner.loop import Planner
from dynamo_gateway.planner.observe import PoolKey
from dynamo_gateway.planner.policies.load import LoadPolicy
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.protocol.engine import LoadMetrics
from dynamo_gateway.runtime.discovery import MemoryDiscovery, WorkerRecord
from dynamo_gateway.runtime.events import LoadReport, MemoryEventPlane, load_topic
from dynamo_gateway.runtime.pool import InprocResolver, ModelManager
from dynamo_gateway.server import embedded
from dynamo_gateway.settings import load_settings

SECRET_PROMPT = "a prompt that must never show on the status page"


@pytest.fixture
async def client(demo_model: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(
        engine="mocker", workers=2, models=[{"path": demo_model, "name": "demo"}]
    )
    async with embedded(settings) as gateway:
        transport = httpx.ASGITransport(app=build_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


async def test_status_json_shows_models_workers_router_and_errors(
    client: httpx.AsyncClient,
) -> None:
    body = {"model": "demo", "prompt": "the same long prompt " * 8, "max_tokens": 4}
    for _ in range(3):
        assert (await client.post("/v1/completions", json=body)).status_code == 200
    missing = {"model": "nope", "prompt": SECRET_PROMPT, "max_tokens": 4}
    assert (await client.post("/v1/completions", json=missing)).status_code == 404
    bad = {"model": "demo", "prompt": SECRET_PROMPT, "max_tokens": -1}
    assert (await client.post("/v1/completions", json=bad)).status_code == 400

    resp = await client.get("/status.json")
    assert resp.status_code == 200 and resp.headers["cache-control"] == "no-store"
    assert SECRET_PROMPT not in resp.text
    s = resp.json()
    [model] = s["models"]
    assert model["name"] == "demo" and model["router"] == "kv"
    assert [w["role"] for w in model["workers"]] == ["aggregated", "aggregated"]
    assert all(w["state"] == "live" and w["kv_total"] > 0 for w in model["workers"])
    assert model["requests"] == {"200": 3}
    assert s["requests"] == {"200": 3, "400": 1, "404": 1}
    router = model["router_stats"]
    assert router["decisions"] == 3 and router["request_blocks"] > 0
    assert router["matched_blocks"] > 0 and 0 < router["hit_rate"] <= 1
    assert model["migrations"] == 0
    first, second = s["recent_errors"]  # newest first
    assert (first["status"], first["model"]) == (400, "-")  # refused before naming a model
    assert first["type"] == second["type"] == "invalid_request_error"
    assert (second["status"], second["model"]) == (404, "nope")
    assert "nope" in second["message"] and second["endpoint"] == "completions"
    assert s["errors_by_type"] == {"invalid_request_error": 2}  # a 404 for a model is one too
    assert s["planner"] == []


async def test_status_page_loads_nothing_from_elsewhere(client: httpx.AsyncClient) -> None:
    resp = await client.get("/status")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert resp.content == PAGE
    csp = resp.headers["content-security-policy"]
    assert csp == CONTENT_SECURITY_POLICY and "default-src 'none'" in csp
    assert "connect-src 'self'" in csp and "unsafe-inline" not in csp
    text = resp.text
    assert not re.search(r"https?://|//[a-z]|@import|url\(|\ssrc=|<link rel=\"stylesheet", text)
    assert text.count("<script>") == 1 and text.count("<style>") == 1
    assert 'fetch("status.json"' in text  # relative: works behind a path prefix


def test_recent_errors_are_bounded_newest_first_and_cut() -> None:
    clock = iter(range(100))
    errors = RecentErrors(size=3, clock=lambda: float(next(clock)))
    for i in range(5):
        errors.add("m", "chat", 400, "invalid_request_error", f"error {i}")
    errors.add("x" * 500, "chat", 500, "server_error", "y" * 1000)
    got = errors.newest_first()
    assert len(errors) == 3
    assert [e.message for e in got[1:]] == ["error 4", "error 3"]
    assert len(got[0].message) == MAX_MESSAGE_CHARS and got[0].message.endswith("\u2026")
    assert len(got[0].model) == 100
    assert [e.time for e in got] == [5.0, 4.0, 3.0]


class _Connector:
    """Starts nothing; every worker asked for stays 'starting'."""

    def __init__(self) -> None:
        self.workers: list[ManagedWorker] = []

    async def start(self) -> None:
        pass

    def managed(self) -> list[ManagedWorker]:
        return list(self.workers)

    async def add(self, spec: WorkerSpec, count: int) -> list[str]:
        ids = [f"new{len(self.workers) + i}" for i in range(count)]
        self.workers += [ManagedWorker(i, spec.pool, WorkerState.RUNNING, 0.0) for i in ids]
        return ids

    async def remove(self, pool: PoolKey, worker_ids: Sequence[str]) -> None:
        pass

    def worker_seconds(self) -> float:
        return 0.0

    async def aclose(self, *, stop_workers: bool = True) -> None:
        pass


async def test_planner_decisions_that_change_a_pool_reach_the_frontend() -> None:
    cfg = load_config(
        None,
        cooldown_s=0,
        load={"up_intervals": 1, "down_intervals": 1},
        models=[{"name": "m", "path": "m", "pools": {"aggregated": {"min": 1, "max": 3}}}],
    )
    discovery, events = MemoryDiscovery(), MemoryEventPlane()
    settings = load_settings()
    manager = ModelManager(settings, load_plugins(entry_points=False).registry,
                           InprocResolver(), events)  # fmt: skip
    # The frontend follows its own (empty) discovery: only the decisions matter here.
    frontend_discovery = MemoryDiscovery()
    follow = asyncio.get_running_loop().create_task(manager.follow(frontend_discovery))
    planner = Planner(cfg, LoadPolicy(cfg.load), _Connector(), discovery=discovery,
                      events=events, own_planes=False)  # fmt: skip
    await planner.start()
    await discovery.register(
        WorkerRecord(worker_id="w0", model="m", model_path="m", address="tcp://h:1")
    )
    await asyncio.sleep(0.01)
    busy = LoadReport(worker_id="w0", metrics=LoadMetrics(active_requests=30))
    try:
        events.publish(load_topic("m"), busy)
        await asyncio.sleep(0.01)
        [up] = await planner.step()  # 1 -> 3
        events.publish(load_topic("m"), busy)
        await asyncio.sleep(0.01)
        [keep] = await planner.step()  # 1 live + 2 starting: at the max, no change
        await asyncio.sleep(0.01)
    finally:
        await planner.aclose()
        follow.cancel()
        await manager.aclose()
        await discovery.aclose()
        await frontend_discovery.aclose()
        await events.aclose()
    assert up.change == 2 and keep.change == 0
    [seen] = manager.planner_decisions  # only the one that changed the pool
    assert (seen.model, seen.role, seen.current, seen.target) == ("m", "aggregated", 1, 3)
    assert seen.live == 1 and seen.starting == 0 and not seen.dry_run and seen.reason
    report = status_report(Gateway(settings, manager))
    assert report.planner == [seen]
