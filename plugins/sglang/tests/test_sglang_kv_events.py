"""SGLang's KV events, encoded as its publisher encodes them, through our decoder and
vLLM's translator (re-keyed by our sequence hashes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import sglang_recorded as recorded
import zmq.asyncio
from dynamo_gateway_sglang.kv_events import SglangZmqSubscriber, decode_sglang_event_batch

from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.kv.vllm_events import VllmBlockStored, VllmEventTranslator
from dynamo_gateway.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
)

BS = 4
TOKENS = list(range(100, 112))  # three full pages


def _stored(
    hashes: list[int], parent: int | None, tokens: list[int], **kw: object
) -> recorded.BlockStored:
    return recorded.BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=BS,
        lora_id=None,
        **kw,
    )  # type: ignore[arg-type]


Make = Callable[[list[KvEvent]], SglangZmqSubscriber]


@pytest.fixture
def subscriber() -> Iterator[Make]:
    # handle() is driven directly: no socket, but the subscriber's context must be closed.
    ctx = zmq.asyncio.Context()

    def make(sink: list[KvEvent]) -> SglangZmqSubscriber:
        translator = VllmEventTranslator("w0", BS)
        return SglangZmqSubscriber("ipc:///nonexistent", translator, sink.append, context=ctx)

    yield make
    ctx.term()


def test_decode_keeps_fields_and_salt() -> None:
    batch = decode_sglang_event_batch(
        recorded.frames(
            5,
            [
                _stored([11, 12], None, TOKENS[:8], medium="GPU", session_id="s"),
                _stored([21], None, TOKENS[:4], medium="CPU_PINNED", cache_salt="salt"),
                recorded.BlockRemoved(block_hashes=[12], medium="GPU"),
                recorded.AllBlocksCleared(),
            ],
            dp_rank=1,
        )
    )
    assert batch.seq == 5 and batch.dp_rank == 1 and batch.undecodable == 0
    first, salted, removed, cleared = batch.events
    assert isinstance(first, VllmBlockStored) and first.extra_keys is None
    assert first.block_hashes == [11, 12] and first.token_ids == TOKENS[:8]
    assert isinstance(salted, VllmBlockStored)
    assert salted.extra_keys == ["salt"] and salted.medium == "CPU"
    assert (
        type(removed).__name__ == "VllmBlockRemoved"
        and type(cleared).__name__ == "VllmAllBlocksCleared"
    )


def test_translated_to_our_hashes(subscriber: Make) -> None:
    got: list[KvEvent] = []
    sub = subscriber(got)
    sub.handle(recorded.frames(0, [_stored([11, 12], None, TOKENS[:8], medium="GPU")]))
    sub.handle(recorded.frames(1, [_stored([13], 12, TOKENS[8:12], medium="GPU")]))
    sub.handle(recorded.frames(2, [recorded.BlockRemoved(block_hashes=[13], medium="GPU")]))
    sub.handle(recorded.frames(3, [recorded.AllBlocksCleared()]))
    ours = sequence_hashes(TOKENS, BS)
    assert [e.event_id for e in got] == [1, 2, 3, 4]
    assert got[0].data == BlockStored(
        block_hashes=ours[:2], parent_block_hash=None, token_ids=TOKENS[:8], block_size=BS
    )
    assert got[1].data == BlockStored(
        block_hashes=ours[2:], parent_block_hash=ours[1], token_ids=TOKENS[8:], block_size=BS
    )
    assert got[2].data == BlockRemoved(block_hashes=[ours[2]])
    assert got[3].data == AllBlocksCleared()


def test_salted_and_lora_blocks_are_not_indexed(subscriber: Make) -> None:
    got: list[KvEvent] = []
    sub = subscriber(got)
    sub.handle(
        recorded.frames(
            0,
            [
                _stored([11], None, TOKENS[:4], cache_salt="tenant-a"),
                _stored([31], None, TOKENS[:4], lora_name="adapter"),
            ],
        )
    )
    assert got == []
    assert sub.translator.stats.skipped_extra_keys == 2


def test_bad_messages_leave_holes(subscriber: Make) -> None:
    got: list[KvEvent] = []
    sub = subscriber(got)
    sub.handle([b"", (0).to_bytes(8, "big"), b"\xc1"])  # not msgpack
    sub.handle(recorded.frames(1, [_stored([11], None, TOKENS[:4])]))
    assert sub.decode_errors == 1
    assert [e.event_id for e in got] == [2]  # the lost batch 0 is a hole (id 1) in our ids
    sub.handle([b"only one frame"])
    assert sub.decode_errors == 2
