"""Chaos: a mocker cluster over real etcd and NATS keeps serving, token for token
correct, while workers are killed and paused, etcd and NATS restart and the frontend
restarts (`dynamo_gateway.testing.chaos`); the same for prefill and decode workers
moving KV over TCP with a shared Redis tier that restarts empty; and a fleet run by
the planner while its workers and the planner itself are killed.

The CI size is 60 s of load with every fault kind at least once; ``--chaos-seconds``
makes it longer (the soak's figures come from ``benchmarks/chaos_soak.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from dynamo_gateway.servers.etcd import EtcdServer
from dynamo_gateway.servers.nats import NatsServer
from dynamo_gateway.servers.redis import RedisServer
from dynamo_gateway.testing import Cluster, ClusterProcess, read_metric
from dynamo_gateway.testing.chaos import (
    FAULT_KINDS,
    ChaosRun,
    LoadConfig,
    Schedule,
    SteadyLoad,
    chaos_prompts,
    report,
    run_chaos,
)
from dynamo_gateway.testing.planner import live_workers, planner_toml, wait_for

pytestmark = pytest.mark.chaos

MakeCluster = Callable[[str, str], Cluster]


def _worker_gauge(url: str, name: str) -> list[float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return [float(v) for v in re.findall(rf"^dynamo_gateway_{name}{{[^}}]*}} (\S+)$", text, re.M)]


def _settled(url: str, timeout: float = 20.0) -> bool:
    """No request left running, and no KV block held, on any worker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        active = _worker_gauge(url, "worker_active_requests")
        used = _worker_gauge(url, "worker_kv_blocks_used")
        if active and not any(active) and not any(used):
            return True
        time.sleep(0.2)
    return False


async def _run(
    c: Cluster, chaos: ChaosRun, seconds: float, kinds: tuple[str, ...]
) -> dict[str, Any]:
    """Start the cluster, take the fault-free answers, run the load through `kinds`;
    assert what every chaos run must hold, and return the report."""
    url = await asyncio.to_thread(chaos.start)
    cfg = LoadConfig(url, concurrency=12, max_tokens=32)
    prompts = chaos_prompts(documents=6, questions=4)
    expected = await SteadyLoad.answers(cfg, prompts)
    load = SteadyLoad(cfg, prompts, expected)
    # 8 s of clean load, then every kind once (more if --chaos-seconds allows), each
    # followed by 7 s of clean load.
    outcomes, started, ended = await run_chaos(
        chaos, load, Schedule(duration_s=seconds, kinds=kinds)
    )
    result = report(outcomes, chaos.faults, started=started, ended=ended)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mib"}, indent=1))

    assert set(result["faults_by_kind"]) == set(kinds), result["faults"]
    assert result["requests"] > 200
    assert result["failed"] == 0 and result["corrupted"] == 0, (result["failures"], c.logs())
    # Streams really were cut and resumed elsewhere, not merely spared.
    migrated = sum(p.log().count("; resuming on ") for p in c.processes if p.name == "frontend")
    assert migrated >= 1, c.logs()
    # Nothing leaked: no request left running and no KV block held on any worker.
    assert chaos.frontend is not None
    assert _settled(chaos.frontend.url), c.logs()
    # The KV index recovers after every fault: the hit rate is back above 90% of its
    # level before the faults before the next fault, and at the end of the run. A
    # killed worker's cache is really gone (its documents are prefilled again): on a
    # slow machine that may take longer than the 7 s to the next fault.
    baseline = result["kv_hit_rate_before_faults"]
    assert baseline > 0.5
    late = [
        f for f in result["faults"] if f["kv_recovery_s"] is None and f["kind"] != "kill_worker"
    ]
    assert not late, late
    assert result["kv_hit_rate_final"] >= 0.9 * baseline, result
    return result


async def test_chaos_aggregated_workers(
    cluster: MakeCluster,
    etcd_server: EtcdServer,
    nats_server: NatsServer,
    request: pytest.FixtureRequest,
) -> None:
    c = cluster(etcd_server.url, nats_server.url)
    workers = [("--speedup", "2")] * 3
    chaos = ChaosRun(c, etcd_server, nats_server, workers)
    await _run(c, chaos, request.config.getoption("--chaos-seconds"), FAULT_KINDS)


async def test_chaos_disaggregated_workers_with_a_shared_kv_store(
    cluster: MakeCluster,
    etcd_server: EtcdServer,
    nats_server: NatsServer,
    redis_server: RedisServer,
    request: pytest.FixtureRequest,
) -> None:
    # Two prefill and two decode workers moving KV over TCP, every one offloading to
    # the same Redis; a prefill worker killed mid-handoff, a decode worker killed
    # mid-stream, Redis restarted empty under them.
    c = cluster(etcd_server.url, nats_server.url)
    common = ("--speedup", "2", "--kv-transport", "tcp", "--kv-remote-url", redis_server.url)
    workers = [("--role", role, *common) for role in ("prefill", "prefill", "decode", "decode")]
    frontend = ("--migration-limit", "3", "--disagg-min-prefill-tokens", "64")
    chaos = ChaosRun(
        c, etcd_server, nats_server, workers, redis=redis_server, frontend_args=frontend
    )
    kinds = ("kill_worker", "restart_redis", "pause_worker", "kill_worker", "restart_nats")
    result = await _run(c, chaos, request.config.getoption("--chaos-seconds"), kinds)
    assert chaos.frontend is not None
    remote = read_metric(chaos.frontend.url, "dynamo_gateway_remote_prefill_total", model="demo")
    assert remote > 0, result  # the requests really were disaggregated


def _planner_workers(planner: ClusterProcess) -> list[psutil.Process]:
    """The worker processes `planner` started (its children), alive now."""
    return [
        p
        for p in psutil.Process(planner.process.pid).children()
        if p.is_running() and "worker" in p.cmdline()
    ]


def _wait_live(frontend: ClusterProcess, count: int, timeout: float) -> None:
    wait_for(frontend, lambda w: w.get("demo") == count, timeout, f"{count} live workers")


async def test_chaos_planner_heals_and_survives_its_own_restart(
    cluster: MakeCluster,
    etcd_server: EtcdServer,
    nats_server: NatsServer,
    tmp_path: Path,
    demo_model: Path,
) -> None:
    # The planner (local connector, 1 to 3 workers) scales the fleet up under the
    # load, then: one of its workers is SIGKILLed (it starts another), the planner
    # itself is SIGKILLed and started again (its workers go on serving; the new one
    # finds the fleet at its size and leaves it), and another worker is SIGKILLed
    # (the new planner replaces it). Every stream still completes, token for token.
    c = cluster(etcd_server.url, nats_server.url)
    frontend = c.frontend("--migration-limit", "3")
    config = tmp_path / "planner.toml"
    config.write_text(planner_toml(demo_model, {"demo": 3}))
    planner = c.planner("--config", str(config), "--frontend", frontend.url)
    _wait_live(frontend, 1, 60)
    cfg = LoadConfig(frontend.url, concurrency=12, max_tokens=32)
    prompts = chaos_prompts(documents=6, questions=4)
    expected = await SteadyLoad.answers(cfg, prompts)
    load = SteadyLoad(cfg, prompts, expected)
    stop = asyncio.Event()
    running = asyncio.create_task(load.run(stop))
    orphans: list[psutil.Process] = []
    try:
        # 12 in flight at 4 per worker: the planner grows the fleet to its maximum.
        await asyncio.to_thread(_wait_live, frontend, 3, 60)
        first = planner
        victim = _planner_workers(first)[0]
        victim.kill()
        await asyncio.sleep(1)
        await asyncio.to_thread(_wait_live, frontend, 3, 60)  # a replacement joined
        orphans = _planner_workers(first)
        first.kill()  # the planner dies; its workers do not
        planner = c.planner("--config", str(config), "--frontend", frontend.url)
        await asyncio.sleep(5)
        assert live_workers(frontend).get("demo") == 3  # nothing lost, nothing added
        orphans[0].kill()  # one of the old planner's workers: the new one replaces it
        await asyncio.sleep(1)
        await asyncio.to_thread(_wait_live, frontend, 3, 60)
        await asyncio.sleep(5)
    finally:
        stop.set()
        outcomes = await running
        for p in orphans:
            with contextlib.suppress(psutil.Error):
                p.terminate()
    result = report(outcomes, [], started=outcomes[0].start, ended=outcomes[-1].end)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mib"}, indent=1))
    assert result["requests"] > 200
    assert result["failed"] == 0 and result["corrupted"] == 0, (result["failures"], c.logs())
    assert "exited by itself" in first.log(), first.log()  # it saw its worker die
    assert "; resuming on " in frontend.log(), c.logs()  # the kills cut streams
    assert planner.log().count("started worker") >= 1, planner.log()
    assert _settled(frontend.url), c.logs()
