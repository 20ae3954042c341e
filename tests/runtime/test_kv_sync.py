"""KvEventSync: ordering, duplicates, gaps, dumps and replay, against a lossless consumer."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_gateway.engines.scheduler import KvEventPublisher
from dynamo_gateway.kv.block_manager import BlockManager, KvSequence
from dynamo_gateway.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventData,
    KvSnapshot,
)
from dynamo_gateway.runtime.kv_sync import KvEventSync, engine_kv_snapshot

W = "w0"


def apply(view: set[int], data: KvEventData) -> None:
    if isinstance(data, BlockStored):
        view.update(data.block_hashes)
    elif isinstance(data, BlockRemoved):
        view.difference_update(data.block_hashes)
    else:
        view.clear()


class Router:
    """The consumer: a set of hashes per worker, and what it was given."""

    def __init__(self) -> None:
        self.views: dict[str, set[int]] = {}
        self.delivered: list[KvEvent] = []
        self.fail_next = False

    def deliver(self, event: KvEvent) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("router bug")
        self.delivered.append(event)
        apply(self.views.setdefault(event.worker_id, set()), event.data)


class Harness:
    """A KvEventSync over a Router, with the dump requests it made."""

    def __init__(self, *, max_buffered: int = 10_000, from_start: bool = True) -> None:
        self.router = Router()
        self.requests: list[str] = []
        self.sync = KvEventSync(
            self.router.deliver,
            self.requests.append,
            max_buffered=max_buffered,
            from_start=from_start,
        )

    def view(self, worker: str = W) -> set[int]:
        return self.router.views.get(worker, set())


def stored(*hashes: int) -> BlockStored:
    return BlockStored(
        block_hashes=list(hashes), parent_block_hash=None, token_ids=[], block_size=0
    )


def removed(*hashes: int) -> BlockRemoved:
    return BlockRemoved(block_hashes=list(hashes))


def ev(event_id: int, data: KvEventData, worker: str = W) -> KvEvent:
    return KvEvent(worker_id=worker, event_id=event_id, data=data)


def snap(event_id: int, *hashes: int, worker: str = W) -> KvSnapshot:
    return KvSnapshot(worker_id=worker, event_id=event_id, blocks=[stored(h) for h in hashes])


# Event i (1-based) of a worker's stream, and the worker's true state after each.
STREAM: list[KvEventData] = [
    stored(1, 2),
    stored(3),
    removed(1),
    stored(4),
    removed(2, 3),
    stored(5),
    stored(6),
    removed(4),
]


def truth(upto: int) -> set[int]:
    view: set[int] = set()
    for data in STREAM[:upto]:
        apply(view, data)
    return view


def test_a_stream_from_the_start_is_delivered_in_order_without_a_dump() -> None:
    h = Harness()
    for i, data in enumerate(STREAM, 1):
        h.sync.on_event(ev(i, data))
    assert h.requests == []
    assert h.view() == truth(len(STREAM))
    # First an AllBlocksCleared (id 0) for a view the router may still hold, then the stream.
    assert [e.event_id for e in h.router.delivered] == list(range(len(STREAM) + 1))
    assert h.router.delivered[0].data == AllBlocksCleared()
    assert h.sync.is_synced(W) and h.sync.last_event_id(W) == len(STREAM)
    assert h.sync.events_delivered == len(STREAM)


def test_duplicates_are_dropped() -> None:
    h = Harness()
    for i in (1, 2, 2, 1, 3, 3):
        h.sync.on_event(ev(i, STREAM[i - 1]))
    assert [e.event_id for e in h.router.delivered] == [0, 1, 2, 3]
    assert h.sync.duplicates_dropped == 3
    assert h.view() == truth(3)


def test_gap_asks_one_dump_holds_events_and_replays_them_after_the_snapshot() -> None:
    h = Harness()
    for i in (1, 2, 3, 5, 6, 7):  # event 4 is lost
        h.sync.on_event(ev(i, STREAM[i - 1]))
    assert h.requests == [W]  # once, not per held event
    assert h.sync.gaps == 1 and h.sync.dumps_requested == 1
    assert h.sync.num_buffered(W) == 3 and h.sync.dump_pending(W)
    assert h.view() == truth(3)  # nothing past the gap yet
    h.sync.on_event(ev(8, STREAM[7]))
    # The worker served the dump after publishing event 5 (so 5 is covered).
    h.sync.on_snapshot(snap(5, *sorted(truth(5))))
    assert h.view() == truth(8)
    assert h.sync.is_synced(W) and h.sync.last_event_id(W) == 8
    assert not h.sync.dump_pending(W)
    cleared = [e for e in h.router.delivered if isinstance(e.data, AllBlocksCleared)]
    assert [e.event_id for e in cleared] == [0, 5]
    assert h.sync.snapshots_applied == 1


def test_unknown_worker_mid_stream_is_dumped_before_anything_is_delivered() -> None:
    h = Harness()
    h.sync.on_event(ev(4, STREAM[3]))
    h.sync.on_event(ev(5, STREAM[4]))
    assert h.requests == [W] and h.router.delivered == []
    assert h.sync.gaps == 0  # not a gap: the worker was unknown
    h.sync.on_snapshot(snap(3, *sorted(truth(3))))
    assert h.view() == truth(5) and h.sync.is_synced(W)


def test_without_from_start_even_event_one_asks_for_a_dump() -> None:
    h = Harness(from_start=False)
    h.sync.on_event(ev(1, STREAM[0]))
    assert h.requests == [W] and h.router.delivered == []
    h.sync.on_snapshot(snap(0))
    assert h.view() == truth(1)


def test_worker_added_is_dumped_even_when_idle() -> None:
    h = Harness()
    h.sync.worker_added(W)
    h.sync.worker_added(W)  # a changed record: still one request
    assert h.requests == [W]
    h.sync.on_snapshot(snap(6, *sorted(truth(6))))
    assert h.view() == truth(6) and h.sync.last_event_id(W) == 6
    h.sync.worker_added(W)  # known now: nothing to do
    assert h.requests == [W]
    h.sync.on_event(ev(7, STREAM[6]))
    assert h.view() == truth(7)


def test_failed_dump_is_retried_by_the_next_event_or_retry_dumps() -> None:
    h = Harness()
    h.sync.on_event(ev(1, STREAM[0]))
    h.sync.on_event(ev(3, STREAM[2]))
    assert h.requests == [W]
    h.sync.on_dump_failed(W)
    assert h.sync.dumps_failed == 1 and not h.sync.dump_pending(W)
    assert h.sync.unsynced_workers() == [W]
    h.sync.on_event(ev(4, STREAM[3]))  # the next event asks again
    assert h.requests == [W, W]
    h.sync.on_dump_failed(W)
    assert h.sync.retry_dumps() == 1  # an owner's timer asks again
    assert h.requests == [W, W, W] and h.sync.retry_dumps() == 0
    h.sync.on_snapshot(snap(3, *sorted(truth(3))))
    assert h.view() == truth(4) and h.sync.is_synced(W)
    # An idle worker from discovery whose dump failed is retried too.
    h.sync.worker_added("w1")
    h.sync.on_dump_failed("w1")
    assert h.sync.unsynced_workers() == ["w1"]


def test_a_request_that_raises_counts_as_a_failed_dump() -> None:
    router = Router()

    def broken(worker: str) -> None:
        raise OSError("no route")

    sync = KvEventSync(router.deliver, broken)
    sync.on_event(ev(2, STREAM[1]))
    assert sync.dumps_failed == 1 and not sync.dump_pending(W)


def test_buffer_overflow_keeps_the_newest_and_asks_again_if_the_snapshot_is_too_old() -> None:
    h = Harness(max_buffered=2)
    h.sync.on_event(ev(1, STREAM[0]))
    for i in (3, 4, 5, 6):  # 2 is lost; only 5 and 6 stay held
        h.sync.on_event(ev(i, STREAM[i - 1]))
    assert h.sync.buffer_overflows == 2 and h.sync.num_buffered(W) == 2
    assert h.requests == [W]
    # The dump was taken before the held events' predecessor 4: still a hole.
    h.sync.on_snapshot(snap(3, *sorted(truth(3))))
    assert h.requests == [W, W] and h.sync.num_buffered(W) == 2
    assert h.view() == truth(3)
    h.sync.on_snapshot(snap(4, *sorted(truth(4))))
    assert h.view() == truth(6) and h.sync.is_synced(W)


def test_snapshots_that_are_late_unasked_or_not_newer_are_ignored() -> None:
    h = Harness()
    h.sync.on_snapshot(snap(3, 99))  # nobody asked
    assert h.router.delivered == []
    h.sync.on_event(ev(1, STREAM[0]))
    h.sync.on_event(ev(3, STREAM[2]))  # 2 is late, not lost
    h.sync.on_event(ev(2, STREAM[1]))
    assert h.view() == truth(3) and h.sync.is_synced(W)
    n = len(h.router.delivered)
    h.sync.on_snapshot(snap(2, *sorted(truth(2))))  # the answer: older than the view
    assert len(h.router.delivered) == n and h.view() == truth(3)
    assert h.sync.snapshots_ignored == 2 and not h.sync.dump_pending(W)


def test_removed_worker_is_forgotten_and_its_stragglers_ignored() -> None:
    h = Harness()
    h.sync.on_event(ev(1, STREAM[0]))
    h.sync.on_event(ev(3, STREAM[2]))
    h.sync.worker_removed(W)
    assert h.sync.last_event_id(W) is None and h.sync.num_buffered(W) == 0
    h.sync.on_snapshot(snap(3, 1))  # the dump asked before the removal
    h.sync.on_event(ev(4, STREAM[3]))
    assert h.sync.stragglers_ignored == 1 and h.requests == [W]
    assert h.sync.unsynced_workers() == []
    h.sync.worker_added(W)  # back (restarted): rebuilt from a dump
    assert h.requests == [W, W]
    h.sync.on_snapshot(snap(2, 7))
    assert h.view() == {7}


def test_router_error_makes_the_worker_unknown_until_a_dump() -> None:
    h = Harness()
    h.sync.on_event(ev(1, STREAM[0]))
    h.router.fail_next = True
    h.sync.on_event(ev(2, STREAM[1]))
    assert h.sync.deliver_errors == 1 and h.sync.last_event_id(W) is None
    h.sync.on_event(ev(3, STREAM[2]))
    assert h.requests == [W]
    h.sync.on_snapshot(snap(3, *sorted(truth(3))))
    assert h.view() == truth(3) and h.sync.is_synced(W)


def test_heartbeat_finds_a_gap_at_the_end_of_a_burst() -> None:
    h = Harness()
    h.sync.on_heartbeat("idle", 0)  # a fresh idle worker: known and empty, no dump
    assert h.sync.last_event_id("idle") == 0 and h.requests == []
    h.sync.on_event(ev(1, STREAM[0]))
    h.sync.on_heartbeat(W, 1)  # up to date
    assert h.requests == []
    h.sync.on_heartbeat(W, 2)  # event 2 was lost and nothing followed it
    assert h.requests == [W] and h.sync.gaps == 1
    h.sync.on_snapshot(snap(2, *sorted(truth(2))))
    assert h.view() == truth(2)


def test_request_dump_may_answer_synchronously() -> None:
    router = Router()
    published = {"id": 0}
    sync: KvEventSync

    def request(worker: str) -> None:
        # An in-process worker answers at once, with its state now.
        upto = published["id"]
        sync.on_snapshot(snap(upto, *sorted(truth(upto)), worker=worker))

    sync = KvEventSync(router.deliver, request)
    for i in range(1, 9):
        published["id"] = i
        if i not in (2, 6):  # lost
            sync.on_event(ev(i, STREAM[i - 1]))
            assert router.views[W] == truth(i)
    assert sync.dumps_requested == 2 and sync.is_synced(W)


def test_engine_kv_snapshot_is_optional() -> None:
    assert engine_kv_snapshot(object()) is None

    class Engine:
        def kv_snapshot(self) -> KvSnapshot:
            return snap(1, 5)

    assert engine_kv_snapshot(Engine()) == snap(1, 5)
    with pytest.raises(ValueError):
        KvEventSync(print, print, max_buffered=0)


# -- randomized: a lossy channel from real block managers -----------------------------------


class Worker:
    """A block manager under a random workload, numbering its events like an engine."""

    def __init__(self, worker_id: str, rng: random.Random) -> None:
        self.rng = rng
        self.bm = BlockManager(rng.randrange(4, 16), rng.choice([1, 2, 4]))
        self.out: list[KvEvent] = []
        self.pub = KvEventPublisher(worker_id, self.out.append)
        self.truth: set[int] = set()
        self.live: list[tuple[KvSequence, list[int]]] = []

    def step(self) -> list[KvEvent]:
        rng, bm, bs = self.rng, self.bm, self.bm.block_size
        op = rng.random()
        if op < 0.45 or not self.live:
            tokens = [rng.randrange(8) for _ in range(rng.randrange(1, 5 * bs))]
            seq = KvSequence()
            if bm.allocate(seq, tokens):
                bm.commit(seq, tokens, len(tokens))
                self.live.append((seq, tokens))
        elif op < 0.97:
            seq, _ = self.live.pop(rng.randrange(len(self.live)))
            bm.free(seq)
        else:
            bm.clear()
        self.pub.publish(bm.drain_events())
        out = list(self.out)
        self.out.clear()
        for event in out:
            apply(self.truth, event.data)
        return out


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    loss=st.sampled_from([0.0, 0.05, 0.3]),
    dup=st.sampled_from([0.0, 0.1]),
    max_buffered=st.sampled_from([3, 10_000]),
)
def test_lossy_stream_with_dumps_ends_in_the_true_state(
    seed: int, loss: float, dup: float, max_buffered: int
) -> None:
    rng = random.Random(seed)
    workers = {f"w{i}": Worker(f"w{i}", random.Random(rng.random())) for i in range(3)}
    router = Router()
    asked: list[str] = []
    sync = KvEventSync(router.deliver, asked.append, max_buffered=max_buffered)
    # One worker is found by discovery before it publishes; the others by their events.
    sync.worker_added("w2")

    def serve_dumps(fail: float) -> None:
        # Dumps are answered later, from the worker's state at that time.
        while asked and rng.random() < 0.5:
            w = asked.pop(rng.randrange(len(asked)))
            if rng.random() < fail:
                sync.on_dump_failed(w)
            else:
                sync.on_snapshot(workers[w].pub.snapshot(workers[w].bm))

    for _ in range(150):
        worker = rng.choice(list(workers.values()))
        for event in worker.step():
            if rng.random() >= loss:
                sync.on_event(event)
            if rng.random() < dup:
                sync.on_event(event)
        serve_dumps(fail=0.2)
    # Then a quiet period: heartbeats reveal lost tails, dumps succeed.
    for _ in range(1000):
        for w, worker in workers.items():
            sync.on_heartbeat(w, worker.pub.last_event_id)
        if not asked and all(sync.is_synced(w) for w in workers):
            break
        sync.retry_dumps()
        serve_dumps(fail=0.0)
    for w, worker in workers.items():
        assert sync.is_synced(w)
        assert sync.last_event_id(w) == worker.pub.last_event_id
        assert router.views.get(w, set()) == worker.truth
    # Per worker, the router's events never go back in id.
    for w in workers:
        ids = [e.event_id for e in router.delivered if e.worker_id == w]
        assert ids == sorted(ids)
