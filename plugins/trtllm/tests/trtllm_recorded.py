"""Values shaped exactly as TensorRT-LLM's LLM API produces them (1.2 line sources).

Objects are small stand-in dataclasses with the real attribute names (TensorRT-LLM
cannot be installed without a GPU); dicts are copied field for field from the
serializers named on each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# tensorrt_llm/executor/result.py: Logprob(logprob, rank) dataclass.
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None


# tensorrt_llm/disaggregated_params.py: DisaggregatedParams (the fields we carry).
@dataclass
class DisaggregatedParams:
    request_type: str | None = None
    first_gen_tokens: list[int] | None = None
    ctx_request_id: int | None = None
    opaque_state: bytes | None = None
    draft_tokens: list[int] | None = None
    disagg_request_id: int | None = None
    ctx_dp_rank: int | None = None
    ctx_info_endpoint: str | None = None


# tensorrt_llm/executor/result.py: CompletionOutput (token_ids cumulative, finish_reason
# in {'stop', 'length', 'timeout', 'cancelled', 'not_finished'}, logprobs TokenLogprobs
# = list[dict[int, Logprob]] or list[float]).
@dataclass
class CompletionOutput:
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    disaggregated_params: DisaggregatedParams | None = None


# tensorrt_llm/llmapi/llm.py RequestOutput (a GenerationResult): outputs, finished,
# cached_tokens (set from the response's cached_tokens in GenerationResultBase).
@dataclass
class RequestOutput:
    request_id: int
    outputs: list[CompletionOutput]
    finished: bool = False
    cached_tokens: int = 0


# tensorrt_llm/_utils.py KVCacheEventSerializer.to_json_str (one item of
# LLM.get_kv_cache_events_async), tokens_per_block 4.
def _tokens(ids: list[int], extra: int = 0) -> list[dict[str, Any]]:
    return [{"type": "unique_token", "token_id": t, "token_extra_id": extra} for t in ids]


def stored(
    event_id: int, parent: int | None, blocks: list[tuple[int, list[int]]], **kw: Any
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "data": {
            "type": "stored",
            "parent_hash": parent,
            "blocks": [
                {
                    "type": "stored_block",
                    "block_hash": h,
                    "tokens": _tokens(ids, kw.get("extra", 0)),
                    "cache_level": kw.get("cache_level", 0),
                    "priority": 35,
                }
                for h, ids in blocks
            ],
        },
        "window_size": 256,
    }


CREATED = {
    "event_id": 0,
    "data": {"type": "created", "num_blocks_per_cache_level": [1024, 0]},
    "window_size": 256,
}


def removed(event_id: int, hashes: list[int]) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "data": {"type": "removed", "block_hashes": hashes},
        "window_size": 256,
    }


UPDATED = {
    "event_id": 9,
    "data": {
        "type": "updated",
        "block_hash": 111,
        "cache_level": {"type": "event_diff", "new_value": 1, "old_value": 0},
        "priority": {"type": "event_diff", "new_value": 35, "old_value": 35},
    },
    "window_size": 256,
}

# One item of LLM.get_stats_async: IterationStats.to_json_str() (C++ executor's
# iteration stats, as base_worker._stats_serializer hands them on).
ITERATION_STATS: dict[str, Any] = {
    "cpuMemUsage": 0,
    "gpuMemUsage": 1_000_000,
    "iter": 42,
    "iterLatencyMS": 12.5,
    "maxNumActiveRequests": 256,
    "numActiveRequests": 3,
    "numQueuedRequests": 2,
    "numCompletedRequests": 1,
    "timestamp": "12-05-2025 10:00:00",
    "inflightBatchingStats": {
        "numContextRequests": 1,
        "numGenRequests": 2,
        "numPausedRequests": 1,
        "numScheduledRequests": 3,
        "numCtxTokens": 100,
        "microBatchId": 0,
        "avgNumDecodedTokensPerIter": 1.0,
    },
    "kvCacheStats": {
        "maxNumBlocks": 1000,
        "freeNumBlocks": 400,
        "usedNumBlocks": 600,
        "tokensPerBlock": 16,
        "allocTotalBlocks": 600,
        "allocNewBlocks": 10,
        "reusedBlocks": 5,
        "missedBlocks": 10,
        "cacheHitRate": 0.33,
    },
}
