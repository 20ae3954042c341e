"""TensorRT-LLM KV event dicts (KVCacheEventSerializer shape) -> our re-keyed events."""

from __future__ import annotations

from dynamo_gateway_trtllm.kv_events import TrtllmEventTranslator
from trtllm_recorded import CREATED, UPDATED, removed, stored

from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

A = [1, 2, 3, 4]
B = [5, 6, 7, 8]
C = [9, 10, 11, 12]


def test_stored_blocks_are_rekeyed_and_chained_from_the_parent() -> None:
    t = TrtllmEventTranslator("w", 4)
    assert t.translate(CREATED) == []
    first = t.translate(stored(1, None, [(111, A), (222, B)]))
    ours = sequence_hashes(A + B, 4)
    assert [e.data for e in first] == [
        BlockStored(block_hashes=ours, parent_block_hash=None, token_ids=A + B, block_size=4)
    ]
    assert first[0].event_id == 1 and first[0].worker_id == "w"
    second = t.translate(stored(2, 222, [(333, C)]))
    assert second[0].data == BlockStored(
        block_hashes=sequence_hashes(C, 4, ours[-1]),
        parent_block_hash=ours[-1],
        token_ids=C,
        block_size=4,
    )
    gone = t.translate(removed(3, [333, 111]))
    full = sequence_hashes(A + B + C, 4)
    assert gone[0].data == BlockRemoved(block_hashes=[full[2], full[0]])
    assert [e.event_id for e in first + second + gone] == [1, 2, 3]


def test_partial_last_block_is_not_hashed() -> None:
    t = TrtllmEventTranslator("w", 4)
    out = t.translate(stored(0, None, [(111, A), (222, [5, 6])]))
    assert isinstance(out[0].data, BlockStored) and out[0].data.token_ids == A


def test_updated_and_created_emit_nothing_and_leave_no_hole() -> None:
    t = TrtllmEventTranslator("w", 4)
    a = t.translate(stored(8, None, [(111, A)]))
    assert t.translate(UPDATED) == []
    b = t.translate(stored(10, 111, [(222, B)]))
    assert [e.event_id for e in a + b] == [9, 10]


def test_lost_events_leave_a_hole_and_a_restart_clears() -> None:
    t = TrtllmEventTranslator("w", 4)
    a = t.translate(stored(1, None, [(111, A)]))
    b = t.translate(stored(5, 111, [(222, B)]))
    assert b[0].event_id - a[0].event_id == 4  # three lost events
    restart = t.translate(stored(0, None, [(111, A)]))
    assert isinstance(restart[0].data, AllBlocksCleared)
    assert restart[1].event_id == restart[0].event_id + 1


def test_extra_token_ids_and_unknown_parents_are_skipped() -> None:
    t = TrtllmEventTranslator("w", 4)
    assert t.translate(stored(0, None, [(111, A)], extra=7)) == []
    assert t.stats.skipped_extra_keys == 1
    assert t.translate(stored(1, 999, [(222, B)])) == []
    assert t.stats.unknown_parent == 1


def test_host_level_blocks_and_other_dp_ranks() -> None:
    t = TrtllmEventTranslator("w", 4)
    out = t.translate(stored(0, None, [(111, A)], cache_level=1))
    assert isinstance(out[0].data, BlockStored) and out[0].data.medium == "CPU"
    other = {**stored(1, None, [(222, B)]), "attention_dp_rank": 1}
    assert t.translate(other) == [] and t.skipped_rank == 1


def test_undecodable_event_is_a_lost_event() -> None:
    t = TrtllmEventTranslator("w", 4)
    a = t.translate(stored(0, None, [(111, A)]))
    bad = {
        "event_id": 1,
        "data": {"type": "stored", "parent_hash": None, "blocks": [{"tokens": [{}] * 4}]},
    }
    assert t.translate(bad) == []
    b = t.translate(stored(2, 111, [(222, B)]))
    assert b[0].event_id - a[0].event_id == 2 and t.stats.undecodable == 1
