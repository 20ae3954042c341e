"""vLLM's KV events: decoding its ZMQ wire format and re-keying them by our hashes.

vLLM (``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
...}'``) publishes on a ZMQ PUB socket one multipart message per batch::

    [topic (utf-8, may be empty), seq (8-byte big-endian uint), payload]

``seq`` counts batches from 0 per publisher (per data-parallel rank). The payload
is msgpack of ``EventBatch`` (msgspec ``array_like``): ``[ts, events]`` or, since
data parallelism, ``[ts, events, dp_rank]``. Each event is a msgspec tagged
struct. Older vLLM made them ``array_like`` too, so an event is an array whose
first item is the tag (``["BlockStored", block_hashes, parent_block_hash,
token_ids, block_size, lora_id, medium, ...]``); current vLLM (checked against
0.32) encodes them as maps with a ``"type"`` key (``{"type": "BlockStored",
"block_hashes": ...}``) and omits fields left at their default. Both forms are
decoded here; fields added after the ones we read are ignored. Block hashes are
ints (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``) or sha256 bytes (newer default).

Engine hashes are opaque to us (their algorithm, seed and extra keys are vLLM's),
so `VllmEventTranslator` re-keys every block by our sequence hash, computed from
the event's ``token_ids`` and chained from the parent's hash, and keeps a map
engine hash -> our hash per medium to translate parent links and removals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgspec
import zmq
import zmq.asyncio

from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventData,
)

__all__ = [
    "EngineHash",
    "TranslatorStats",
    "VllmAllBlocksCleared",
    "VllmBlockRemoved",
    "VllmBlockStored",
    "VllmEvent",
    "VllmEventBatch",
    "VllmEventDecodeError",
    "VllmEventTranslator",
    "VllmZmqSubscriber",
    "decode_vllm_event_batch",
    "split_event_frames",
]

log = logging.getLogger(__name__)

EngineHash: TypeAlias = int | bytes


# -- wire structs -------------------------------------------------------------------------
# The map form (current vLLM). Field names and order follow vllm/distributed/kv_events.py;
# the array form below subclasses them, so the order is also the array layout.


class VllmBlockStored(msgspec.Struct, frozen=True, tag="BlockStored"):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    # One entry per block: LoRA name, multimodal (id, offset) pairs, cache_salt, ...
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class VllmBlockRemoved(msgspec.Struct, frozen=True, tag="BlockRemoved"):
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


class VllmAllBlocksCleared(msgspec.Struct, frozen=True, tag="AllBlocksCleared"):
    pass


VllmEvent: TypeAlias = VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared


class _ArrayStored(VllmBlockStored, frozen=True, array_like=True, tag="BlockStored"):
    pass


class _ArrayRemoved(VllmBlockRemoved, frozen=True, array_like=True, tag="BlockRemoved"):
    pass


class _ArrayCleared(VllmAllBlocksCleared, frozen=True, array_like=True, tag="AllBlocksCleared"):
    pass


class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    dp_rank: int | None = None


# The array form is decoded into the subclasses above, then handed out as the public
# (map-form) classes, so that users compare and match one set of types.
_PUBLIC: dict[type, type[VllmEvent]] = {
    _ArrayStored: VllmBlockStored,
    _ArrayRemoved: VllmBlockRemoved,
    _ArrayCleared: VllmAllBlocksCleared,
}

_batch_decoder = msgspec.msgpack.Decoder(_Batch)
_map_decoder = msgspec.msgpack.Decoder(VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared)
_array_decoder = msgspec.msgpack.Decoder(_ArrayStored | _ArrayRemoved | _ArrayCleared)


class VllmEventDecodeError(ValueError):
    """A message that is not a vLLM KV event batch; `seq` is set when it could be read."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


class VllmEventBatch(msgspec.Struct, frozen=True, kw_only=True):
    """One decoded message. `undecodable` counts events that were skipped (unknown tag,
    bad fields): the translator treats each as a lost event."""

    seq: int
    ts: float
    dp_rank: int | None
    events: list[VllmEvent]
    topic: bytes = b""
    undecodable: int = 0


def split_event_frames(frames: list[bytes]) -> tuple[bytes, int, bytes]:
    """``(topic, seq, payload)`` of one publisher message (vLLM's framing, which SGLang
    shares); raises `VllmEventDecodeError`."""
    if len(frames) != 3:
        raise VllmEventDecodeError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    topic, seq_bytes, payload = frames
    if len(seq_bytes) != 8:
        raise VllmEventDecodeError(f"seq frame has {len(seq_bytes)} bytes, expected 8")
    return topic, int.from_bytes(seq_bytes, "big"), payload


def decode_vllm_event_batch(frames: list[bytes]) -> VllmEventBatch:
    """Decode ``[topic, seq, payload]``; raises `VllmEventDecodeError`."""
    topic, seq, payload = split_event_frames(frames)
    try:
        raw = _batch_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise VllmEventDecodeError(f"bad event batch payload: {exc}", seq=seq) from exc
    events: list[VllmEvent] = []
    bad = 0
    for item in raw.events:
        buf = bytes(item)
        # msgpack fixarray 0x90-0x9f, array16 0xdc, array32 0xdd; anything else is a map
        # (or garbage, which the map decoder rejects).
        first = buf[0] if buf else 0
        decoder = _array_decoder if 0x90 <= first <= 0x9F or first in (0xDC, 0xDD) else _map_decoder
        try:
            event = decoder.decode(buf)
        except msgspec.DecodeError as exc:
            bad += 1
            log.warning("skipping undecodable vLLM KV event in batch %d: %s", seq, exc)
            continue
        public = _PUBLIC.get(type(event))
        events.append(public(*msgspec.structs.astuple(event)) if public is not None else event)
    return VllmEventBatch(
        seq=seq, ts=raw.ts, dp_rank=raw.dp_rank, events=events, topic=topic, undecodable=bad
    )


# -- translation --------------------------------------------------------------------------


@dataclass
class TranslatorStats:
    """What a translator dropped or noticed, for metrics and logs."""

    batches: int = 0
    events_out: int = 0
    seq_gaps: int = 0  # holes in seq (each counted once)
    restarts: int = 0  # seq went backwards: the publisher restarted
    undecodable: int = 0  # events the decoder skipped (each becomes an id gap)
    unknown_parent: int = 0  # BlockStored whose parent we never saw (or skipped)
    unknown_removed: int = 0  # hashes in BlockRemoved that we do not know
    skipped_extra_keys: int = 0  # LoRA / multimodal / cache_salt blocks (not ours to match)
    skipped_group: int = 0  # events of another KV cache group (hybrid models)
    malformed: int = 0  # block size or token count that does not fit


class VllmEventTranslator:
    """Turns one vLLM publisher's batches into our `KvEvent`s for `worker_id`.

    * **Re-keying.** A `BlockStored` is re-hashed from its ``token_ids`` (which must be
      exactly ``len(block_hashes)`` full blocks of our ``block_size``), chained from
      our hash of its parent. An unknown parent (never seen, or skipped) means we
      cannot name the blocks: the event is dropped and counted, and so are its
      descendants. Blocks with LoRA or extra keys (multimodal inputs, cache_salt)
      are skipped, conservatively: plain token hashes would claim hits the engine
      cannot serve to a request without them. Events of a KV cache group other
      than ``group_idx`` (hybrid models publish one stream per group) are skipped.
    * **Removals** go through the per-medium map engine hash -> our hash; unknown
      engine hashes are dropped and counted. Two engine hashes can name the same
      tokens (e.g. after a re-store), so our hash is reference-counted and removed
      only when its last engine hash goes. `AllBlocksCleared` clears every map.
    * **Event ids.** Ours go up by one per event we emit. They follow vLLM's
      ``seq`` (the first batch seen with seq ``s`` starts at ``s + 1``, so a
      publisher seen from seq 0 starts at id 1), and every missing seq, or event
      that could not be decoded, leaves a hole in our ids too, so that
      `dynamo_gateway.runtime.kv_sync.KvEventSync` sees the gap and re-syncs. A
      seq that goes backwards means the publisher restarted (an empty cache): we
      emit `AllBlocksCleared` and continue our ids from there.

    One translator per publisher: with data parallelism each rank publishes its own
    seq on its own port, and is a worker of its own.
    """

    def __init__(self, worker_id: str, block_size: int, *, group_idx: int = 0) -> None:
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self.worker_id = worker_id
        self.block_size = block_size
        self.group_idx = group_idx
        self.stats = TranslatorStats()
        self._last_seq: int | None = None
        self._next_id = 1
        self._ours: dict[str, dict[EngineHash, int]] = {}  # medium -> engine -> our hash
        self._refs: dict[str, dict[int, int]] = {}  # medium -> our hash -> engine hashes

    @property
    def last_seq(self) -> int | None:
        return self._last_seq

    @property
    def next_event_id(self) -> int:
        """The id our next emitted event will get."""
        return self._next_id

    def num_mapped(self, medium: str | None = None) -> int:
        """Engine hashes we can translate (on `medium`, or all)."""
        if medium is not None:
            return len(self._ours.get(medium, ()))
        return sum(len(m) for m in self._ours.values())

    def translate(self, batch: VllmEventBatch) -> list[KvEvent]:
        """Our events for one batch, in order (possibly none)."""
        self.stats.batches += 1
        out: list[KvEvent] = []
        last = self._last_seq
        if last is None:
            self._next_id = max(self._next_id, batch.seq + 1)
        elif batch.seq <= last:
            self.stats.restarts += 1
            log.info(
                "vLLM publisher of %s restarted (seq %d after %d)", self.worker_id, batch.seq, last
            )
            self._clear_maps()
            self._emit(out, AllBlocksCleared())
            self._next_id += batch.seq  # batches of the new run that we missed
        elif batch.seq > last + 1:
            self.stats.seq_gaps += 1
            self._next_id += batch.seq - last - 1
        self._last_seq = batch.seq
        if batch.undecodable:
            self.stats.undecodable += batch.undecodable
            self._next_id += batch.undecodable
        for event in batch.events:
            data = self._translate_one(event)
            if data is not None:
                self._emit(out, data)
        return out

    def _emit(self, out: list[KvEvent], data: KvEventData) -> None:
        out.append(KvEvent(worker_id=self.worker_id, event_id=self._next_id, data=data))
        self._next_id += 1
        self.stats.events_out += 1

    def _clear_maps(self) -> None:
        self._ours.clear()
        self._refs.clear()

    def _translate_one(self, event: VllmEvent) -> KvEventData | None:
        if isinstance(event, VllmBlockStored):
            return self._stored(event)
        if isinstance(event, VllmBlockRemoved):
            return self._removed(event)
        self._clear_maps()
        return AllBlocksCleared()

    def _stored(self, ev: VllmBlockStored) -> BlockStored | None:
        stats = self.stats
        if ev.group_idx is not None and ev.group_idx != self.group_idx:
            stats.skipped_group += 1
            return None
        if (
            ev.lora_id is not None
            or ev.lora_name is not None
            or (ev.extra_keys is not None and any(k is not None for k in ev.extra_keys))
        ):
            stats.skipped_extra_keys += 1
            return None
        n = len(ev.block_hashes)
        if ev.block_size != self.block_size or len(ev.token_ids) != n * self.block_size:
            stats.malformed += 1
            log.warning(
                "dropping vLLM BlockStored of %s: %d hashes, %d tokens, block size %d (ours %d)",
                self.worker_id,
                n,
                len(ev.token_ids),
                ev.block_size,
                self.block_size,
            )
            return None
        medium = ev.medium or "GPU"
        parent: int | None = None
        if ev.parent_block_hash is not None:
            parent = self._lookup(ev.parent_block_hash, medium)
            if parent is None:
                stats.unknown_parent += 1
                return None
        ours = sequence_hashes(ev.token_ids, self.block_size, parent)
        mapping = self._ours.setdefault(medium, {})
        refs = self._refs.setdefault(medium, {})
        for engine_hash, our_hash in zip(ev.block_hashes, ours, strict=True):
            old = mapping.get(engine_hash)
            if old == our_hash:
                continue
            if old is not None:
                # Re-stored with other tokens (should not happen): forget the old naming.
                self._unref(refs, old)
            mapping[engine_hash] = our_hash
            refs[our_hash] = refs.get(our_hash, 0) + 1
        return BlockStored(
            block_hashes=ours,
            parent_block_hash=parent,
            token_ids=ev.token_ids,
            block_size=self.block_size,
            medium=medium,
        )

    def _lookup(self, engine_hash: EngineHash, medium: str) -> int | None:
        """Our hash of an engine block: on `medium` first, then on any medium (an
        offloaded block's parent may sit on another tier; its tokens are the same)."""
        mapping = self._ours.get(medium)
        if mapping is not None and engine_hash in mapping:
            return mapping[engine_hash]
        for m in self._ours.values():
            if engine_hash in m:
                return m[engine_hash]
        return None

    @staticmethod
    def _unref(refs: dict[int, int], our_hash: int) -> bool:
        """Drop one reference; True when it was the last one."""
        left = refs[our_hash] - 1
        if left:
            refs[our_hash] = left
            return False
        del refs[our_hash]
        return True

    def _removed(self, ev: VllmBlockRemoved) -> BlockRemoved | None:
        if ev.group_idx is not None and ev.group_idx != self.group_idx:
            self.stats.skipped_group += 1
            return None
        medium = ev.medium or "GPU"
        mapping = self._ours.get(medium, {})
        refs = self._refs.get(medium, {})
        gone: list[int] = []
        for engine_hash in ev.block_hashes:
            our_hash = mapping.pop(engine_hash, None)
            if our_hash is None:
                self.stats.unknown_removed += 1
            elif self._unref(refs, our_hash):
                gone.append(our_hash)
        if not gone:
            return None
        return BlockRemoved(block_hashes=gone, medium=medium)


# -- subscriber ---------------------------------------------------------------------------


class VllmZmqSubscriber:
    """Subscribes to a vLLM publisher and hands our events to `sink`, in order.

    ``sink`` is synchronous (e.g. `KvEventSync.on_event`); it is called from the
    event loop that runs this subscriber. Use as ``async with``, or `start()` /
    `aclose()`. A message that cannot be decoded is logged and, when its seq can be
    read, counted as a lost batch (a hole in our ids).
    """

    def __init__(
        self,
        endpoint: str,
        translator: VllmEventTranslator,
        sink: Callable[[KvEvent], None],
        *,
        topic: str = "",
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.topic = topic
        self.translator = translator
        self.sink = sink
        self.decode_errors = 0
        self._own_context = context is None
        self._ctx = context if context is not None else zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> VllmZmqSubscriber:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start(self) -> None:
        """Connect (ZMQ reconnects on its own) and start receiving in a task."""
        if self._task is not None:
            return
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode("utf-8"))
        sock.connect(self.endpoint)
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(
            self._run(sock), name=f"vllm-kv-events-{self.translator.worker_id}"
        )

    async def _run(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                self.handle(frames)
            except Exception:
                # A failing sink must not stop the subscription; the sink's own
                # bookkeeping (KvEventSync) decides what a lost event means.
                log.exception("KV event sink of %s failed", self.translator.worker_id)

    def handle(self, frames: list[bytes]) -> None:
        """Decode, translate and deliver one message (the receive loop's body)."""
        try:
            batch = decode_vllm_event_batch(frames)
        except VllmEventDecodeError as exc:
            self.decode_errors += 1
            log.warning("bad vLLM KV event message from %s: %s", self.endpoint, exc)
            if exc.seq is None:
                return
            batch = VllmEventBatch(seq=exc.seq, ts=0.0, dp_rank=None, events=[], undecodable=1)
        for event in self.translator.translate(batch):
            self.sink(event)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_context:
            self._ctx.term()
