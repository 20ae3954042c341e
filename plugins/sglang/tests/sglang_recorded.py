"""SGLang 0.5.23 values, in the shapes its code builds them (transcribed from the wheel's
source, not captured from a running engine: SGLang needs an NVIDIA GPU).

Each block names the function that builds the shape. Token ids and numbers are
illustrative; keys, nesting, tuple layout and which lists are cumulative are SGLang's.
"""

from __future__ import annotations

from typing import Any

import msgspec

# -- streamed outputs ------------------------------------------------------------------------
# sglang/srt/managers/tokenizer_manager.py `_handle_batch_output`, branch BatchTokenIDOutput
# (skip_tokenizer_init=True), stream=True, incremental_streaming_output=False (the default):
# output_ids and the logprob lists are the whole completion so far. meta_info is built at the
# top of that function; `add_logprob_to_meta_info` adds the logprob keys, each entry a
# `(logprob, token_id, None)` tuple (`detokenize_logprob_tokens`, text off); top lists
# come from `detokenize_top_logprobs_tokens`. return_logprob=True, top_logprobs_num=2.


def _meta(n: int, finish: dict[str, Any] | None, lps: list[Any], tops: list[Any]) -> dict[str, Any]:
    return {
        "id": "req-1",
        "finish_reason": finish,
        "prompt_tokens": 6,
        "weight_version": "default",
        "num_retractions": 0,
        "input_token_logprobs": [],
        "output_token_logprobs": lps,
        "output_token_logprobs_length": len(lps),
        "input_top_logprobs": [],
        "output_top_logprobs": tops,
        "reasoning_tokens": 0,
        "completion_tokens": n,
        "cached_tokens": 4,
    }


LPS = [(-0.25, 791, None), (-1.5, 13, None), (-0.125, 2, None)]
TOPS = [
    [(-0.25, 791, None), (-2.0, 40, None)],
    [(-0.75, 11, None), (-1.5, 13, None)],
    [(-0.125, 2, None), (-3.0, 0, None)],
]
IDS = [791, 13, 2]
EOS = {"type": "stop", "matched": 2}  # FINISH_MATCHED_TOKEN.to_json()
LENGTH = {"type": "length", "length": 3}  # FINISH_LENGTH.to_json()

CUMULATIVE = [
    {"output_ids": IDS[:1], "meta_info": _meta(1, None, LPS[:1], TOPS[:1])},
    {"output_ids": IDS[:2], "meta_info": _meta(2, None, LPS[:2], TOPS[:2])},
    {"output_ids": IDS[:3], "meta_info": _meta(3, EOS, LPS[:3], TOPS[:3])},
]

# The same request with incremental_streaming_output=True: ids and the logprob lists are
# cut to this chunk (`_slice_streaming_output_meta_info`); completion_tokens stays a total.
INCREMENTAL = [
    {"output_ids": IDS[0:1], "meta_info": _meta(1, None, LPS[0:1], TOPS[0:1])},
    {"output_ids": IDS[1:3], "meta_info": _meta(3, EOS, LPS[1:3], TOPS[1:3])},
]

# An abort while running or waiting: `_handle_abort_req` (tokenizer_manager.py). With
# incremental streaming it repeats the last token already sent (`[output_ids[-1]]`).
ABORT_ECHO_INCREMENTAL = {
    "text": "",
    "output_ids": [13],
    "meta_info": {
        "id": "req-1",
        "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
        "weight_version": "default",
        "e2e_latency": 0.5,
        "completion_tokens": 2,
    },
}
ABORT_ECHO_CUMULATIVE = {**ABORT_ECHO_INCREMENTAL, "output_ids": [791, 13]}

# A request the scheduler refused: FINISH_ABORT(message, status_code=400).to_json()
# (`prepare_abort` in scheduler.py), e.g. a disaggregated request without a bootstrap room.
REFUSED = {
    "output_ids": [],
    "meta_info": {
        "id": "req-1",
        "finish_reason": {
            "type": "abort",
            "message": "Invalid request: Disaggregated request received without bootstrap room id.",
            "status_code": 400,
            "err_type": None,
        },
        "prompt_tokens": 6,
        "completion_tokens": 0,
        "cached_tokens": 0,
    },
}

# -- server args ----------------------------------------------------------------------------
# `ServerArgs.resolved_dict()` (sglang/srt/server_args.py): flat field names; a subset.
RESOLVED = {
    "model_path": "/models/smol",
    "host": "127.0.0.1",
    "port": 30000,
    "page_size": 16,
    "skip_tokenizer_init": True,
    "incremental_streaming_output": False,
    "enable_deterministic_inference": False,
    "disaggregation_mode": "prefill",
    "disaggregation_transfer_backend": "mooncake",
    "disaggregation_bootstrap_port": 8998,
    "kv_events_config": '{"publisher": "zmq", "endpoint": "ipc:///tmp/x/kv-events", "topic": ""}',
}

# -- load -----------------------------------------------------------------------------------
# `msgspec.structs.asdict(LoadSnapshot)` (sglang/srt/managers/load_snapshot.py), as
# `SchedulerLoadInquirer.get_loads` fills it; one per data-parallel rank.
LOAD_SNAPSHOT = {
    "timestamp": 1764786000.0,
    "dp_rank": 0,
    "num_running_reqs": 3,
    "num_waiting_reqs": 2,
    "num_waiting_uncached_tokens": 120,
    "num_used_tokens": 1000,
    "num_total_tokens": 1200,
    "num_active_tokens": 1200,
    "num_prealloc_ready_tokens": 0,
    "max_total_num_tokens": 160000,
    "max_running_requests": 256,
    "token_usage": 0.00625,
    "gen_throughput": 42.0,
    "cache_hit_rate": 0.5,
    "utilization": 0.1,
    "total_prefill_uncached_tokens": 5000,
    "total_prefill_busy_us": 90000,
    "decode_moments": None,
    "memory": None,
    "speculative": None,
    "lora": None,
    "disaggregation": None,
    "queues": None,
}

# -- KV events ------------------------------------------------------------------------------
# The wire schema of sglang/srt/disaggregation/kv_events.py: tagged maps that omit fields
# left at their default (`KVCacheEvent`, tag=True, omit_defaults=True) inside a positional
# `EventBatch` [ts, events, attn_dp_rank]. `KVCacheEventRecorder.record_store`
# (sglang/srt/mem_cache/events.py) sets block_size to the page's token count and coalesces
# consecutive pages into one event. Mirrored here so the tests encode real bytes.


class _Event(msgspec.Struct, omit_defaults=True, tag=True):
    pass


class BlockStored(_Event):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None
    cache_salt: str | None = None
    session_id: str | None = None
    lora_name: str | None = None


class BlockRemoved(_Event):
    block_hashes: list[int]
    medium: str | None = None


class AllBlocksCleared(_Event):
    pass


class KVEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    attn_dp_rank: int | None = None


def frames(seq: int, events: list[Any], *, dp_rank: int = 0) -> list[bytes]:
    """What `ZmqEventPublisher._publisher_thread` sends: (topic, seq, payload)."""
    payload = msgspec.msgpack.encode(
        KVEventBatch(ts=1764786000.0, events=events, attn_dp_rank=dp_rank)
    )
    return [b"", seq.to_bytes(8, "big"), payload]
