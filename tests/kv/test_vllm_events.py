"""vLLM KV events: frames built by hand in vLLM's layout, decoded and re-keyed."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.kv.indexer import RadixIndexer
from dynamo_gateway.kv.vllm_events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEventBatch,
    VllmEventDecodeError,
    VllmEventTranslator,
    VllmZmqSubscriber,
    decode_vllm_event_batch,
)
from dynamo_gateway.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
)

BS = 4

# -- vLLM's layout, written out by hand ----------------------------------------------------
# vllm/distributed/kv_events.py: EventBatch is array_like ([ts, events, dp_rank]); events
# are tagged structs: arrays with the tag first in older vLLM, maps with a "type" key now.


def stored_array(
    hashes: list[Any], parent: Any, tokens: list[int], medium: str | None = "GPU", **extra: Any
) -> list[Any]:
    return ["BlockStored", hashes, parent, tokens, BS, extra.get("lora_id"), medium]


def stored_map(hashes: list[Any], parent: Any, tokens: list[int], **extra: Any) -> dict[str, Any]:
    event = {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": BS,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    event.update(extra)
    return event


def removed_array(hashes: list[Any], medium: str | None = "GPU") -> list[Any]:
    return ["BlockRemoved", hashes, medium]


def removed_map(hashes: list[Any], **extra: Any) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU", **extra}


def frames(
    seq: int, events: list[Any], *, dp_rank: int | None = 0, topic: bytes = b"kv"
) -> list[bytes]:
    body: list[Any] = [1700000000.5, events] if dp_rank is None else [1700000000.5, events, dp_rank]
    return [topic, seq.to_bytes(8, "big"), msgspec.msgpack.encode(body)]


# -- decoding -------------------------------------------------------------------------------


def test_decode_array_form() -> None:
    batch = decode_vllm_event_batch(
        frames(
            5,
            [
                stored_array([11, 12], None, list(range(8))),
                removed_array([b"\x01" * 32]),
                ["AllBlocksCleared"],
                # A newer vLLM's extra trailing fields are ignored.
                ["BlockStored", [13], 12, [1, 2, 3, 4], BS, None, "CPU", None, None, 0, "full"],
            ],
            dp_rank=None,
        )
    )
    assert (batch.seq, batch.ts, batch.dp_rank, batch.topic) == (5, 1700000000.5, None, b"kv")
    assert batch.events == [
        VllmBlockStored([11, 12], None, list(range(8)), BS, None, "GPU"),
        VllmBlockRemoved([b"\x01" * 32], "GPU"),
        VllmAllBlocksCleared(),
        VllmBlockStored([13], 12, [1, 2, 3, 4], BS, None, "CPU", None, None, 0),
    ]


def test_decode_map_form_with_bytes_hashes() -> None:
    h = [bytes([i]) * 32 for i in range(3)]
    batch = decode_vllm_event_batch(
        frames(
            2**40,
            [
                stored_map(h[:2], None, list(range(8)), group_idx=0, kv_cache_spec_kind="full"),
                removed_map([h[0]]),
                {"type": "AllBlocksCleared"},
            ],
            dp_rank=3,
        )
    )
    assert (batch.seq, batch.dp_rank, batch.undecodable) == (2**40, 3, 0)
    stored, removed, cleared = batch.events
    assert isinstance(stored, VllmBlockStored) and stored.block_hashes == h[:2]
    assert stored.group_idx == 0 and stored.parent_block_hash is None
    assert isinstance(removed, VllmBlockRemoved) and removed.block_hashes == [h[0]]
    assert isinstance(cleared, VllmAllBlocksCleared)


def test_decode_errors() -> None:
    with pytest.raises(VllmEventDecodeError):
        decode_vllm_event_batch([b"", b"\0" * 8])
    with pytest.raises(VllmEventDecodeError):
        decode_vllm_event_batch([b"", b"\0" * 4, msgspec.msgpack.encode([0.0, []])])
    with pytest.raises(VllmEventDecodeError) as info:
        decode_vllm_event_batch([b"", (9).to_bytes(8, "big"), b"\xc1garbage"])
    assert info.value.seq == 9
    # An unknown event is skipped and counted; the rest of the batch survives.
    batch = decode_vllm_event_batch(frames(1, [["BlockMoved", 1], ["AllBlocksCleared"]]))
    assert batch.undecodable == 1 and batch.events == [VllmAllBlocksCleared()]


# -- translation ----------------------------------------------------------------------------


def _batch(seq: int, events: list[Any]) -> VllmEventBatch:
    return decode_vllm_event_batch(frames(seq, events))


def test_translation_rekeys_by_our_hashes_and_chains_parents() -> None:
    tr = VllmEventTranslator("w", BS)
    t1, t2 = list(range(8)), list(range(100, 112))
    ours1 = sequence_hashes(t1, BS)
    ours2 = sequence_hashes(t2, BS, parent=ours1[-1])
    out = tr.translate(_batch(0, [stored_array([b"e1", b"e2"], None, t1)]))
    out += tr.translate(_batch(1, [stored_map([b"e3", b"e4", b"e5"], b"e2", t2)]))
    assert [e.event_id for e in out] == [1, 2]
    assert out[0].data == BlockStored(
        block_hashes=ours1, parent_block_hash=None, token_ids=t1, block_size=BS, medium="GPU"
    )
    assert out[1].data == BlockStored(
        block_hashes=ours2, parent_block_hash=ours1[-1], token_ids=t2, block_size=BS, medium="GPU"
    )
    # The whole prompt's hashes, computed in one go, are what the engine now holds.
    assert ours1 + ours2 == sequence_hashes(t1 + t2, BS)

    out = tr.translate(_batch(2, [removed_array([b"e4", b"e5", b"nope"])]))
    assert [e.event_id for e in out] == [3]
    assert out[0].data == BlockRemoved(block_hashes=ours2[1:], medium="GPU")
    assert tr.stats.unknown_removed == 1

    out = tr.translate(_batch(3, [["AllBlocksCleared"], removed_array([b"e1"])]))
    assert [(e.event_id, e.data) for e in out] == [(4, AllBlocksCleared())]
    assert tr.num_mapped() == 0 and tr.stats.unknown_removed == 2


def test_translated_events_feed_the_indexer() -> None:
    tr = VllmEventTranslator("w", BS)
    idx = RadixIndexer()
    prompt = list(range(32))
    for e in tr.translate(_batch(0, [stored_array([1, 2, 3], None, prompt[:12])])):
        idx.apply(e)
    for e in tr.translate(_batch(1, [stored_array([4, 5], 3, prompt[12:20])])):
        idx.apply(e)
    hashes = sequence_hashes(prompt, BS)
    assert idx.find_matches(hashes) == {"w": 5}
    for e in tr.translate(_batch(2, [removed_array([3])])):
        idx.apply(e)
    assert idx.find_matches(hashes) == {"w": 2}


def test_seq_gaps_become_id_gaps() -> None:
    tr = VllmEventTranslator("w", BS)
    # A late joiner: first batch seen has seq 10 -> id 11, not 1, so the runtime re-syncs.
    out = tr.translate(_batch(10, [["AllBlocksCleared"], ["AllBlocksCleared"]]))
    assert [e.event_id for e in out] == [11, 12]
    out = tr.translate(_batch(11, [["AllBlocksCleared"]]))
    assert [e.event_id for e in out] == [13]
    out = tr.translate(_batch(14, [["AllBlocksCleared"]]))  # seq 12 and 13 lost
    assert [e.event_id for e in out] == [16]
    assert tr.stats.seq_gaps == 1
    # An undecodable event also leaves a hole.
    out = tr.translate(_batch(15, [["Bogus"], ["AllBlocksCleared"]]))
    assert [e.event_id for e in out] == [18]
    # seq going backwards: the publisher restarted with an empty cache.
    tr.translate(_batch(16, [stored_array([1], None, [1, 2, 3, 4])]))
    out = tr.translate(_batch(0, [removed_array([1])]))
    assert [(e.event_id, e.data) for e in out] == [(20, AllBlocksCleared())]
    assert tr.stats.restarts == 1 and tr.stats.unknown_removed == 1


def test_unknown_parent_and_skipped_blocks_are_dropped_with_descendants() -> None:
    tr = VllmEventTranslator("w", BS)
    toks = list(range(8))
    out = tr.translate(
        _batch(
            0,
            [
                stored_array([2], 1, toks[:4]),  # parent 1 never seen
                stored_array([3], 2, toks[4:]),  # ... so its child is unknown too
                stored_map([7], None, toks[:4], lora_name="adapter"),
                stored_map([8], None, toks[:4], extra_keys=[["salt"]]),
                stored_map([9], None, toks[:4], extra_keys=[None]),  # no extra key: kept
                stored_map([10], None, toks[:4], group_idx=1),  # another KV cache group
                stored_map([11], None, toks[:3]),  # not a full block
                removed_map([9], group_idx=1),
            ],
        )
    )
    assert [type(e.data) for e in out] == [BlockStored]
    s = tr.stats
    assert (s.unknown_parent, s.skipped_extra_keys, s.skipped_group, s.malformed) == (2, 2, 2, 1)


def test_media_and_shared_names() -> None:
    tr = VllmEventTranslator("w", BS)
    toks = list(range(8))
    ours = sequence_hashes(toks, BS)
    # Offloaded to CPU: the CPU tier's child names a GPU parent.
    tr.translate(_batch(0, [stored_array([1], None, toks[:4])]))
    out = tr.translate(_batch(1, [stored_array([2], 1, toks[4:], medium="CPU")]))
    assert out[0].data == BlockStored(
        block_hashes=ours[1:],
        parent_block_hash=ours[0],
        token_ids=toks[4:],
        block_size=BS,
        medium="CPU",
    )
    # Two engine names for the same tokens: ours goes only when the last one does.
    tr.translate(_batch(2, [stored_array([5], None, toks[:4])]))
    assert tr.translate(_batch(3, [removed_array([1])])) == []
    out = tr.translate(_batch(4, [removed_array([5])]))
    assert out[0].data == BlockRemoved(block_hashes=ours[:1], medium="GPU")
    # vLLM's medium None means GPU.
    out = tr.translate(_batch(5, [stored_array([6], None, toks[:4], medium=None)]))
    assert out[0].data.medium == "GPU"  # type: ignore[union-attr]


# -- ZMQ round trip -------------------------------------------------------------------------


async def test_zmq_pub_sub_round_trip() -> None:
    ctx = zmq.asyncio.Context()
    # XPUB behaves like vLLM's PUB socket but tells us when the subscription has arrived,
    # so no message is lost to ZMQ's slow-joiner window.
    pub = ctx.socket(zmq.XPUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    received: list[KvEvent] = []
    got_all = asyncio.Event()

    def sink(event: KvEvent) -> None:
        received.append(event)
        if len(received) == 3:
            got_all.set()

    tr = VllmEventTranslator("vllm-0", BS)
    toks = list(range(12))
    try:
        async with VllmZmqSubscriber(
            f"tcp://127.0.0.1:{port}", tr, sink, topic="kv", context=ctx
        ) as sub:
            assert await asyncio.wait_for(pub.recv(), 5) == b"\x01kv"
            await pub.send_multipart(frames(0, [stored_array([1, 2], None, toks[:8])]))
            await pub.send_multipart([b"kv", b"bad"])  # undecodable: logged, skipped
            await pub.send_multipart(frames(0, [], topic=b"other"))  # not our topic
            await pub.send_multipart(frames(1, [stored_map([3], 2, toks[8:]), removed_array([1])]))
            await asyncio.wait_for(got_all.wait(), 5)
        assert sub.decode_errors == 1
        assert [e.event_id for e in received] == [1, 2, 3]
        ours = sequence_hashes(toks, BS)
        assert received[1].data.block_hashes == ours[2:]  # type: ignore[union-attr]
        assert received[2].data == BlockRemoved(block_hashes=ours[:1], medium="GPU")
    finally:
        pub.close(linger=0)
        ctx.term()
