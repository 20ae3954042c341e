"""SGLang's KV events, decoded and handed to the vLLM translator we already have.

SGLang (``kv_events_config='{"publisher": "zmq", "endpoint": ...}'``) publishes
the same framing as vLLM (`ZmqEventPublisher`, sglang/srt/disaggregation/
kv_events.py): ``[topic, seq (8-byte big-endian), payload]``, the payload being
msgpack of ``EventBatch`` ``[ts, events, attn_dp_rank]`` and each event a map
tagged by ``"type"`` (``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``).

The fields differ from vLLM's in one way that matters: SGLang's ``BlockStored``
carries ``cache_salt`` (and ``session_id``), which vLLM's decoder would drop. A
salted block can only be hit by requests with the same salt, so it must not be
indexed under plain token hashes; this decoder keeps the salt and passes it to
`VllmEventTranslator` as the block's extra key, which skips such blocks. Apart
from that the events map one to one onto vLLM's, so re-keying by our sequence
hashes, parent links, removals, seq gaps and restarts are the translator's.
SGLang's ``CPU_PINNED`` medium is reported as ``CPU`` (what vLLM calls it).
"""

from __future__ import annotations

import logging

import msgspec

from dynamo_gateway.kv.vllm_events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEvent,
    VllmEventBatch,
    VllmEventDecodeError,
    VllmZmqSubscriber,
    split_event_frames,
)

__all__ = [
    "SglangAllBlocksCleared",
    "SglangBlockRemoved",
    "SglangBlockStored",
    "SglangZmqSubscriber",
    "decode_sglang_event_batch",
    "to_vllm_event",
]

log = logging.getLogger(__name__)

_MEDIUM = {"CPU_PINNED": "CPU"}


# Field names and order follow sglang/srt/disaggregation/kv_events.py (0.5.23).
class SglangBlockStored(msgspec.Struct, frozen=True, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    cache_salt: str | None = None
    session_id: str | None = None
    lora_name: str | None = None


class SglangBlockRemoved(msgspec.Struct, frozen=True, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None = None


class SglangAllBlocksCleared(msgspec.Struct, frozen=True, tag="AllBlocksCleared"):
    pass


class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    attn_dp_rank: int | None = None


_batch_decoder = msgspec.msgpack.Decoder(_Batch)
_event_decoder = msgspec.msgpack.Decoder(
    SglangBlockStored | SglangBlockRemoved | SglangAllBlocksCleared
)


def _medium(medium: str | None) -> str | None:
    return None if medium is None else _MEDIUM.get(medium, medium)


def to_vllm_event(
    event: SglangBlockStored | SglangBlockRemoved | SglangAllBlocksCleared,
) -> VllmEvent:
    """The vLLM-shaped event the translator reads (salted blocks carry the salt)."""
    if isinstance(event, SglangBlockStored):
        salted = event.cache_salt is not None
        return VllmBlockStored(
            block_hashes=list(event.block_hashes),
            parent_block_hash=event.parent_block_hash,
            token_ids=event.token_ids,
            block_size=event.block_size,
            lora_id=event.lora_id,
            medium=_medium(event.medium),
            lora_name=event.lora_name,
            extra_keys=[event.cache_salt] * len(event.block_hashes) if salted else None,
        )
    if isinstance(event, SglangBlockRemoved):
        return VllmBlockRemoved(block_hashes=list(event.block_hashes), medium=_medium(event.medium))
    return VllmAllBlocksCleared()


def decode_sglang_event_batch(frames: list[bytes]) -> VllmEventBatch:
    """Decode ``[topic, seq, payload]``; raises `VllmEventDecodeError`.

    Events that cannot be decoded (an unknown tag, bigram token pairs of EAGLE
    models) are skipped and counted in ``undecodable``.
    """
    topic, seq, payload = split_event_frames(frames)
    try:
        raw = _batch_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise VllmEventDecodeError(f"bad event batch payload: {exc}", seq=seq) from exc
    events: list[VllmEvent] = []
    bad = 0
    for item in raw.events:
        try:
            event = _event_decoder.decode(item)
        except msgspec.DecodeError as exc:
            bad += 1
            log.warning("skipping undecodable SGLang KV event in batch %d: %s", seq, exc)
            continue
        events.append(to_vllm_event(event))
    return VllmEventBatch(
        seq=seq, ts=raw.ts, dp_rank=raw.attn_dp_rank, events=events, topic=topic, undecodable=bad
    )


class SglangZmqSubscriber(VllmZmqSubscriber):
    """`VllmZmqSubscriber` with SGLang's decoder (same socket, same translator)."""

    def handle(self, frames: list[bytes]) -> None:
        try:
            batch = decode_sglang_event_batch(frames)
        except VllmEventDecodeError as exc:
            self.decode_errors += 1
            log.warning("bad SGLang KV event message from %s: %s", self.endpoint, exc)
            if exc.seq is None:
                return
            batch = VllmEventBatch(seq=exc.seq, ts=0.0, dp_rank=None, events=[], undecodable=1)
        for event in self.translator.translate(batch):
            self.sink(event)
