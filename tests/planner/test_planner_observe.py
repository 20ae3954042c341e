"""What the planner reads: frontend metrics as traffic, discovery + load reports as pools."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from dynamo_gateway.frontend.metrics import FrontendMetrics
from dynamo_gateway.planner.config import load_config
from dynamo_gateway.planner.connector import ManagedWorker, WorkerState
from dynamo_gateway.planner.loop import pools_now, victims
from dynamo_gateway.planner.observe import (
    PoolKey,
    merge_samples,
    parse_samples,
    traffic_between,
)
from dynamo_gateway.protocol.engine import LoadMetrics, WorkerRole
from dynamo_gateway.runtime.discovery import WorkerRecord


def scrape(metrics: FrontendMetrics) -> dict:  # type: ignore[type-arg]
    return parse_samples(generate_latest(metrics.registry).decode())


def serve(metrics: FrontendMetrics, model: str, n: int, ttft: float, itl: float) -> None:
    m = metrics.model(model)
    for _ in range(n):
        metrics.requests.labels(model, "chat", "200").inc()
        m.input_tokens.inc(100)
        m.output_tokens.inc(10)
        m.ttft.observe(ttft)
        m.itl.observe(itl)


def test_traffic_between_two_scrapes_of_real_frontend_metrics() -> None:
    fm = FrontendMetrics()
    serve(fm, "a", 5, 0.2, 0.01)
    before = scrape(fm)
    serve(fm, "a", 8, 0.3, 0.02)
    serve(fm, "a", 2, 2.0, 0.2)  # slow ones
    fm.requests.labels("a", "models", "200").inc(50)  # not a generation request
    serve(fm, "b", 3, 0.1, 0.01)
    t = traffic_between(before, scrape(fm), "a", 5.0, ttft_target_s=0.5, itl_target_s=0.05)
    assert t.requests == 10 and t.request_rate == pytest.approx(2.0)
    assert t.mean_isl == 100 and t.mean_osl == 10
    assert t.ttft_s == pytest.approx((8 * 0.3 + 2 * 2.0) / 10)
    assert t.ttft_attainment == pytest.approx(0.8)
    assert t.itl_attainment == pytest.approx(0.8)
    idle = traffic_between(scrape(fm), scrape(fm), "a", 5.0, ttft_target_s=0.5)
    assert idle.requests == 0 and idle.ttft_s is None and idle.ttft_attainment is None


def test_a_restarted_frontend_counts_from_zero_and_frontends_add_up() -> None:
    old, new = FrontendMetrics(), FrontendMetrics()
    serve(old, "a", 20, 0.1, 0.01)
    serve(new, "a", 3, 0.1, 0.01)
    t = traffic_between(scrape(old), scrape(new), "a", 1.0)
    assert t.requests == 3  # not -17
    both = merge_samples([scrape(old), scrape(new)])
    assert traffic_between({}, both, "a", 1.0).requests == 23


def rec(
    wid: str, model: str = "a", role: str = "aggregated", draining: bool = False
) -> WorkerRecord:
    return WorkerRecord(
        worker_id=wid, model=model, model_path="m", address="tcp://x:1",
        role=WorkerRole.AGGREGATED, kv_blocks_total=100, draining=draining,
    )  # fmt: skip


def test_pools_count_live_starting_and_draining_workers() -> None:
    cfg = load_config(None, models=[{"name": "a", "path": "m"}])
    key = PoolKey("a", WorkerRole.AGGREGATED)
    records = [rec("w1"), rec("w2"), rec("w3", draining=True), rec("x", model="b")]
    loads = {"w1": LoadMetrics(active_requests=3, waiting_requests=1, kv_blocks_used=50,
                               kv_blocks_total=100)}  # fmt: skip
    managed = [
        ManagedWorker("w2", key, WorkerState.RUNNING, 1.0),
        ManagedWorker("w4", key, WorkerState.RUNNING, 2.0),  # not registered yet
        ManagedWorker("w5", key, WorkerState.DRAINING, 0.5),
    ]
    pool = pools_now(cfg, records, loads, managed)[key]
    assert (pool.live, pool.starting, pool.draining) == (2, 1, 2)
    assert pool.requests == 4 and pool.kv_usage == pytest.approx(0.25)  # w2: no report yet
    assert pool.size == 3
    # Drain the unregistered one first, then the idle registered one; never a draining one.
    loads["w2"] = LoadMetrics(active_requests=0)
    assert victims(key, 3, managed, {r.worker_id for r in records}, loads) == ["w4", "w2"]
