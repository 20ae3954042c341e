"""Tier-aware KV routing: lower media count less than the device, a shared store for everyone."""

from __future__ import annotations

import random

import pytest

from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.kv.indexer import RadixIndexer
from dynamo_gateway.protocol.kv_events import BlockRemoved, BlockStored, KvEvent
from dynamo_gateway.router.base import RouteRequest, WorkerView
from dynamo_gateway.router.kv import KvRouter
from dynamo_gateway.settings import KvRouterSettings

BS = 4
TOKENS = list(range(8 * BS + 1))
HASHES = sequence_hashes(TOKENS, BS)  # 8 full blocks
WEIGHTS = {"GPU": 1.0, "CPU": 0.75, "DISK": 0.25, "REMOTE": 0.2}


def stored(worker: str, hashes: list[int], medium: str, event_id: int = 1) -> KvEvent:
    return KvEvent(
        worker_id=worker,
        event_id=event_id,
        data=BlockStored(
            block_hashes=hashes, parent_block_hash=None, token_ids=[], block_size=BS, medium=medium
        ),
    )


def test_each_block_counts_its_best_medium_and_the_run_ends_at_a_gap() -> None:
    idx = RadixIndexer()
    idx.apply(stored("a", HASHES[:4], "GPU"))
    idx.apply(stored("a", HASHES[2:6], "CPU"))  # 2, 3 on both: the device counts
    idx.apply(stored("a", HASHES[7:8], "DISK"))  # after a gap at 6: unreachable
    idx.apply(stored("b", HASHES[:2], "DISK"))
    credits, shared = idx.find_tiered_matches(HASHES, WEIGHTS)
    assert credits == {"a": 4 * 1.0 + 2 * 0.75, "b": 2 * 0.25}
    assert shared == 0.0
    # One medium at a time, find_matches still sees only its own.
    assert idx.find_matches(HASHES) == {"a": 4}
    assert idx.find_matches(HASHES, medium="CPU") == {}  # CPU does not start at block 0


def test_a_shared_medium_counts_for_every_worker() -> None:
    idx = RadixIndexer()
    idx.apply(stored("a", HASHES[:6], "REMOTE"))
    idx.apply(stored("b", HASHES[:2], "GPU"))
    credits, shared = idx.find_tiered_matches(HASHES, WEIGHTS, shared=["REMOTE"])
    assert credits["b"] == pytest.approx(2 * 1.0 + 4 * 0.2)  # its device, then the store
    assert credits["a"] == pytest.approx(6 * 0.2)
    assert shared == pytest.approx(6 * 0.2)  # what a worker the index never heard of gets
    idx.apply(
        KvEvent(
            worker_id="a", event_id=2, data=BlockRemoved(block_hashes=HASHES[3:6], medium="REMOTE")
        )
    )
    assert idx.find_tiered_matches(HASHES, WEIGHTS, shared=["REMOTE"])[1] == pytest.approx(0.6)


def route(router: KvRouter, workers: list[str]) -> str:
    views = [WorkerView(w, block_size=BS) for w in workers]
    return router.select(RouteRequest("r", TOKENS), views).worker_id


def test_the_router_prefers_device_over_host_over_cold() -> None:
    router = KvRouter(BS, KvRouterSettings(), rng=random.Random(0))
    router.on_kv_event(stored("host", HASHES, "CPU"))
    assert route(router, ["cold", "host"]) == "host"
    router.on_kv_event(stored("device", HASHES, "GPU"))
    assert route(router, ["cold", "host", "device"]) == "device"
    assert route(router, ["host", "cold"]) == "host"


def test_the_router_sends_a_shared_hit_anywhere_but_keeps_it_below_a_local_one() -> None:
    router = KvRouter(BS, KvRouterSettings(), rng=random.Random(0))
    router.on_kv_event(stored("w0", HASHES, "REMOTE"))
    # Every worker reaches the store: equal credit, so a load tie-break decides.
    picks = {route(router, ["w0", "w1", "new"]) for _ in range(20)}
    assert len(picks) > 1
    router.on_kv_event(stored("w1", HASHES[:4], "CPU"))
    assert route(router, ["w0", "w1", "new"]) == "w1"


def test_the_weights_are_settings() -> None:
    settings = KvRouterSettings(tier_weights={"GPU": 1.0, "CPU": 0.0})
    router = KvRouter(BS, settings, rng=random.Random(0))
    router.on_kv_event(stored("host", HASHES, "CPU"))
    picks = {route(router, ["cold", "host"]) for _ in range(20)}
    assert picks == {"cold", "host"}  # a host hit is worth nothing here: a tie
