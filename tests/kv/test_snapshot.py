"""Prefix-cache snapshots: `BlockManager.snapshot()` and the engines' `kv_snapshot()`.

A snapshot replayed into an empty consumer must give exactly what a consumer that
saw every event since the start holds: the same hashes, parents and tokens.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_gateway.engines.base import EngineContext
from dynamo_gateway.engines.mocker import MockerEngine
from dynamo_gateway.engines.scheduled import ScheduledEngine
from dynamo_gateway.engines.scheduler import KvEventPublisher
from dynamo_gateway.errors import EngineError
from dynamo_gateway.kv.block_manager import BlockManager, KvSequence
from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventData,
    KvSnapshot,
)
from dynamo_gateway.settings import CacheSettings, MockerSettings, Settings, load_settings
from dynamo_gateway.testing import collect, engine_request

# A consumer's view of one worker: hash -> (parent hash, the block's tokens).
View = dict[int, tuple[int | None, tuple[int, ...]]]


def apply(view: View, data: KvEventData) -> None:
    if isinstance(data, BlockStored):
        bs = data.block_size
        parent = data.parent_block_hash
        for i, h in enumerate(data.block_hashes):
            view[h] = (parent, tuple(data.token_ids[i * bs : (i + 1) * bs]))
            parent = h
    elif isinstance(data, BlockRemoved):
        for h in data.block_hashes:
            view.pop(h, None)
    else:
        view.clear()


def replay(events: Iterable[KvEventData]) -> View:
    view: View = {}
    for data in events:
        apply(view, data)
    return view


def cached_hashes(bm: BlockManager) -> set[int]:
    return {h for b in range(bm.num_blocks) if (h := bm.block_hash(b)) is not None}


def assert_parents_first(blocks: list[BlockStored]) -> None:
    """Every hash once; a block's parent, if it is in the snapshot, comes before it."""
    seen: set[int] = set()
    everything = [h for ev in blocks for h in ev.block_hashes]
    assert len(everything) == len(set(everything))
    for ev in blocks:
        if ev.parent_block_hash in everything:
            assert ev.parent_block_hash in seen
        seen.update(ev.block_hashes)
        assert len(ev.token_ids) == len(ev.block_hashes) * ev.block_size


# -- a random workload on a small pool ------------------------------------------------------


class Workload:
    """Sequences with shared prefixes that prefill in chunks, decode, finish and get evicted."""

    def __init__(self, bm: BlockManager, rng: random.Random) -> None:
        self.bm = bm
        self.rng = rng
        bs = bm.block_size
        self.prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 4 * bs))] for _ in "ab"]
        self.live: list[tuple[KvSequence, list[int], list[int]]] = []  # seq, tokens, [computed]

    def step(self) -> None:
        rng, bm, live = self.rng, self.bm, self.live
        op = rng.random()
        if op < 0.3 or not live:
            tokens = rng.choice(self.prefixes)[: rng.randrange(0, 4 * bm.block_size)]
            tokens = tokens + [
                rng.randrange(50) for _ in range(rng.randrange(1, 3 * bm.block_size))
            ]
            seq = KvSequence()
            if bm.allocate(seq, tokens):
                live.append((seq, tokens, [seq.num_cached_tokens]))
        elif op < 0.75:
            seq, tokens, computed = rng.choice(live)
            if computed[0] < len(tokens):
                computed[0] = min(len(tokens), computed[0] + rng.randrange(1, 3 * bm.block_size))
                bm.commit(seq, tokens, computed[0])
            elif bm.append_slots(seq, len(tokens) + 1):
                tokens.append(rng.randrange(50))
        elif op < 0.98:
            seq, _, _ = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        else:
            bm.clear()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_blocks=st.integers(4, 24),
    block_size=st.sampled_from([1, 2, 4]),
)
def test_snapshot_replays_to_the_same_view_as_every_event(
    seed: int, num_blocks: int, block_size: int
) -> None:
    bm = BlockManager(num_blocks, block_size)
    work = Workload(bm, random.Random(seed))
    view: View = {}
    for _ in range(200):
        work.step()
        for data in bm.drain_events():
            apply(view, data)
        snap = bm.snapshot()
        assert replay(snap) == view
        assert set(view) == cached_hashes(bm)
        assert_parents_first(snap)


def test_snapshot_reflects_events_not_drained_yet() -> None:
    bm = BlockManager(2, 2)
    a = KvSequence()
    assert bm.allocate(a, [1, 2, 3, 4])
    bm.commit(a, [1, 2, 3, 4], 4)
    bm.free(a)
    b = KvSequence()
    assert bm.allocate(b, [5, 6])  # evicts one of a's blocks
    events = bm.drain_events()
    pending_view = replay(events)
    assert replay(bm.snapshot()) == pending_view
    assert any(isinstance(e, BlockRemoved) for e in events)


def test_one_chain_is_one_event_and_branches_start_their_own() -> None:
    bm = BlockManager(16, 2)
    base = [1, 2, 3, 4, 5, 6]
    first = KvSequence()
    assert bm.allocate(first, [*base, 7, 8])
    bm.commit(first, [*base, 7, 8], 8)
    (stored,) = bm.drain_events()
    assert bm.snapshot() == [stored]
    fork = [*base, 9, 9, 9, 9, 0]
    second = KvSequence()
    assert bm.allocate(second, fork)  # hits the first 3 blocks
    bm.commit(second, fork, len(fork))
    hashes = sequence_hashes(fork, 2)
    assert bm.snapshot() == [
        stored,
        BlockStored(
            block_hashes=hashes[3:],
            parent_block_hash=hashes[2],
            token_ids=[9, 9, 9, 9],
            block_size=2,
        ),
    ]


def test_snapshot_after_clear_is_empty_and_record_events_is_required() -> None:
    bm = BlockManager(8, 2)
    seq = KvSequence()
    assert bm.allocate(seq, [1, 2, 3, 4, 5])
    bm.commit(seq, [1, 2, 3, 4, 5], 5)
    assert len(bm.snapshot()) == 1
    bm.clear()
    assert bm.snapshot() == []
    bm.drain_events()
    # Blocks the sequence still holds are not cached any more, even when it commits on.
    bm.commit(seq, [1, 2, 3, 4, 5, 6], 6)
    assert bm.snapshot() == [ev for ev in bm.drain_events() if isinstance(ev, BlockStored)]
    with pytest.raises(RuntimeError, match="record_events"):
        BlockManager(8, 2, record_events=False).snapshot()


def test_evicted_parent_is_named_but_not_stored() -> None:
    bm = BlockManager(5, 2)
    a, b = KvSequence(), KvSequence()
    # Both prefill [1, 2] at the same time: b's copy is a duplicate, its [5, 6] is new.
    assert bm.allocate(a, [1, 2, 9])
    assert bm.allocate(b, [1, 2, 5, 6, 9])
    bm.commit(a, [1, 2, 9], 3)
    bm.commit(b, [1, 2, 5, 6, 9], 5)
    bm.free(a)  # a's [1, 2] becomes evictable while b's child of it stays cached
    c = KvSequence()
    assert bm.allocate(c, [7, 8, 9])  # takes a's partial block, then evicts [1, 2]
    view = replay(bm.drain_events())
    h12, h56 = sequence_hashes([1, 2, 5, 6], 2)
    assert set(view) == {h56} and view[h56] == (h12, (5, 6))
    assert replay(bm.snapshot()) == view


def test_publisher_snapshot_publishes_pending_events_first() -> None:
    published: list[KvEvent] = []
    pub = KvEventPublisher("w", published.append)
    bm = BlockManager(4, 2)
    seq = KvSequence()
    assert bm.allocate(seq, [1, 2, 3])
    bm.commit(seq, [1, 2, 3], 3)  # not drained yet
    snap = pub.snapshot(bm)
    assert [e.event_id for e in published] == [1]
    assert snap.event_id == 1 == pub.last_event_id
    assert replay(snap.blocks) == replay(e.data for e in published)
    # It travels as msgpack.
    wire = msgspec.msgpack.encode(snap)
    assert msgspec.msgpack.decode(wire, type=KvSnapshot) == snap


# -- engines --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def card(demo_model: Path) -> ModelCard:
    return ModelCard.load(demo_model)


def prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts with shared prefixes, so that the cache has hits, forks and evictions."""
    rng = random.Random(seed)
    stems = [[rng.randrange(3, 1000) for _ in range(12)] for _ in range(3)]
    return [
        rng.choice(stems)[: rng.randrange(4, 13)] + [rng.randrange(3, 1000) for _ in range(6)]
        for _ in range(n)
    ]


class Checker:
    """Follows the published events and checks snapshots against them."""

    def __init__(self) -> None:
        self.events: list[KvEvent] = []
        self.view: View = {}
        self.seen = 0
        self.checks = 0

    def publish(self, event: KvEvent) -> None:
        self.events.append(event)

    def check(self, engine: ScheduledEngine) -> KvSnapshot:
        snap = engine.kv_snapshot()
        for event in self.events[self.seen :]:
            apply(self.view, event.data)
        self.seen = len(self.events)
        assert [e.event_id for e in self.events] == list(range(1, len(self.events) + 1))
        assert snap.event_id == len(self.events) == engine.last_kv_event_id
        assert replay(snap.blocks) == self.view
        assert_parents_first(snap.blocks)
        self.checks += 1
        return snap

    async def check_while(self, engine: ScheduledEngine, work: asyncio.Future[Any]) -> None:
        while not work.done():
            self.check(engine)
            await asyncio.sleep(0)


async def run_and_check(engine: ScheduledEngine, checker: Checker, vocab_seed: int) -> None:
    requests = [
        collect(engine, engine_request(f"r{i}", p, 6, temperature=0.0, ignore_eos=True))
        for i, p in enumerate(prompts(12, vocab_seed))
    ]
    work = asyncio.ensure_future(asyncio.gather(*requests))
    await checker.check_while(engine, work)
    await work
    snap = checker.check(engine)
    assert snap.blocks
    assert snap.worker_id == "w0"


async def test_mocker_snapshot_matches_the_event_stream(card: ModelCard) -> None:
    checker = Checker()
    settings = Settings(
        mocker=MockerSettings(speedup=50.0),
        cache=CacheSettings(block_size=4, num_kv_blocks=24),
    )
    engine = MockerEngine(
        EngineContext(
            settings=settings, model=card, worker_id="w0", publish_kv_event=checker.publish
        )
    )
    async with engine:
        await run_and_check(engine, checker, 1)
    assert checker.checks > 2
    assert any(isinstance(e.data, BlockRemoved) for e in checker.events)  # evictions happened
    snap = checker.check(engine)  # after aclose(): cleared
    assert snap.blocks == [] and isinstance(checker.events[-1].data, AllBlocksCleared)


async def test_reference_snapshot_matches_the_event_stream(card: ModelCard) -> None:
    from dynamo_gateway.engines.reference.engine import ReferenceEngine

    checker = Checker()
    settings = load_settings(
        None,
        reference={"device": "cpu", "num_threads": 1},
        cache={"block_size": 4, "num_kv_blocks": 24},
    )
    engine = ReferenceEngine(
        EngineContext(
            settings=settings, model=card, worker_id="w0", publish_kv_event=checker.publish
        )
    )
    async with engine:
        await run_and_check(engine, checker, 2)
        # Off the event loop (the worker thread's side) it refuses.
        with pytest.raises(EngineError, match="event loop"):
            await asyncio.to_thread(engine.kv_snapshot)
    assert checker.checks > 2
    assert checker.check(engine).blocks == []


async def test_kv_snapshot_needs_a_started_engine_that_publishes(card: ModelCard) -> None:
    settings = Settings(mocker=MockerSettings(speedup=1e6))
    silent = MockerEngine(EngineContext(settings=settings, model=card, worker_id="w0"))
    async with silent:
        with pytest.raises(EngineError, match="no KV events"):
            silent.kv_snapshot()
    from dynamo_gateway.engines.reference.engine import ReferenceEngine

    ref = ReferenceEngine(
        EngineContext(settings=settings, model=card, worker_id="w0", publish_kv_event=print)
    )
    with pytest.raises(EngineError):
        ref.kv_snapshot()  # not started: no pool yet
