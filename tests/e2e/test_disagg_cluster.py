"""Disaggregated serving across processes: real etcd, NATS, a frontend, prefill
and decode workers (reference engine, fp32 demo model), over each transport
that crosses a process boundary. Outputs are compared with an aggregated worker
of the same model served under another name by the same frontend."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dynamo_gateway.servers.etcd import EtcdServer
from dynamo_gateway.servers.nats import NatsServer
from dynamo_gateway.testing import Cluster, ClusterProcess, read_metric

MakeCluster = Callable[[str, str], Cluster]

ENGINE = ("--block-size", "16", "--num-kv-blocks", "1024")
PROMPTS = [
    " ".join(f"item{(i * 7 + j) % 53} of list{i} and more{j % 5}" for j in range(40))
    for i in range(4)
]
HAS_NIXL = importlib.util.find_spec("nixl") is not None


def status_url(worker: ClusterProcess) -> str:
    return next(
        line.split("status ")[1]
        for line in worker.log().splitlines()
        if line.startswith("dynamo-gateway worker ")
    )


def worker_metric(worker: ClusterProcess, name: str, **labels: str) -> float:
    return read_metric(status_url(worker), name, worker_id=worker.worker_id, model="demo", **labels)


async def complete(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int
) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = await client.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def texts(
    client: httpx.AsyncClient, url: str, model: str, prompts: list[str], max_tokens: int
) -> list[str]:
    """Greedy completions of `prompts`, concurrently, in order."""
    results = await asyncio.gather(*(complete(client, url, model, p, max_tokens) for p in prompts))
    return [r["choices"][0]["text"] for r in results]


async def wait_unpinned(prefill: ClusterProcess, timeout: float = 10.0) -> float:
    """Wait until the prefill worker holds no exported blocks; returns what it holds."""
    name = "dynamo_gateway_worker_kv_pinned_blocks"
    deadline = time.monotonic() + timeout
    while worker_metric(prefill, name) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return worker_metric(prefill, name)


def disagg_cluster(
    c: Cluster, transport: str, *, decode_workers: int = 1, timeout_s: float = 30.0
) -> tuple[ClusterProcess, ClusterProcess, list[ClusterProcess]]:
    flags = [*ENGINE, "--kv-transport", transport, "--kv-transfer-timeout", str(timeout_s)]
    c.worker(*ENGINE, "--served-model-name", "demo-agg", engine="reference")
    prefill = c.worker("--role", "prefill", *flags, engine="reference")
    decodes = [
        c.worker("--role", "decode", *flags, "--lease-ttl", "2", engine="reference")
        for _ in range(decode_workers)
    ]
    fe = c.frontend("--disagg-min-prefill-tokens", "64", "--migration-limit", "3")
    c.wait_workers(fe, 1 + decode_workers)
    c.wait_workers(fe, 1, model="demo-agg")
    return fe, prefill, decodes


async def expected_and_disagg(url: str, max_tokens: int) -> tuple[list[str], list[str]]:
    async with httpx.AsyncClient(timeout=120) as client:
        agg = await texts(client, url, "demo-agg", PROMPTS, max_tokens)
        return agg, await texts(client, url, "demo", PROMPTS, max_tokens)


@pytest.mark.parametrize(
    "transport",
    [
        "shm",
        "tcp",
        pytest.param(
            "nixl", marks=pytest.mark.skipif(not HAS_NIXL, reason="nixl is not installed")
        ),
    ],
)
async def test_remote_prefill_across_processes_equals_aggregated(
    cluster: MakeCluster, etcd_server: EtcdServer, nats_server: NatsServer, transport: str
) -> None:
    c = cluster(etcd_server.url, nats_server.url)
    fe, prefill, (decode,) = disagg_cluster(c, transport)
    expected, got = await expected_and_disagg(fe.url, 24)
    assert got == expected, c.logs()
    remote = read_metric(fe.url, "dynamo_gateway_remote_prefill_total", model="demo")
    assert remote == len(PROMPTS), c.logs()
    moved = worker_metric(
        decode, "dynamo_gateway_worker_kv_transfer_bytes_total", transport=transport
    )
    assert moved > 0, c.logs()
    # Every export was pulled and released: nothing stays pinned on the prefill side.
    assert await wait_unpinned(prefill) == 0
    assert worker_metric(decode, "dynamo_gateway_worker_kv_blocks_used") == 0


async def test_prefill_worker_killed_requests_complete_without_leaks(
    cluster: MakeCluster, etcd_server: EtcdServer, nats_server: NatsServer
) -> None:
    c = cluster(etcd_server.url, nats_server.url)
    fe, prefill, (decode,) = disagg_cluster(c, "tcp")
    max_tokens = 48
    async with httpx.AsyncClient(timeout=120) as client:
        expected = await texts(client, fe.url, "demo-agg", PROMPTS * 2, max_tokens)
        tasks = [
            asyncio.create_task(complete(client, fe.url, "demo", p, max_tokens))
            for p in PROMPTS * 2
        ]
        # Killed once the first prefill has been handed off: others are still running
        # or waiting to be pulled (a fixed sleep was too early on a busy machine).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            remote = await asyncio.to_thread(
                read_metric, fe.url, "dynamo_gateway_remote_prefill_total", model="demo"
            )
            if remote >= 1:
                break
            await asyncio.sleep(0.01)
        prefill.kill()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert [r["choices"][0]["text"] for r in results] == expected, c.logs()
    assert all(r["usage"]["completion_tokens"] == max_tokens for r in results)
    # The kill hit requests in flight: their prefill leg or their pull failed, and
    # they prefilled on the decode worker instead.
    failed_legs = read_metric(
        fe.url, "dynamo_gateway_local_prefill_total", model="demo", reason="prefill_failed"
    )
    failed_pulls = worker_metric(
        decode, "dynamo_gateway_worker_kv_transfer_failures_total", kind="failed"
    )
    assert failed_legs + failed_pulls >= 1, c.logs()
    assert worker_metric(decode, "dynamo_gateway_worker_kv_blocks_used") == 0, c.logs()


async def test_decode_worker_killed_migrates_and_prefill_frees_after_timeout(
    cluster: MakeCluster, etcd_server: EtcdServer, nats_server: NatsServer
) -> None:
    c = cluster(etcd_server.url, nats_server.url)
    fe, prefill, decodes = disagg_cluster(c, "tcp", decode_workers=2, timeout_s=2.0)
    max_tokens = 64
    async with httpx.AsyncClient(timeout=120) as client:
        expected = await texts(client, fe.url, "demo-agg", PROMPTS, max_tokens)
        tasks = [
            asyncio.create_task(complete(client, fe.url, "demo", p, max_tokens)) for p in PROMPTS
        ]
        deadline = time.monotonic() + 60
        victim = None
        while victim is None and time.monotonic() < deadline:
            for d in decodes:
                if worker_metric(d, "dynamo_gateway_worker_active_requests") > 0:
                    victim = d
                    break
            await asyncio.sleep(0.02)
        assert victim is not None, c.logs()
        victim.kill()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert [r["choices"][0]["text"] for r in results] == expected, c.logs()
    assert read_metric(fe.url, "dynamo_gateway_migrations_total", model="demo") >= 1, c.logs()
    # Exports the dead worker never pulled are freed by the timeout (2 s).
    assert await wait_unpinned(prefill) == 0, c.logs()
    assert worker_metric(prefill, "dynamo_gateway_worker_kv_blocks_used") == 0, c.logs()
