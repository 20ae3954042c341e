"""TensorRT-LLM's KV cache events, re-keyed by our sequence hashes.

``LLM.get_kv_cache_events_async()`` yields one dict per event, as
``tensorrt_llm._utils.KVCacheEventSerializer`` writes it::

    {"event_id": 7, "window_size": 4096, ["attention_dp_rank": 0,]
     "data": {"type": "stored", "parent_hash": 12 | None,
              "blocks": [{"type": "stored_block", "block_hash": 34,
                          "tokens": [{"type": "unique_token", "token_id": 5,
                                      "token_extra_id": 0}, ...],
                          "cache_level": 0, "priority": 35, ...}, ...]}}

and ``{"type": "removed", "block_hashes": [...]}``, ``{"type": "created",
"num_blocks_per_cache_level": [...]}``, ``{"type": "updated", "block_hash": ...,
"cache_level": {"type": "event_diff", "old_value":, "new_value":}, ...}``.

The re-keying is the core's (`dynamo_gateway.kv.vllm_events.VllmEventTranslator`):
a TensorRT-LLM event becomes the equivalent vLLM event and goes through the same
translator, one "batch" per event with ``event_id`` as its sequence number, so
that a lost event (TensorRT-LLM drops the oldest when its queue is full) leaves a
hole in our event ids and consumers re-sync. Translation rules:

* ``stored``: one `VllmBlockStored` of the event's full blocks (a trailing block
  with fewer than ``tokens_per_block`` tokens is dropped: we hash full blocks
  only). A block with a non-zero ``token_extra_id``, a ``lora_id`` or ``mm_keys``
  becomes extra keys, which the translator skips (plain token hashes would claim
  hits the engine cannot serve). ``cache_level`` 0 is "GPU", others "CPU".
* ``removed``: `VllmBlockRemoved` on "GPU" (TensorRT-LLM does not say the level).
* ``created`` and ``updated`` (a block moving between levels or changing
  priority) change nothing we index and emit nothing.
* Events of an attention-DP rank other than ours are skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from dynamo_gateway.kv.vllm_events import (
    EngineHash,
    TranslatorStats,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEvent,
    VllmEventBatch,
    VllmEventTranslator,
)
from dynamo_gateway.protocol.kv_events import KvEvent

__all__ = ["TrtllmEventTranslator", "to_vllm_event"]

log = logging.getLogger(__name__)

_LEVELS = {0: "GPU"}


def to_vllm_event(data: Mapping[str, Any], *, tokens_per_block: int) -> VllmEvent | None:
    """The vLLM-shaped event for one TensorRT-LLM event's ``data``, or None (no effect)."""
    kind = data.get("type")
    if kind == "removed":
        return VllmBlockRemoved(block_hashes=list(data.get("block_hashes") or []), medium="GPU")
    if kind != "stored":
        return None
    hashes: list[EngineHash] = []
    tokens: list[int] = []
    extra: list[Any] = []
    medium = "GPU"
    lora_id: int | None = None
    for i, block in enumerate(data.get("blocks") or []):
        block_tokens = block.get("tokens") or []
        if len(block_tokens) != tokens_per_block:
            break  # partial (last) block: not hashed, and nothing can follow it
        if i == 0:
            medium = _LEVELS.get(int(block.get("cache_level") or 0), "CPU")
        hashes.append(block["block_hash"])
        tokens.extend(int(t["token_id"]) for t in block_tokens)
        keys = [int(t.get("token_extra_id") or 0) for t in block_tokens]
        mm = block.get("mm_keys")
        extra.append(keys if any(keys) else (mm or None))
        if block.get("lora_id") is not None:
            lora_id = int(block["lora_id"])
    if not hashes:
        return None
    return VllmBlockStored(
        block_hashes=hashes,
        parent_block_hash=data.get("parent_hash"),
        token_ids=tokens,
        block_size=tokens_per_block,
        lora_id=lora_id,
        medium=medium,
        extra_keys=extra,
    )


class TrtllmEventTranslator:
    """Turns one TensorRT-LLM executor's event dicts into our `KvEvent`s for `worker_id`."""

    def __init__(self, worker_id: str, tokens_per_block: int, *, dp_rank: int = 0) -> None:
        self.tokens_per_block = tokens_per_block
        self.dp_rank = dp_rank
        self.skipped_rank = 0
        self._inner = VllmEventTranslator(worker_id, tokens_per_block)

    @property
    def stats(self) -> TranslatorStats:
        return self._inner.stats

    def translate(self, event: Mapping[str, Any]) -> list[KvEvent]:
        """Our events for one TensorRT-LLM event (possibly none)."""
        rank = event.get("attention_dp_rank")
        if rank is not None and int(rank) != self.dp_rank:
            self.skipped_rank += 1
            return []
        data = event.get("data") or {}
        try:
            converted = to_vllm_event(data, tokens_per_block=self.tokens_per_block)
            bad = 0
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("undecodable TensorRT-LLM KV event %s: %s", event.get("event_id"), exc)
            converted, bad = None, 1
        batch = VllmEventBatch(
            seq=int(event["event_id"]),
            ts=0.0,
            dp_rank=None,
            events=[converted] if converted is not None else [],
            undecodable=bad,
        )
        return self._inner.translate(batch)
