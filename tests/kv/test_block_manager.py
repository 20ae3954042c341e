"""The mocker's KV block pool: prefix hits, ref counts, eviction order, events."""

from __future__ import annotations

import pytest

from dynamo_gateway.kv.block_manager import BlockManager, KvSequence
from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

BS = 4


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def prefill(bm: BlockManager, tokens: list[int], **kw: int) -> KvSequence:
    seq = KvSequence()
    assert bm.allocate(seq, tokens, **kw)
    bm.commit(seq, tokens, len(tokens))
    return seq


def test_allocate_takes_fresh_blocks_in_id_order() -> None:
    bm = BlockManager(8, BS)
    seq = KvSequence()
    assert bm.allocate(seq, toks(0, 9))  # 3 blocks, the last one partial
    assert seq.block_ids == [0, 1, 2]
    assert seq.num_cached_tokens == 0
    assert (bm.num_used, bm.num_free) == (3, 5)
    assert bm.drain_events() == []  # nothing computed yet, nothing stored


def test_commit_stores_full_blocks_with_hashes_parents_and_tokens() -> None:
    bm = BlockManager(8, BS)
    tokens = toks(100, 10)
    seq = KvSequence()
    assert bm.allocate(seq, tokens, 12)
    bm.commit(seq, tokens, 5)  # a chunk: one block full
    bm.commit(seq, tokens, 10)  # the rest: one more block full, one partial
    expected = sequence_hashes(tokens, BS)
    assert bm.drain_events() == [
        BlockStored(
            block_hashes=[expected[0]], parent_block_hash=None, token_ids=tokens[:4], block_size=BS
        ),
        BlockStored(
            block_hashes=[expected[1]],
            parent_block_hash=expected[0],
            token_ids=tokens[4:8],
            block_size=BS,
        ),
    ]
    # Decode appends: the third block fills and is stored, continuing the chain.
    tokens += [7, 7]
    bm.commit(seq, tokens, 12)
    full = sequence_hashes(tokens, BS)
    (ev,) = bm.drain_events()
    assert ev == BlockStored(
        block_hashes=[full[2]], parent_block_hash=full[1], token_ids=tokens[8:12], block_size=BS
    )
    assert ev.medium == "GPU"
    assert [bm.block_hash(b) for b in seq.block_ids] == full


def test_one_commit_reports_consecutive_blocks_in_one_event() -> None:
    bm = BlockManager(8, BS)
    tokens = toks(0, 13)
    prefill(bm, tokens)
    (ev,) = bm.drain_events()
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == sequence_hashes(tokens, BS)
    assert ev.token_ids == tokens[:12]


def test_prefix_hit_shares_blocks_and_counts_cached_tokens() -> None:
    bm = BlockManager(16, BS)
    a = prefill(bm, toks(0, 10))
    bm.drain_events()
    b_tokens = [*toks(0, 8), 99, 98, 97]  # shares two full blocks with a
    b = KvSequence()
    assert bm.allocate(b, b_tokens)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] not in a.block_ids
    assert b.num_cached_tokens == 8
    assert bm.cached_prefix_tokens(b_tokens) == 8
    assert [bm.ref_count(x) for x in a.block_ids] == [2, 2, 1]
    assert bm.num_used == 4
    # Committing b's prefix must not store the shared blocks again.
    bm.commit(b, b_tokens, len(b_tokens))
    assert bm.drain_events() == []


def test_fully_cached_aligned_prompt_computes_its_last_block() -> None:
    bm = BlockManager(16, BS)
    tokens = toks(0, 12)
    a = prefill(bm, tokens)
    bm.drain_events()
    b = KvSequence()
    assert bm.allocate(b, tokens)
    # Rule: at least one token is computed, so one block less than fully cached.
    assert b.num_cached_tokens == 8
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    # Its recomputed last block has a hash that is already cached: no duplicate event.
    bm.commit(b, tokens, 12)
    assert bm.drain_events() == []
    assert bm.block_hash(b.block_ids[2]) is None
    assert bm.num_cached == 3
    # One token past the boundary and all three blocks are hits.
    c = KvSequence()
    assert bm.allocate(c, [*tokens, 5])
    assert c.num_cached_tokens == 12
    assert c.block_ids[:3] == a.block_ids


def test_duplicate_computed_concurrently_is_stored_once() -> None:
    bm = BlockManager(16, BS)
    tokens = toks(0, 9)
    a, b = KvSequence(), KvSequence()
    assert bm.allocate(a, tokens)
    assert bm.allocate(b, tokens)  # a has stored nothing yet: no hits
    assert b.num_cached_tokens == 0
    bm.commit(a, tokens, 9)
    bm.commit(b, tokens, 9)
    events = bm.drain_events()
    assert len(events) == 1
    assert isinstance(events[0], BlockStored)
    assert events[0].block_hashes == sequence_hashes(tokens, BS)
    # b's copies are uncached, so freeing b puts them on the uncached stack.
    bm.free(b)
    assert bm.eviction_order() == []
    a_blocks = list(a.block_ids)
    bm.free(a)
    assert bm.eviction_order() == [a_blocks[1], a_blocks[0]]


def test_free_keeps_blocks_cached_and_orders_lru_tail_first() -> None:
    bm = BlockManager(8, BS)
    a = prefill(bm, toks(0, 12))  # blocks 0,1,2 all full
    a_blocks = list(a.block_ids)
    b = prefill(bm, toks(50, 8))  # blocks 3,4
    b_blocks = list(b.block_ids)
    bm.free(a)
    bm.free(b)
    assert a.block_ids == []
    # Sequences in free order; within one, the last block first.
    assert bm.eviction_order() == [2, 1, 0, 4, 3]
    assert a_blocks == [0, 1, 2] and b_blocks == [3, 4]
    assert (bm.num_used, bm.num_free, bm.num_cached) == (0, 8, 5)


def test_eviction_uses_uncached_blocks_first_then_lru_head() -> None:
    bm = BlockManager(8, BS)
    a_tokens, b_tokens = toks(0, 12), toks(50, 8)
    a = prefill(bm, a_tokens)
    b = prefill(bm, b_tokens)
    bm.free(a)
    bm.free(b)
    bm.drain_events()
    a_hashes = sequence_hashes(a_tokens, BS)
    b_hashes = sequence_hashes(b_tokens, BS)

    c = KvSequence()
    assert bm.allocate(c, toks(200, 20))  # 5 blocks: 5,6,7 never used, then evict 2, 1
    assert c.block_ids == [5, 6, 7, 2, 1]
    assert bm.drain_events() == [BlockRemoved(block_hashes=[a_hashes[2], a_hashes[1]])]
    assert bm.eviction_order() == [0, 4, 3]
    # a's first block survived: still a one-block prefix hit.
    assert bm.cached_prefix_tokens(a_tokens) == 4
    assert bm.cached_prefix_tokens(b_tokens) == 4  # capped: b is block-aligned

    d = KvSequence()
    assert bm.allocate(d, toks(300, 8))
    assert d.block_ids == [0, 4]
    assert bm.drain_events() == [BlockRemoved(block_hashes=[a_hashes[0], b_hashes[1]])]
    assert not bm.can_allocate(2)
    assert bm.can_allocate(1)


def test_freed_uncached_blocks_are_reused_before_never_used_ones() -> None:
    bm = BlockManager(8, BS)
    a = KvSequence()
    assert bm.allocate(a, toks(0, 6))  # blocks 0, 1; nothing committed, so uncached
    bm.free(a)  # freed last block first: the stack is [1, 0]
    b = KvSequence()
    assert bm.allocate(b, toks(10, 12))
    assert b.block_ids == [0, 1, 2]
    assert bm.eviction_order() == []
    assert bm.drain_events() == []


def test_prefix_hit_revives_an_evictable_block() -> None:
    bm = BlockManager(4, BS)
    a_tokens = toks(0, 8)
    a = prefill(bm, a_tokens)
    bm.free(a)
    assert bm.eviction_order() == [1, 0]
    b = KvSequence()
    # Needs 3 blocks: 1 hit (block 0, taken out of the LRU) + 2 fresh (2, 3).
    assert bm.allocate(b, [*toks(0, 4), 9, 9, 9, 9, 9])
    assert b.block_ids == [0, 2, 3]
    assert b.num_cached_tokens == 4
    assert bm.eviction_order() == [1]
    assert bm.ref_count(0) == 1


def test_allocate_is_all_or_nothing_and_honours_reserve() -> None:
    bm = BlockManager(4, BS)
    seq = KvSequence()
    assert not bm.allocate(seq, toks(0, 17))  # 5 blocks > 4
    assert seq.block_ids == [] and bm.num_free == 4
    assert not bm.allocate(seq, toks(0, 16), reserve=1)
    assert bm.allocate(seq, toks(0, 12), reserve=1)
    assert bm.num_free == 1
    with pytest.raises(ValueError):
        bm.allocate(seq, toks(0, 4))


def test_revived_hits_count_against_capacity() -> None:
    bm = BlockManager(3, BS)
    a = prefill(bm, toks(0, 8))
    bm.free(a)
    b = KvSequence()
    # 3 blocks needed, 1 of them a hit that sits among the 3 free ones: fits exactly.
    assert bm.allocate(b, [*toks(0, 4), 1, 1, 1, 1, 1])
    assert bm.num_free == 0
    c = KvSequence()
    assert not bm.allocate(c, toks(0, 5))  # its hit (block 0) is referenced, 1 fresh: none free


def test_append_slots_grows_one_block_at_a_time() -> None:
    bm = BlockManager(3, BS)
    seq = KvSequence()
    assert bm.allocate(seq, toks(0, 4))
    assert bm.append_slots(seq, 4)  # no new block needed
    assert seq.block_ids == [0]
    assert bm.append_slots(seq, 5)
    assert bm.append_slots(seq, 12)
    assert seq.block_ids == [0, 1, 2]
    assert not bm.append_slots(seq, 13)
    assert seq.block_ids == [0, 1, 2]


def test_shared_blocks_are_freed_only_by_their_last_user() -> None:
    bm = BlockManager(8, BS)
    a = prefill(bm, toks(0, 9))
    b = prefill(bm, toks(0, 9))
    assert b.block_ids[:2] == a.block_ids[:2]
    shared = a.block_ids[:2]
    bm.free(a)
    assert [bm.ref_count(x) for x in shared] == [1, 1]
    assert bm.num_used == 3  # two shared + b's own last block
    assert bm.eviction_order() == []  # a's last block was uncached (partial)
    bm.free(b)
    assert bm.num_used == 0
    assert bm.eviction_order() == [shared[1], shared[0]]


def test_preempted_sequence_is_reallocated_from_its_own_cache() -> None:
    bm = BlockManager(8, BS)
    tokens = toks(0, 10)
    seq = prefill(bm, tokens)
    bm.drain_events()
    bm.free(seq)
    tokens += [42, 43]
    assert bm.allocate(seq, tokens)
    assert seq.num_cached_tokens == 8
    bm.commit(seq, tokens, 12)
    (ev,) = bm.drain_events()
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == [sequence_hashes(tokens, BS)[2]]
    assert ev.parent_block_hash == sequence_hashes(tokens, BS)[1]


def test_clear_forgets_cache_and_emits_cleared() -> None:
    bm = BlockManager(8, BS)
    a = prefill(bm, toks(0, 8))
    b = prefill(bm, toks(40, 8))
    bm.free(a)
    bm.drain_events()
    bm.clear()
    assert bm.drain_events() == [AllBlocksCleared()]
    assert bm.num_cached == 0
    assert bm.eviction_order() == []
    assert bm.num_used == 2 and bm.num_free == 6  # b keeps its blocks
    assert bm.cached_prefix_tokens([*toks(0, 8), 1]) == 0
    bm.free(b)
    # b's blocks are no longer cached: allocation takes them without BlockRemoved.
    c = KvSequence()
    assert bm.allocate(c, toks(100, 32))
    assert bm.drain_events() == []


def test_record_events_false_records_nothing() -> None:
    bm = BlockManager(2, BS, record_events=False)
    a = prefill(bm, toks(0, 8))
    bm.free(a)
    prefill(bm, toks(10, 8))
    bm.clear()
    assert bm.drain_events() == []


def test_removed_and_stored_keep_their_order() -> None:
    bm = BlockManager(2, BS)
    a = prefill(bm, toks(0, 8))
    bm.free(a)
    bm.drain_events()
    b_tokens = toks(10, 8)
    prefill(bm, b_tokens)  # evicts both of a's blocks, then stores its own
    a_hashes = sequence_hashes(toks(0, 8), BS)
    assert bm.drain_events() == [
        BlockRemoved(block_hashes=[a_hashes[1], a_hashes[0]]),
        BlockStored(
            block_hashes=sequence_hashes(b_tokens, BS),
            parent_block_hash=None,
            token_ids=b_tokens,
            block_size=BS,
        ),
    ]
