"""Distributed mode end to end: real etcd, NATS, frontend and worker processes.

Every server is started by the test on free loopback ports; requests go through
a real HTTP client. CI installs etcd and nats-server (see .ci/run).
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dynamo_gateway.servers.etcd import EtcdServer
from dynamo_gateway.servers.nats import NatsServer
from dynamo_gateway.testing import Cluster, ClusterProcess, free_port, read_metric

MakeCluster = Callable[[str, str], Cluster]


@dataclass
class Streamed:
    """One streamed completion, checked for well-formedness as it arrived."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    chunks: int = 0
    ids: set[str] = field(default_factory=set)
    errors: list[object] = field(default_factory=list)
    done: bool = False


async def stream_completion(
    client: httpx.AsyncClient,
    url: str,
    prompt: str,
    max_tokens: int,
    *,
    first_chunk: asyncio.Event | None = None,
) -> Streamed:
    body = {
        "model": "demo",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    got = Streamed()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            assert not got.done, "data after [DONE]"
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                got.done = True
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                got.errors.append(chunk["error"])
                continue
            got.ids.add(chunk["id"])
            got.chunks += 1
            for choice in chunk["choices"]:
                assert got.finish_reason is None, "chunk after the finish chunk"
                got.text += choice["text"]
                got.finish_reason = choice["finish_reason"]
            if chunk.get("usage"):
                got.completion_tokens = chunk["usage"]["completion_tokens"]
            if first_chunk is not None:
                first_chunk.set()
    return got


def assert_complete(results: list[Streamed], max_tokens: int) -> None:
    for r in results:
        assert not r.errors, r.errors
        assert r.done and len(r.ids) == 1
        assert r.finish_reason == "length"
        assert r.completion_tokens == max_tokens


def get_json(url: str) -> dict[str, object]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


def served(worker: ClusterProcess) -> float:
    """Requests a worker finished, from its own status endpoint."""
    status = next(
        line.split("status ")[1]
        for line in worker.log().splitlines()
        if line.startswith("dynamo-gateway worker ")
    )
    return read_metric(
        status, "dynamo_gateway_worker_requests_served", worker_id=worker.worker_id, model="demo"
    )


async def run_requests(url: str, count: int, max_tokens: int, prefix: str = "q") -> list[Streamed]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(
            *(stream_completion(client, url, f"{prefix} {i}", max_tokens) for i in range(count))
        )


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


async def test_a_frontend_serves_only_once_it_knows_the_registered_models(
    cluster: MakeCluster, etcd_server: EtcdServer, nats_server: NatsServer
) -> None:
    # A frontend (re)started under traffic gets requests the moment it listens: it
    # must not answer 404 for a model it has not read from discovery yet. Clients
    # knock on its port from before it starts.
    c = cluster(etcd_server.url, nats_server.url)
    c.worker("--speedup", "20")
    c.worker("--speedup", "20", "--served-model-name", "other")
    port = free_port()
    statuses: list[int] = []
    stop = threading.Event()

    def knock(model: str) -> None:
        body = {"model": model, "prompt": "hello", "max_tokens": 2}
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    resp = client.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
                except httpx.TransportError:
                    time.sleep(0.002)
                    continue
                statuses.append(resp.status_code)

    for _ in range(3):
        knockers = [threading.Thread(target=knock, args=(m,)) for m in ("demo", "other") * 2]
        for t in knockers:
            t.start()
        try:
            fe = c.frontend(port=port)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in knockers:
                t.join()
        stop.clear()
        fe.stop()
    assert statuses and set(statuses) == {200}, (collections.Counter(statuses), c.logs())


async def test_etcd_nats_cluster_scales_out_and_drains(
    cluster: MakeCluster, etcd_server: EtcdServer, nats_server: NatsServer
) -> None:
    c = cluster(etcd_server.url, nats_server.url)
    workers = [
        c.worker("--speedup", "20"),
        c.worker("--speedup", "20"),
        c.worker(engine="reference"),
    ]
    fe = c.frontend()
    c.wait_workers(fe, 3)

    assert_complete(await run_requests(fe.url, 12, 16), 16)
    assert all(served(w) >= 1 for w in workers), c.logs()
    assert read_metric(fe.url, "dynamo_gateway_workers", model="demo", role="aggregated") == 3
    # KV events of every worker reach the frontend over NATS.
    wait_until(
        lambda: read_metric(fe.url, "dynamo_gateway_kv_events_total", model="demo") > 0,
        10,
        "no KV events reached the frontend",
    )

    # A fourth worker joins at run time and gets traffic, without a frontend restart.
    fourth = c.worker("--speedup", "20")
    c.wait_workers(fe, 4)
    assert_complete(await run_requests(fe.url, 8, 16, prefix="r"), 16)
    assert served(fourth) >= 1

    # SIGTERM drains: requests running on the worker finish there, none fails.
    slow = workers[0]
    async with httpx.AsyncClient(timeout=120) as client:
        started = asyncio.Event()
        tasks = [
            asyncio.create_task(
                stream_completion(client, fe.url, f"s {i}", 200, first_chunk=started)
            )
            for i in range(8)
        ]
        await asyncio.wait_for(started.wait(), 30)
        slow.signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
    assert_complete(results, 200)
    assert slow.process.wait(30) == 0
    c.wait_workers(fe, 3)
    assert "draining" in slow.log() or "stopping" in slow.log()
    assert_complete(await run_requests(fe.url, 6, 8, prefix="t"), 8)


async def test_kill9_worker_mid_stream_migrates_every_request(
    cluster: MakeCluster, etcd_server: EtcdServer, nats_server: NatsServer
) -> None:
    c = cluster(etcd_server.url, nats_server.url)
    victim = c.worker(engine="reference")
    fe = c.frontend("--migration-limit", "3")
    c.wait_workers(fe, 1)
    prompts = [f"migrate me number {i}" for i in range(20)]
    max_tokens = 96

    # Uninterrupted greedy answers first, from the same engine on the same model.
    async with httpx.AsyncClient(timeout=120) as client:
        expected = await asyncio.gather(
            *(stream_completion(client, fe.url, p, max_tokens) for p in prompts)
        )
    assert_complete(expected, max_tokens)

    # The survivor joins, then freezes until its lease runs out, so that all 20
    # requests run on the victim; thawed, it registers again and takes them over.
    survivor = c.worker("--lease-ttl", "2", engine="reference")
    c.wait_workers(fe, 2)
    survivor.signal(signal.SIGSTOP)
    try:
        c.wait_workers(fe, 1, timeout=15)
        async with httpx.AsyncClient(timeout=120) as client:
            progressed = asyncio.Event()
            tasks = [
                asyncio.create_task(
                    stream_completion(client, fe.url, p, max_tokens, first_chunk=progressed)
                )
                for p in prompts
            ]
            await asyncio.wait_for(progressed.wait(), 60)
            victim.kill()
            survivor.signal(signal.SIGCONT)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    finally:
        survivor.signal(signal.SIGCONT)

    assert_complete(results, max_tokens)
    assert [r.text for r in results] == [e.text for e in expected]
    assert read_metric(fe.url, "dynamo_gateway_migrations_total", model="demo") >= 1, c.logs()


async def test_cluster_survives_etcd_and_nats_restarts(
    cluster: MakeCluster, etcd_server: EtcdServer, nats_server: NatsServer
) -> None:
    c = cluster(etcd_server.url, nats_server.url)
    c.worker("--speedup", "20")
    fe = c.frontend()
    c.wait_workers(fe, 1)
    assert_complete(await run_requests(fe.url, 4, 8), 8)

    etcd_server.restart()
    nats_server.restart()
    time.sleep(1.0)
    assert_complete(await run_requests(fe.url, 4, 8, prefix="after"), 8)
    # Discovery works again: a worker started after the restarts is found.
    c.worker("--speedup", "20")
    c.wait_workers(fe, 2, timeout=30)
    # And the event plane carries KV events again (counted by the frontend).
    before = read_metric(fe.url, "dynamo_gateway_kv_events_total", model="demo")
    assert_complete(await run_requests(fe.url, 4, 40, prefix="kv"), 40)
    wait_until(
        lambda: read_metric(fe.url, "dynamo_gateway_kv_events_total", model="demo") > before,
        15,
        "no KV events after the NATS restart",
    )


async def test_lease_expiry_removes_a_frozen_worker(
    cluster: MakeCluster, etcd_server: EtcdServer, nats_server: NatsServer
) -> None:
    c = cluster(etcd_server.url, nats_server.url)
    frozen = c.worker("--speedup", "20", "--lease-ttl", "2")
    c.worker("--speedup", "20", "--lease-ttl", "2")
    fe = c.frontend()
    c.wait_workers(fe, 2)
    frozen.signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        c.wait_workers(fe, 1, timeout=15)
        assert time.monotonic() - start < 10
        assert_complete(await run_requests(fe.url, 6, 8), 8)
    finally:
        frozen.signal(signal.SIGCONT)
    # Thawed, it notices its lease is gone, registers again and is routed to again.
    c.wait_workers(fe, 2, timeout=20)


async def test_single_host_file_and_zmq_without_servers(
    cluster: MakeCluster, tmp_path: Path
) -> None:
    c = cluster(f"file://{tmp_path}/discovery", f"zmq://{tmp_path}/events")
    first = c.worker("--speedup", "20", "--lease-ttl", "2")
    second = c.worker("--speedup", "20", "--lease-ttl", "2")
    fe = c.frontend()
    c.wait_workers(fe, 2)
    assert_complete(await run_requests(fe.url, 8, 24), 24)
    assert served(first) >= 1 and served(second) >= 1
    wait_until(
        lambda: read_metric(fe.url, "dynamo_gateway_kv_events_total", model="demo") > 0,
        10,
        "no KV events over ZMQ",
    )
    health = get_json(fe.url + "/health")
    assert health["status"] == "healthy"

    # A second model appears with its first worker and goes with its last one.
    other = c.worker("--speedup", "20", "--lease-ttl", "2", "--served-model-name", "other")
    c.wait_workers(fe, 1, model="other")
    async with httpx.AsyncClient(timeout=60) as client:
        models = (await client.get(f"{fe.url}/v1/models")).json()
        assert sorted(m["id"] for m in models["data"]) == ["demo", "other"]
        body = {"model": "other", "prompt": "hi", "max_tokens": 4}
        resp = await client.post(f"{fe.url}/v1/completions", json=body)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4

        first.kill()  # no deregistration: the file lease must run out
        other.kill()
        c.wait_workers(fe, 1, timeout=15)
        wait_until(lambda: "other" not in get_json(fe.url + "/ready")["models"], 15, "other")  # type: ignore[operator]
        resp = await client.post(f"{fe.url}/v1/completions", json=body)
        assert resp.status_code == 404
    assert_complete(await run_requests(fe.url, 4, 8, prefix="after"), 8)
