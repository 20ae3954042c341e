"""`TieredCache` over real tiers: where blocks go, what comes back, what events say."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_kvbm_tiers import LAYOUT, block, context

from dynamo_gateway.kvbm.manager import TieredCache
from dynamo_gateway.kvbm.policy import parse_offload_policy
from dynamo_gateway.kvbm.tier import CacheTier
from dynamo_gateway.kvbm.tiers.disk import DiskTier
from dynamo_gateway.kvbm.tiers.host import HostTier
from dynamo_gateway.kvbm.tiers.redis import RedisTier
from dynamo_gateway.protocol.kv_events import BlockRemoved, BlockStored, KvEventData
from dynamo_gateway.servers.redis import RedisServer


def make(tiers: list[CacheTier], policy: str = "") -> TieredCache:
    return TieredCache(tiers, parse_offload_policy(policy), block_size=LAYOUT.block_size)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[TieredCache]:
    cache = make([HostTier(context(), 2), DiskTier(context(), tmp_path, 8)])
    yield cache
    cache.close()


def evict_from_device(cache: TieredCache, h: int) -> None:
    targets = cache.device_targets(h, evicted=True)
    if targets:
        cache.offload(h, (None, [h, h]), block(h), targets)


def media(events: list[KvEventData]) -> list[tuple[str, str, list[int]]]:
    out = []
    for e in events:
        if isinstance(e, BlockStored):
            out.append(("stored", e.medium, e.block_hashes))
        elif isinstance(e, BlockRemoved):
            out.append(("removed", e.medium, e.block_hashes))
    return out


def test_evicted_blocks_cascade_host_then_disk(local: TieredCache) -> None:
    assert local.device_targets(1, evicted=False) == []  # computed: stays on the device
    for h in (1, 2, 3):
        evict_from_device(local, h)
    assert local.flush()
    assert local.tier("host").held() == [2, 3]
    assert local.tier("disk").held() == [1]  # the host let it go: write-on-evict
    assert media(local.drain_events()) == [
        ("stored", "CPU", [1]),
        ("stored", "CPU", [2]),
        ("stored", "CPU", [3]),
        ("removed", "CPU", [1]),
        ("stored", "DISK", [1]),
    ]
    stats = local.stats
    assert (stats["host"].offloaded_blocks, stats["disk"].offloaded_blocks) == (3, 1)


def test_lookup_and_onboard_across_tiers(local: TieredCache) -> None:
    for h in (1, 2, 3):
        evict_from_device(local, h)
    local.flush()
    plan = local.lookup([1, 2, 3, 4], 0)
    assert plan is not None and plan.tiers == ("disk", "host", "host")
    written: dict[int, bytes] = {}
    n = local.onboard(plan, 0, 4, lambda i, payload: written.__setitem__(i, bytes(payload)))
    assert n == 3
    assert written == {i: bytes(block(h)) for i, h in enumerate((1, 2, 3))}
    assert local.stats["disk"].onboarded_blocks == 1
    assert local.stats["host"].onboarded_blocks == 2
    assert local.lookup([9, 1], 0) is None  # the run starts with a miss


def test_a_damaged_block_stops_the_onboard_there(local: TieredCache) -> None:
    for h in (1, 2, 3, 4):
        evict_from_device(local, h)
    local.flush()
    plan = local.lookup([1, 2, 3, 4], 0)
    assert plan is not None and plan.tiers == ("disk", "disk", "host", "host")
    disk = local.tier("disk")
    assert isinstance(disk, DiskTier)
    path = disk.path_of(2)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    local.drain_events()
    n = local.onboard(plan, 0, 4, lambda i, payload: None)
    assert n == 1  # block 1 landed; block 2 is recomputed, and everything after it
    assert local.stats["disk"].rejected_blocks == 1
    assert ("removed", "DISK", [2]) in media(local.drain_events())


def test_the_frequency_filter_keeps_one_off_blocks_off_disk(tmp_path: Path) -> None:
    cache = make(
        [HostTier(context(), 1), DiskTier(context(), tmp_path, 8)],
        "disk=write-on-evict:min-uses=2",
    )
    cache.record_uses([1, 2, 1])  # block 1 came in two prompts, block 2 in one
    for h in (1, 2, 3):
        evict_from_device(cache, h)
    cache.flush()
    assert cache.tier("disk").held() == [1]
    cache.close()


def test_a_full_write_queue_drops_instead_of_blocking(tmp_path: Path) -> None:
    cache = TieredCache(
        [DiskTier(context(), tmp_path, 64)],
        parse_offload_policy("disk=write-through"),
        block_size=LAYOUT.block_size,
        max_pending_writes=1,
    )
    for h in range(50):
        targets = cache.device_targets(h, evicted=False)
        cache.offload(h, (None, ()), block(h), targets)
    cache.flush()
    disk = cache.stats["disk"]
    assert disk.dropped_writes > 0
    assert disk.offloaded_blocks + disk.dropped_writes == 50
    assert len(cache.tier("disk")) == disk.offloaded_blocks
    cache.close()


def test_shared_tier_write_through_and_outage(redis_server: RedisServer) -> None:
    a = make([RedisTier(context(worker="w0"), redis_server.url, retry_s=60)])
    b = make([RedisTier(context(worker="w1"), redis_server.url, retry_s=60)])
    for h in (1, 2):
        targets = a.device_targets(h, evicted=False)
        assert targets == ["redis"]
        a.offload(h, (None, ()), block(h), targets)
    a.flush()
    plan = b.lookup([1, 2, 3], 0)  # another worker finds what the first one wrote
    assert plan is not None and plan.tiers == ("redis", "redis")
    assert b.onboard(plan, 0, 2, lambda i, payload: None) == 2
    assert [blk.block_hashes for blk in a.snapshot()] == [[1], [2]]
    assert all(blk.medium == "REMOTE" for blk in a.snapshot())
    # The store goes away: lookups find nothing, writes fail quietly, both counted.
    redis_server.kill()
    assert b.lookup([1, 2], 0) is None
    a.offload(3, (None, ()), block(3), ["redis"])
    a.flush()
    assert b.stats["redis"].errors >= 1 and a.stats["redis"].errors >= 1
    a.close()
    b.close()


def test_a_block_gone_from_its_planned_tier_comes_from_another(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A small disk tier loses a planned block to this request's own evictions: the
    shared store, which got it written through, still serves it."""
    cache = make([DiskTier(context(), tmp_path, 8), RedisTier(context(), redis_server.url)])
    for h in (1, 2, 3):
        targets = cache.device_targets(h, evicted=False)
        assert targets == ["redis"]
        cache.offload(h, (None, ()), block(h), targets)
        cache.offload(h, (None, ()), block(h), ["disk"])
    assert cache.flush()
    plan = cache.lookup([1, 2, 3], 0)
    assert plan is not None and plan.tiers == ("disk", "disk", "disk")
    cache.tier("disk").discard(2)
    written: dict[int, bytes] = {}
    assert cache.onboard(plan, 0, 3, lambda i, p: written.__setitem__(i, bytes(p))) == 3
    assert written[1] == bytes(block(2))
    assert cache.stats["redis"].onboarded_blocks == 1
    cache.close()
