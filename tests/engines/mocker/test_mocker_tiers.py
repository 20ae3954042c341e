"""The mocker's simulated KV tiers: the same offload/onboard decisions, no bytes, timed reads."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from dynamo_gateway.engines.base import EngineContext
from dynamo_gateway.engines.mocker.engine import MockerEngine
from dynamo_gateway.kvbm.tiers.sim import SimTier
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.protocol.kv_events import BlockStored, KvEvent
from dynamo_gateway.settings import load_settings
from dynamo_gateway.testing import collect, engine_request, tokens_of


@pytest.fixture(scope="module")
def card(demo_model: Path) -> ModelCard:
    return ModelCard.load(demo_model)


@pytest.fixture(autouse=True)
def _fresh_shared_stores() -> None:
    SimTier.forget_shared()


def mocker(
    card: ModelCard,
    kvbm: dict[str, Any],
    *,
    worker: str = "w0",
    events: list[KvEvent] | None = None,
    **sim: Any,
) -> MockerEngine:
    settings = load_settings(
        None,
        cache={"num_kv_blocks": 16, "block_size": 4},
        mocker={"speedup": sim.pop("speedup", 1e4), **sim},
        kvbm=kvbm,
    )
    sink = events.append if events is not None else None
    return MockerEngine(
        EngineContext(settings=settings, model=card, worker_id=worker, publish_kv_event=sink)
    )


def words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(5, 2000) for _ in range(n)]


async def two_turns(engine: MockerEngine, seed: int = 3) -> tuple[int, int]:
    """cached_tokens of a conversation's second turn after the device lost the first."""
    rng = random.Random(seed)
    history = words(rng, 40)
    first = await collect(engine, engine_request("t0", history, 4))
    await collect(engine, engine_request("x", words(rng, 60), 2))  # evicts the device
    second = await collect(engine, engine_request("t1", history + tokens_of(first) + [7], 4))
    return first[0].cached_tokens, second[0].cached_tokens


async def test_without_tiers_the_device_forgets(card: ModelCard) -> None:
    engine = mocker(card, {})
    await engine.start()
    try:
        assert await two_turns(engine) == (0, 0)
        assert engine.kv_tiers is None
    finally:
        await engine.aclose()


@pytest.mark.parametrize(
    ("kvbm", "tier"),
    [
        ({"host_cache_gb": 0.1}, "host"),
        ({"disk_cache_dir": "/nonexistent-sim-only"}, "disk"),
        ({"remote_url": "redis://sim"}, "redis"),
    ],
)
async def test_each_simulated_tier_brings_the_history_back(
    card: ModelCard, kvbm: dict[str, Any], tier: str
) -> None:
    events: list[KvEvent] = []
    engine = mocker(card, kvbm, events=events)
    await engine.start()
    try:
        first, second = await two_turns(engine)
        tiers = engine.kv_tiers
        assert tiers is not None
        stats = tiers.stats[tier]
    finally:
        await engine.aclose()
    assert first == 0 and second == 40  # 10 blocks of the 11 the history fills
    assert stats.onboarded_blocks == 10
    medium = {"host": "CPU", "disk": "DISK", "redis": "REMOTE"}[tier]
    assert any(isinstance(e.data, BlockStored) and e.data.medium == medium for e in events)
    assert not Path("/nonexistent-sim-only").exists()  # simulated: nothing written


async def test_onboarding_takes_simulated_time(card: ModelCard) -> None:
    # Ten blocks of the mocker's default layout at 2 MB/s and speedup 1: seconds.
    slow = mocker(card, {"host_cache_gb": 0.1}, speedup=1, host_tier_gbps=0.002)
    await slow.start()
    try:
        t0 = time.monotonic()
        _, second = await two_turns(slow)
        elapsed = time.monotonic() - t0
    finally:
        await slow.aclose()
    assert second == 40
    assert elapsed > 1.0


async def test_a_simulated_shared_tier_is_shared_by_workers_of_one_process(
    card: ModelCard,
) -> None:
    kvbm = {"remote_url": "redis://sim"}
    a, b = mocker(card, kvbm, worker="a"), mocker(card, kvbm, worker="b")
    await a.start()
    await b.start()
    try:
        rng = random.Random(5)
        history = words(rng, 40)
        await collect(a, engine_request("on-a", history, 2))
        moved = await collect(b, engine_request("on-b", history, 2))
    finally:
        await a.aclose()
        await b.aclose()
    assert moved[0].cached_tokens == 36  # 9 full blocks of the 40 tokens (one is computed)
