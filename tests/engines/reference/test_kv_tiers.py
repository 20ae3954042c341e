"""The reference engine over KV tiers: evicted blocks come back from host, disk and Redis.

A conversation on a device cache too small to keep it: each turn re-sends the
whole history after an unrelated prompt has pushed it out of the device. With
tiers its earlier turns are onboarded instead of recomputed (``cached_tokens``
says how many), and greedy output is the same as a cold run's, token for token.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from dynamo_gateway.engines.base import EngineContext
from dynamo_gateway.engines.reference.engine import ReferenceEngine
from dynamo_gateway.kvbm.manager import TieredCache
from dynamo_gateway.kvbm.tiers.disk import DiskTier
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.protocol.kv_events import BlockStored, KvEvent
from dynamo_gateway.servers.redis import RedisServer
from dynamo_gateway.settings import load_settings
from dynamo_gateway.testing import collect, engine_request, tokens_of

VOCAB = 2048  # the demo model's
BLOCK = 4
TURNS = 3

Turn = tuple[list[int], int]  # (greedy tokens, cached_tokens)


@pytest.fixture(scope="module")
def card(demo_model: Path) -> ModelCard:
    return ModelCard.load(demo_model)


@asynccontextmanager
async def engine(
    card: ModelCard,
    kvbm: dict[str, Any],
    *,
    worker: str = "w0",
    events: list[KvEvent] | None = None,
) -> AsyncIterator[ReferenceEngine]:
    settings = load_settings(
        None,
        reference={"device": "cpu", "num_threads": 1},
        cache={"num_kv_blocks": 16, "block_size": BLOCK},
        kvbm=kvbm,
    )
    sink = events.append if events is not None else None
    eng = ReferenceEngine(
        EngineContext(settings=settings, model=card, worker_id=worker, publish_kv_event=sink)
    )
    await eng.start()
    try:
        yield eng
    finally:
        await eng.aclose()


def tiers_of(eng: ReferenceEngine) -> TieredCache:
    tiers = eng.kv_tiers
    assert tiers is not None
    return tiers


def words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(5, VOCAB) for _ in range(n)]


async def converse(eng: ReferenceEngine, seed: int = 1, turns: int = TURNS) -> list[Turn]:
    """Turns of one conversation, an unrelated prompt between them (it evicts the device)."""
    rng = random.Random(seed)
    history = words(rng, 20)
    out: list[Turn] = []
    for turn in range(turns):
        reply = await collect(eng, greedy(f"s{seed}-t{turn}", history, 6))
        out.append((tokens_of(reply), reply[0].cached_tokens))
        history = history + tokens_of(reply) + words(rng, 4)
        await collect(eng, greedy(f"s{seed}-x{turn}", words(rng, 60), 2))
        if eng.kv_tiers is not None:
            assert eng.kv_tiers.flush()
    return out


def greedy(rid: str, prompt: list[int], n: int) -> Any:
    return engine_request(rid, prompt, n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cold(card: ModelCard) -> list[Turn]:
    async def run() -> list[Turn]:
        async with engine(card, {}) as eng:
            return await converse(eng)

    turns = asyncio.run(run())
    assert all(cached == 0 for _, cached in turns), "the device alone keeps nothing here"
    return turns


@pytest.mark.parametrize("tier", ["host", "disk", "redis"])
async def test_a_conversation_is_onboarded_from_each_tier(
    card: ModelCard, cold: list[Turn], tier: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    kvbm: dict[str, Any]
    if tier == "host":
        kvbm = {"host_cache_gb": 0.01}
    elif tier == "disk":
        kvbm = {"disk_cache_dir": str(tmp_path), "disk_cache_gb": 0.01}
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        kvbm = {"remote_url": server.url}
    async with engine(card, kvbm) as eng:
        turns = await converse(eng)
        stats = tiers_of(eng).stats
    assert [t for t, _ in turns] == [t for t, _ in cold]  # token for token
    assert turns[0][1] == 0
    assert all(cached >= 4 * BLOCK for _, cached in turns[1:]), turns
    assert list(stats) == [tier]
    assert stats[tier].onboarded_blocks * BLOCK >= sum(cached for _, cached in turns)
    assert stats[tier].rejected_blocks == 0


async def test_host_too_small_spills_to_disk(
    card: ModelCard, cold: list[Turn], tmp_path: Path
) -> None:
    kvbm = {"host_cache_gb": 2e-5, "disk_cache_dir": str(tmp_path), "disk_cache_gb": 0.01}
    async with engine(card, kvbm) as eng:
        capacity = tiers_of(eng).tier("host").capacity_blocks
        turns = await converse(eng)
        stats = tiers_of(eng).stats
    assert capacity is not None and capacity < 16
    assert [t for t, _ in turns] == [t for t, _ in cold]
    assert all(cached >= 4 * BLOCK for _, cached in turns[1:]), turns
    assert stats["disk"].offloaded_blocks > 0 and stats["disk"].onboarded_blocks > 0
    assert stats["host"].onboarded_blocks > 0


async def test_cross_worker_reuse_through_redis(card: ModelCard, redis_server: RedisServer) -> None:
    rng = random.Random(7)
    history = words(rng, 40)
    async with engine(card, {}) as eng:
        expected = tokens_of(await collect(eng, greedy("cold", history, 8)))
    kvbm = {"remote_url": redis_server.url}
    async with engine(card, kvbm, worker="w0") as first, engine(card, kvbm, worker="w1") as second:
        await collect(first, greedy("w0", [*history[:32], 9, 9, 9], 2))  # w0 computes the head
        assert tiers_of(first).flush()
        moved = await collect(second, greedy("w1", history, 8))  # the conversation moves
        stats = tiers_of(second).stats["redis"]
    assert tokens_of(moved) == expected
    assert moved[0].cached_tokens == 32  # 8 blocks w0 left in Redis
    assert stats.onboarded_blocks == 8


async def test_damaged_disk_and_redis_blocks_are_recomputed(
    card: ModelCard, cold: list[Turn], tmp_path: Path, redis_server: RedisServer
) -> None:
    import redis

    kvbm = {"disk_cache_dir": str(tmp_path), "remote_url": redis_server.url}
    client = redis.Redis.from_url(redis_server.url)
    async with engine(card, kvbm) as eng:
        tiers = tiers_of(eng)
        disk = tiers.tier("disk")
        assert isinstance(disk, DiskTier)
        rng = random.Random(1)
        history = words(rng, 20)
        first = await collect(eng, greedy("t0", history, 6))
        history = history + tokens_of(first) + words(rng, 4)
        await collect(eng, greedy("x0", words(rng, 60), 2))
        assert tiers.flush()
        # Rot every block on disk and in Redis: flip a byte, truncate, or swap in another.
        paths = sorted(disk.directory.glob("*/*.kv"))
        assert paths
        for i, path in enumerate(paths):
            data = path.read_bytes()
            path.write_bytes(data[:-5] if i % 2 else data[:-1] + bytes([data[-1] ^ 0xFF]))
        keys = sorted(client.scan_iter(match="dgw:kv:*"))
        assert keys
        for i, key in enumerate(keys):
            value = client.get(key)
            assert isinstance(value, bytes)
            client.set(key, value[:100] if i % 2 else client.get(keys[(i + 1) % len(keys)]))
        second = await collect(eng, greedy("t1", history, 6))
        stats = tiers.stats
    client.close()
    assert tokens_of(first) == cold[0][0]
    assert tokens_of(second) == cold[1][0]  # recomputed, never read back
    assert second[0].cached_tokens == 0
    assert stats["disk"].rejected_blocks + stats["redis"].rejected_blocks >= 1
    assert stats["disk"].onboarded_blocks == 0 and stats["redis"].onboarded_blocks == 0


async def test_redis_going_away_mid_run_loses_no_request(
    card: ModelCard, cold: list[Turn], redis_server: RedisServer
) -> None:
    kvbm = {"host_cache_gb": 0.01, "remote_url": redis_server.url}
    async with engine(card, kvbm) as eng:
        before = await converse(eng, seed=1, turns=1)
        redis_server.kill()
        after = await converse(eng, seed=1, turns=TURNS)  # the same conversation again
        stats = tiers_of(eng).stats
    assert before[0][0] == cold[0][0]
    assert [t for t, _ in after] == [t for t, _ in cold]
    assert stats["redis"].errors > 0
    assert stats["host"].onboarded_blocks > 0  # the host tier kept serving


async def test_host_and_disk_too_small_fall_back_to_redis(
    card: ModelCard, cold: list[Turn], tmp_path: Path, redis_server: RedisServer
) -> None:
    kvbm = {
        "host_cache_gb": 2e-5,
        "disk_cache_dir": str(tmp_path),
        "disk_cache_gb": 2e-5,
        "remote_url": redis_server.url,
    }
    async with engine(card, kvbm) as eng:
        tiers = tiers_of(eng)
        capacities = [tiers.tier(name).capacity_blocks for name in ("host", "disk")]
        turns = await converse(eng)
        stats = tiers.stats
    assert all(c is not None and c < 16 for c in capacities), capacities
    assert [t for t, _ in turns] == [t for t, _ in cold]  # token for token
    assert all(cached >= 4 * BLOCK for _, cached in turns[1:]), turns
    # The oldest blocks had left both small tiers: only the shared store still had them.
    assert stats["redis"].onboarded_blocks > 0
    assert sum(stats[name].onboarded_blocks for name in ("host", "disk", "redis")) * BLOCK >= sum(
        cached for _, cached in turns
    )


async def test_redis_killed_with_requests_in_flight_loses_none(
    card: ModelCard, redis_server: RedisServer
) -> None:
    seeds = (11, 12, 13)
    async with engine(card, {}) as eng:
        expected = [[t for t, _ in await converse(eng, seed=s, turns=2)] for s in seeds]
    async with engine(card, {"remote_url": redis_server.url}) as eng:
        runs = [asyncio.create_task(converse(eng, seed=s, turns=2)) for s in seeds]
        while eng.load().active_requests == 0:  # kill it while requests run
            await asyncio.sleep(0.001)
        redis_server.kill()
        got = await asyncio.gather(*runs)
        stats = tiers_of(eng).stats["redis"]
    assert [[t for t, _ in turns] for turns in got] == expected
    assert stats.errors > 0


async def test_tier_events_carry_their_medium_and_the_snapshot_has_them(
    card: ModelCard, tmp_path: Path
) -> None:
    events: list[KvEvent] = []
    kvbm = {
        "host_cache_gb": 0.01,
        "disk_cache_dir": str(tmp_path),
        "offload_policy": "write-through",
    }
    async with engine(card, kvbm, events=events) as eng:
        await converse(eng, turns=2)
        snapshot = eng.kv_snapshot()
        assert events and snapshot.event_id == events[-1].event_id
    ids = [e.event_id for e in events]
    assert ids == list(range(1, len(ids) + 1))
    stored: dict[str, set[int]] = {}
    for e in events:
        if isinstance(e.data, BlockStored):
            stored.setdefault(e.data.medium, set()).update(e.data.block_hashes)
    assert {"GPU", "CPU", "DISK"} <= set(stored)
    in_snapshot: dict[str, set[int]] = {}
    for blk in snapshot.blocks:
        in_snapshot.setdefault(blk.medium, set()).update(blk.block_hashes)
    assert in_snapshot["CPU"] and in_snapshot["CPU"] <= stored["CPU"]
    assert in_snapshot["DISK"] and in_snapshot["DISK"] <= stored["DISK"]
