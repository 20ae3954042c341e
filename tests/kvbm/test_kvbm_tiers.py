"""The built-in tiers on their own: host RAM, block files on disk, a real Redis."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_gateway.disagg.layout import KvLayout
from dynamo_gateway.kvbm.record import namespace_of
from dynamo_gateway.kvbm.tier import CacheTier, TierContext, TierError
from dynamo_gateway.kvbm.tiers.disk import DiskTier
from dynamo_gateway.kvbm.tiers.host import HostTier
from dynamo_gateway.kvbm.tiers.redis import RedisTier
from dynamo_gateway.servers.redis import RedisServer
from dynamo_gateway.settings import load_settings

LAYOUT = KvLayout(num_layers=2, num_kv_heads=1, head_dim=4, block_size=2, dtype="float32")


def context(model: str = "smol", worker: str = "w0", layout: KvLayout = LAYOUT) -> TierContext:
    return TierContext(
        settings=load_settings(None),
        worker_id=worker,
        model=model,
        layout=layout,
        namespace=namespace_of(model, layout),
    )


def block(h: int) -> memoryview:
    """A payload that says which block it is."""
    n = LAYOUT.block_bytes
    return memoryview(bytes((h * 31 + i) % 251 for i in range(n)))


def test_host_tier_lru_dedup_and_evicted_payloads() -> None:
    tier = HostTier(context(), capacity_blocks=2)
    assert tier.put(1, block(1)) == []
    assert tier.put(2, block(2)) == []
    assert tier.put(1, block(1)) == []  # dedup: a touch
    evicted = tier.put(3, block(3), want_evicted=True)
    assert [(h, bytes(p) if p is not None else None) for h, p in evicted] == [(2, bytes(block(2)))]
    assert len(tier) == 2 and tier.held() == [1, 3]
    got = tier.get(1)
    assert got is not None and bytes(got) == bytes(block(1))
    assert tier.get(2) is None
    assert tier.contains([1, 3, 2, 1]) == 2
    with pytest.raises(ValueError, match="bytes"):
        tier.put(9, memoryview(b"short"))


def test_disk_tier_round_trip_eviction_and_restart(tmp_path: Path) -> None:
    tier = DiskTier(context(), tmp_path, capacity_blocks=3)
    for h in (1, 2, 3):
        tier.put(h, block(h))
    evicted = tier.put(4, block(4), want_evicted=True)
    assert [(h, bytes(p) if p is not None else None) for h, p in evicted] == [(1, bytes(block(1)))]
    assert not tier.path_of(1).exists()
    got = tier.get(2)
    assert got is not None and bytes(got) == bytes(block(2))
    # A restarted worker adopts the files (oldest first), leftovers of a torn write go.
    stray = tier.path_of(3).with_name("0000000000000003.123.456.tmp")
    stray.write_bytes(b"half a block")
    again = DiskTier(context(), tmp_path, capacity_blocks=3)
    assert sorted(again.held()) == [2, 3, 4]
    assert not stray.exists()
    assert again.contains([2, 3, 4, 5]) == 3
    # Another model's (or layout's) blocks live under another namespace: not seen.
    other = DiskTier(context(model="other"), tmp_path, capacity_blocks=3)
    assert len(other) == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "swap", "empty"])
def test_disk_tier_never_returns_a_damaged_block(tmp_path: Path, damage: str) -> None:
    tier = DiskTier(context(), tmp_path, capacity_blocks=4)
    tier.put(1, block(1))
    tier.put(2, block(2))
    path = tier.path_of(1)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 7])
    elif damage == "flip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1 :])
    elif damage == "swap":  # block 2's (valid) record under block 1's name: stale
        path.write_bytes(tier.path_of(2).read_bytes())
    else:
        path.write_bytes(b"")
    assert tier.get(1) is None
    assert tier.rejected == 1
    assert not path.exists() and 1 not in tier.held()  # dropped: recomputed next time
    got = tier.get(2)
    assert got is not None and bytes(got) == bytes(block(2))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    capacity=st.integers(1, 6),
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "get", "discard"]), st.integers(0, 12)), max_size=60
    ),
)
def test_local_tiers_hold_their_capacity_and_leak_nothing(
    tmp_path_factory: pytest.TempPathFactory, capacity: int, ops: list[tuple[str, int]]
) -> None:
    root = tmp_path_factory.mktemp("disk")
    tiers: list[HostTier | DiskTier] = [
        HostTier(context(), capacity),
        DiskTier(context(), root, capacity),
    ]
    for tier in tiers:
        for op, h in ops:
            if op == "put":
                tier.put(h, block(h), want_evicted=True)
            elif op == "get":
                got = tier.get(h)
                assert got is None or bytes(got) == bytes(block(h))
            else:
                tier.discard(h)
            assert len(tier) <= capacity
        if isinstance(tier, DiskTier):
            files = sorted(int(p.stem, 16) for p in tier.directory.glob("*/*"))
            assert files == sorted(tier.held())  # no file without an index entry, or back


# -- redis --------------------------------------------------------------------------------


@pytest.fixture
def redis_tier(redis_server: RedisServer) -> RedisTier:
    return RedisTier(context(), redis_server.url, retry_s=0.2)


def test_redis_tier_is_shared_between_workers(redis_server: RedisServer) -> None:
    a = RedisTier(context(worker="w0"), redis_server.url)
    b = RedisTier(context(worker="w1"), redis_server.url)
    a.put(1, block(1))
    a.put(2, block(2))
    assert b.contains([1, 2, 3]) == 2
    got = b.get(2)
    assert got is not None and bytes(got) == bytes(block(2))
    assert a.shared and a.capacity_blocks is None
    # Another model on the same server does not see them.
    other = RedisTier(context(model="other"), redis_server.url)
    assert other.contains([1]) == 0 and other.get(1) is None


def test_redis_tier_drops_damaged_and_stale_values(redis_tier: RedisTier) -> None:
    import redis

    client = redis.Redis.from_url(redis_tier.url)
    redis_tier.put(1, block(1))
    redis_tier.put(2, block(2))
    value = client.get(redis_tier.key(1))
    assert isinstance(value, bytes)
    client.set(redis_tier.key(1), value[:-3])  # truncated
    client.set(redis_tier.key(3), client.get(redis_tier.key(2)))  # block 2 under 3's key
    assert redis_tier.get(1) is None and redis_tier.get(3) is None
    assert redis_tier.rejected == 2
    assert not client.exists(redis_tier.key(1)) and not client.exists(redis_tier.key(3))
    client.close()


def test_redis_down_is_a_tier_error_fast_and_it_comes_back(
    redis_server: RedisServer, redis_tier: RedisTier
) -> None:
    redis_tier.put(1, block(1))
    redis_server.kill()
    t0 = time.monotonic()
    with pytest.raises(TierError):
        redis_tier.get(1)
    with pytest.raises(TierError, match="retrying later"):  # not another connect timeout
        redis_tier.contains([1])
    assert time.monotonic() - t0 < 3
    redis_server.start()
    time.sleep(0.3)  # past retry_s
    assert redis_tier.contains([1]) == 0  # the store came back empty (no persistence)
    redis_tier.put(1, block(1))
    assert redis_tier.contains([1]) == 1


def test_every_builtin_tier_is_a_cache_tier(tmp_path: Path, redis_tier: RedisTier) -> None:
    for tier in (HostTier(context(), 1), DiskTier(context(), tmp_path, 1), redis_tier):
        assert isinstance(tier, CacheTier), tier
