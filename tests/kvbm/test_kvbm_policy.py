"""The tiered cache's pure decisions: offload policy, chain routing, LRU capacity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_gateway.kvbm.policy import (
    DEVICE,
    LruIndex,
    Mode,
    TierChain,
    TierPolicy,
    UseCounter,
    parse_offload_policy,
)

WT, WE = Mode.WRITE_THROUGH, Mode.WRITE_ON_EVICT


def test_the_default_policy() -> None:
    policy = parse_offload_policy("")
    assert policy == {
        "host": TierPolicy(WE),
        "disk": TierPolicy(WE),
        "remote": TierPolicy(WT),
    }


def test_one_mode_for_every_tier_and_per_tier_overrides() -> None:
    assert set(parse_offload_policy("write-through").values()) == {TierPolicy(WT)}
    policy = parse_offload_policy("host=write-through, disk=write-on-evict:min-uses=3")
    assert policy["host"] == TierPolicy(WT)
    assert policy["disk"] == TierPolicy(WE, 3)
    assert policy["remote"] == TierPolicy(WT)  # not named: the default


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("write-sometimes", "unknown offload mode 'write-sometimes'"),
        ("gpu=write-through", "unknown tier 'gpu'"),
        ("disk=write-on-evict:min-uses=0", "min-uses=N with N >= 1"),
        ("disk=write-on-evict:often", "min-uses=N"),
        ("host=", "is not tier=mode"),
    ],
)
def test_bad_policies_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_offload_policy(text)


def chain(
    policy: str, local: tuple[str, ...] = ("host", "disk"), remote: str | None = "redis"
) -> TierChain:
    return TierChain(local, remote, parse_offload_policy(policy))


def test_sources_follow_the_chain() -> None:
    c = chain("")
    assert c.tiers() == ("host", "disk", "redis")
    assert c.source("host") == DEVICE
    assert c.source("disk") == "host"
    assert c.source("redis") == DEVICE  # write-through: shared as soon as computed
    assert chain("remote=write-on-evict").source("redis") == "disk"
    assert chain("remote=write-on-evict", local=()).source("redis") == DEVICE
    assert chain("", local=("disk",)).source("disk") == DEVICE


def test_offload_targets_by_transition() -> None:
    c = chain("")
    assert c.offload_targets(DEVICE, evicted=False, uses=1) == ["redis"]  # computed
    assert c.offload_targets(DEVICE, evicted=True, uses=1) == ["host"]
    assert c.offload_targets("host", evicted=True, uses=1) == ["disk"]
    assert c.offload_targets("disk", evicted=True, uses=1) == []
    through = chain("write-through")
    assert through.offload_targets(DEVICE, evicted=False, uses=1) == ["host", "redis"]
    assert through.offload_targets("host", evicted=False, uses=1) == ["disk"]
    assert through.offload_targets(DEVICE, evicted=True, uses=1) == []


def test_the_frequency_filter_keeps_one_off_blocks_off_disk() -> None:
    c = chain("disk=write-on-evict:min-uses=2")
    assert c.offload_targets("host", evicted=True, uses=1) == []
    assert c.offload_targets("host", evicted=True, uses=2) == ["disk"]


def test_lru_index_evicts_the_least_recently_used() -> None:
    lru = LruIndex(3)
    assert [lru.add(h) for h in (1, 2, 3)] == [[], [], []]
    assert lru.touch(1)
    assert lru.add(4) == [2]
    assert lru.add(4) == []  # held: a touch, nothing evicted
    assert lru.order() == [3, 1, 4]
    assert lru.discard(3) and not lru.discard(3)
    assert len(lru) == 2 and 1 in lru and 3 not in lru
    with pytest.raises(ValueError):
        LruIndex(0)


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 16),
    ops=st.lists(st.tuples(st.sampled_from(["add", "touch", "discard"]), st.integers(0, 40))),
)
def test_lru_index_never_exceeds_its_capacity(capacity: int, ops: list[tuple[str, int]]) -> None:
    lru = LruIndex(capacity)
    model: list[int] = []  # least recently used first
    for op, h in ops:
        if op == "add":
            evicted = lru.add(h)
            if h in model:
                model.remove(h)
                assert evicted == []
            else:
                expect = model[: max(len(model) + 1 - capacity, 0)]
                assert evicted == expect
                model = model[len(expect) :]
            model.append(h)
        elif op == "touch":
            assert lru.touch(h) == (h in model)
            if h in model:
                model.remove(h)
                model.append(h)
        else:
            assert lru.discard(h) == (h in model)
            if h in model:
                model.remove(h)
        assert len(lru) <= capacity
        assert lru.order() == model


def test_use_counter_is_bounded() -> None:
    uses = UseCounter(max_entries=2)
    uses.use([1, 2, 1])
    assert uses.count(1) == 2 and uses.count(2) == 1
    uses.use([3])
    assert len(uses) == 2 and uses.count(2) == 0  # the least recent went
