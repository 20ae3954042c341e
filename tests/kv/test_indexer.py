"""RadixIndexer against a brute-force model, plus targeted cases."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.kv.indexer import RadixIndexer
from dynamo_gateway.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventData,
)

BS = 2


def _event(worker: str, data: KvEventData) -> KvEvent:
    return KvEvent(worker_id=worker, event_id=0, data=data)


def _stored(
    worker: str, tokens: list[int], parent: int | None = None, medium: str = "GPU"
) -> KvEvent:
    hashes = sequence_hashes(tokens, BS, parent)
    return _event(
        worker,
        BlockStored(
            block_hashes=hashes,
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=BS,
            medium=medium,
        ),
    )


def _removed(worker: str, hashes: list[int], medium: str = "GPU") -> KvEvent:
    return _event(worker, BlockRemoved(block_hashes=hashes, medium=medium))


class Model:
    """The specification: per worker, a set of hashes; a match is the longest prefix
    of the request that is entirely in the worker's set."""

    def __init__(self) -> None:
        self.held: dict[str, set[int]] = {}

    def apply(self, event: KvEvent) -> None:
        data = event.data
        if isinstance(data, BlockStored):
            self.held.setdefault(event.worker_id, set()).update(data.block_hashes)
        elif isinstance(data, BlockRemoved):
            self.held.get(event.worker_id, set()).difference_update(data.block_hashes)
        else:
            self.held.pop(event.worker_id, None)

    def matches(self, hashes: list[int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for worker, held in self.held.items():
            n = 0
            while n < len(hashes) and hashes[n] in held:
                n += 1
            if n:
                out[worker] = n
        return out


WORKERS = ["w0", "w1", "w2", "w3"]
# A small universe so that prompts share prefixes often: tokens 0-2, up to 6 blocks.
prompts = st.lists(st.integers(0, 2), min_size=BS, max_size=6 * BS)
ops = st.one_of(
    st.tuples(st.just("store"), st.sampled_from(WORKERS), prompts, st.integers(0, 5)),
    st.tuples(st.just("remove"), st.sampled_from(WORKERS), prompts, st.integers(0, 5)),
    st.tuples(st.just("clear"), st.sampled_from(WORKERS), st.just([0]), st.just(0)),
    st.tuples(st.just("remove_worker"), st.sampled_from(WORKERS), st.just([0]), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=40), st.lists(prompts, min_size=1, max_size=5))
def test_matches_brute_force_model(
    script: list[tuple[str, str, list[int], int]], queries: list[list[int]]
) -> None:
    idx = RadixIndexer()
    model = Model()
    for op, worker, tokens, cut in script:
        hashes = sequence_hashes(tokens, BS)
        if op == "store":
            # Store a suffix chained from a prefix, as an engine would (parent first or not).
            cut = min(cut, len(hashes) - 1)
            parent = hashes[cut - 1] if cut else None
            event = _stored(worker, tokens[cut * BS :], parent)
            assert event.data.block_hashes == hashes[cut:]  # type: ignore[union-attr]
        elif op == "remove":
            event = _removed(worker, hashes[cut:] + hashes[: cut // 2])
        elif op == "clear":
            event = _event(worker, AllBlocksCleared())
        else:
            idx.remove_worker(worker)
            model.held.pop(worker, None)
            continue
        idx.apply(event)
        model.apply(event)
        _check_counts(idx, model)
    for tokens in queries + [t for _, _, t, _ in script]:
        hashes = sequence_hashes(tokens, BS)
        want = model.matches(hashes)
        assert idx.find_matches(hashes) == want
        assert idx.find_matches(hashes, early_exit=False) == want


def _check_counts(idx: RadixIndexer, model: Model) -> None:
    assert idx.num_entries == sum(len(s) for s in model.held.values())
    assert idx.num_blocks == len(set().union(*model.held.values()))
    for worker in WORKERS:
        assert idx.blocks_of(worker) == len(model.held.get(worker, ()))


def test_branching_prefixes() -> None:
    idx = RadixIndexer()
    system = list(range(8))  # 4 blocks shared by everyone
    idx.apply(_stored("a", [*system, 100, 101, 102, 103]))
    idx.apply(_stored("b", [*system, 200, 201]))
    idx.apply(_stored("c", system[:4]))
    assert idx.find_matches(sequence_hashes([*system, 100, 101, 102, 103, 5, 5], BS)) == {
        "a": 6,
        "b": 4,
        "c": 2,
    }
    assert idx.find_matches(sequence_hashes([*system, 200, 201], BS)) == {"a": 4, "b": 5, "c": 2}
    assert idx.find_matches(sequence_hashes([9, 9, *system], BS)) == {}
    assert idx.find_matches([]) == {}
    assert idx.num_blocks == 4 + 2 + 1
    assert idx.num_entries == 6 + 5 + 2
    assert idx.workers() == ["a", "b", "c"]


def test_early_exit_stops_at_first_unheld_block() -> None:
    idx = RadixIndexer()
    tokens = list(range(20))
    hashes = sequence_hashes(tokens, BS)
    idx.apply(_stored("a", tokens[:6]))

    class Probe(list[int]):
        """Records which positions find_matches reads."""

        read: list[int]

        def __getitem__(self, i):  # type: ignore[no-untyped-def]
            self.read.append(i)
            return super().__getitem__(i)

    probe = Probe(hashes)
    probe.read = []
    assert idx.find_matches(probe) == {"a": 3}
    assert max(probe.read) == 3  # blocks 0..3 read, the rest never touched
    probe.read = []
    assert idx.find_matches(probe, early_exit=False) == {"a": 3}
    assert max(probe.read) == len(hashes) - 1


def test_removing_a_middle_block_breaks_the_match_there() -> None:
    idx = RadixIndexer()
    tokens = list(range(12))
    hashes = sequence_hashes(tokens, BS)
    idx.apply(_stored("a", tokens))
    idx.apply(_stored("b", tokens))
    idx.apply(_removed("a", [hashes[2]]))
    assert idx.find_matches(hashes) == {"a": 2, "b": 6}
    assert idx.blocks_of("a") == 5  # the later blocks are still held, just unreachable
    idx.apply(_removed("b", [hashes[0]]))
    assert idx.find_matches(hashes) == {"a": 2}


def test_memory_bounded_after_removing_everything() -> None:
    idx = RadixIndexer()
    empty_bytes = idx.approx_bytes()
    for w in range(8):
        for p in range(20):
            tokens = [p % 3] * 8 + [w, p] * 10
            idx.apply(_stored(f"w{w}", tokens))
    assert idx.num_blocks > 100 and idx.approx_bytes() > empty_bytes
    for w in range(8):
        for p in range(20):
            tokens = [p % 3] * 8 + [w, p] * 10
            idx.apply(_removed(f"w{w}", sequence_hashes(tokens, BS)))
    assert idx.num_blocks == 0 and idx.num_entries == 0
    assert all(idx.blocks_of(f"w{w}") == 0 for w in range(8))
    for w in range(4):
        idx.remove_worker(f"w{w}")
    idx.apply(_event("w5", AllBlocksCleared()))
    assert idx.workers() == ["w4", "w6", "w7"]
    idx.clear()
    assert idx.workers() == [] and idx.num_blocks == 0


def test_remove_worker_and_slot_reuse() -> None:
    idx = RadixIndexer()
    tokens = list(range(8))
    hashes = sequence_hashes(tokens, BS)
    for w in ("a", "b", "c"):
        idx.apply(_stored(w, tokens))
    idx.remove_worker("b")
    idx.remove_worker("b")  # unknown: no-op
    assert idx.find_matches(hashes) == {"a": 4, "c": 4}
    idx.apply(_stored("d", tokens[:4]))  # takes b's freed slot; must not inherit b's blocks
    assert idx.find_matches(hashes) == {"a": 4, "c": 4, "d": 2}
    assert idx.blocks_of("d") == 2 and idx.blocks_of("b") == 0


def test_other_media_do_not_touch_gpu_state() -> None:
    idx = RadixIndexer()
    tokens = list(range(8))
    hashes = sequence_hashes(tokens, BS)
    idx.apply(_stored("a", tokens))
    idx.apply(_stored("a", tokens, medium="CPU"))
    idx.apply(_removed("a", hashes, medium="CPU"))
    idx.apply(_stored("b", tokens[:4], medium="DISK"))
    idx.apply(_removed("a", hashes[2:], medium="DISK"))  # a holds nothing on disk: no-op
    assert idx.find_matches(hashes) == {"a": 4}
    assert idx.find_matches(hashes, medium="DISK") == {"b": 2}
    assert idx.find_matches(hashes, medium="CPU") == {}
    assert idx.blocks_of("a") == 4 and idx.blocks_of("a", "CPU") == 0
    assert idx.blocks_of("b", "DISK") == 2
    assert idx.media() == ["DISK", "GPU"]
    assert idx.num_blocks == 6 and idx.num_entries == 6
    idx.apply(_event("b", AllBlocksCleared()))  # every medium
    assert idx.media() == ["GPU"]
    assert idx.find_matches(hashes, medium="DISK") == {}


def test_many_workers_beyond_one_machine_word() -> None:
    idx = RadixIndexer()
    tokens = list(range(40))
    hashes = sequence_hashes(tokens, BS)
    for w in range(200):
        idx.apply(_stored(f"w{w:03}", tokens[: 2 * (1 + w % 20)]))
    got = idx.find_matches(hashes)
    assert got == {f"w{w:03}": 1 + w % 20 for w in range(200)}
    assert idx.approx_bytes() > 0
