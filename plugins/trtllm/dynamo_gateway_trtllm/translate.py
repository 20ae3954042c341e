"""Pure translations between our engine messages and TensorRT-LLM's LLM API values.

Nothing here imports TensorRT-LLM: functions take and return plain data (kwargs
dicts, mappings, objects read through their attribute names), so they are
unit-tested on recorded values without a GPU. The shapes follow TensorRT-LLM's
1.2 sources (``tensorrt_llm/sampling_params.py``, ``tensorrt_llm/executor/result.py``,
``tensorrt_llm/disaggregated_params.py``, the iteration stats of
``tensorrt_llm/executor/base_worker.py``); see README.md for the version read.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from dynamo_gateway.disagg.params import DO_REMOTE_PREFILL, wants_remote_decode
from dynamo_gateway.errors import EngineError, InvalidRequestError
from dynamo_gateway.protocol.engine import (
    Constraint,
    EngineOutput,
    EngineRequest,
    FinishReason,
    LoadMetrics,
    SamplingParams,
    TokenLogprob,
)

__all__ = [
    "CONTEXT_ONLY",
    "GENERATION_ONLY",
    "GREEDY_TEMPERATURE",
    "HANDOFF_KEY",
    "DeltaState",
    "GenerationPlan",
    "completion_delta",
    "decode_handoff",
    "encode_handoff",
    "finish_reason",
    "load_from_stats",
    "plan_generation",
    "sampling_kwargs",
    "token_logprobs",
]

CONTEXT_ONLY = "context_only"
GENERATION_ONLY = "generation_only"
# Our handoff keeps TensorRT-LLM's DisaggregatedParams under this key.
HANDOFF_KEY = "trtllm"
# At or below this temperature a request is greedy (the reference engine's rule).
GREEDY_TEMPERATURE = 1e-5
_U64 = 1 << 64
# DisaggregatedParams fields that a generation_only request needs, all plain values
# except opaque_state (bytes, carried as base64).
_HANDOFF_FIELDS = (
    "first_gen_tokens",
    "ctx_request_id",
    "opaque_state",
    "draft_tokens",
    "disagg_request_id",
    "ctx_dp_rank",
    "ctx_info_endpoint",
)


# -- sampling ------------------------------------------------------------------------------


def guided_decoding_kwargs(constraint: Constraint | None) -> dict[str, Any] | None:
    """``tensorrt_llm.sampling_params.GuidedDecodingParams`` keyword arguments for our
    constraint, or None. The LLM must be built with a guided-decoding backend
    (``guided_decoding_backend="xgrammar"`` in ``[plugin_config.trtllm]`` llm_args)."""
    if constraint is None:
        return None
    if constraint.after_token_ids:
        raise InvalidRequestError(
            "the trtllm engine cannot start structured output after reasoning",
            param="response_format",
        )
    if constraint.kind == "json_schema":
        return {"json": constraint.spec}
    if constraint.kind == "json_object":
        return {"json_object": True}
    if constraint.kind == "regex":
        return {"regex": constraint.spec}
    if constraint.kind == "choice":
        return {"grammar": constraint.choice_grammar()}
    return {"grammar": constraint.spec}


def sampling_kwargs(
    sampling: SamplingParams,
    *,
    max_tokens: int,
    eos_token_ids: Sequence[int],
    max_logprobs: int,
) -> dict[str, Any]:
    """Keyword arguments of ``tensorrt_llm.SamplingParams`` for our `sampling`.

    One to one: every field of ours is either passed or left at a TensorRT-LLM
    default that means the same; what TensorRT-LLM cannot honour raises
    `InvalidRequestError` (a 400). Notes on the mapping:

    * Greedy (temperature ~0) is ``top_k=1``: TensorRT-LLM has no temperature-0
      rule in every version, but top-1 is argmax in all of them. Otherwise
      ``top_p`` is always passed: unset top_k *and* top_p means greedy there.
    * ``end_id`` is the model's first eos id and the other eos ids become stop
      ids (unless ``ignore_eos``), so that multi-eos models stop like ours do.
    * Stop ids stay in the output (``include_stop_str_in_output``), as in our
      other engines; TensorRT-LLM would cut them off otherwise.
    * ``logprobs=k`` asks for the sampled token plus top k; TensorRT-LLM treats
      0 as "none", so k=0 asks it for 1 and `token_logprobs` drops the top list.
    * ``detokenize=False``: the frontend detokenizes.
    """
    if max_tokens < 1:
        raise InvalidRequestError(
            f"nothing left to generate (max_tokens {sampling.max_tokens})", param="max_tokens"
        )
    if sampling.logit_bias:
        # TensorRT-LLM's LLM API biases logits only through a custom logits processor.
        raise InvalidRequestError(
            "the trtllm engine does not support logit_bias", param="logit_bias"
        )
    kw: dict[str, Any] = {"max_tokens": max_tokens, "detokenize": False}
    if sampling.temperature <= GREEDY_TEMPERATURE:
        kw["top_k"] = 1
    else:
        kw["temperature"] = sampling.temperature
        kw["top_p"] = sampling.top_p
        if sampling.top_k > 0:
            kw["top_k"] = sampling.top_k
    if sampling.seed is not None:
        if not 0 <= sampling.seed < _U64:
            raise InvalidRequestError(
                "TensorRT-LLM takes a seed in [0, 2**64)", param="seed", code="invalid_seed"
            )
        kw["seed"] = sampling.seed
    if sampling.constraint is not None:
        # A structured output ends where its grammar does (see the vllm plugin).
        sampling = msgspec.structs.replace(sampling, ignore_eos=False, min_tokens=0)
    if sampling.min_tokens > 0:
        kw["min_tokens"] = sampling.min_tokens
    stop = list(sampling.stop_token_ids)
    if eos_token_ids:
        kw["end_id"] = eos_token_ids[0]
        if not sampling.ignore_eos:
            stop += [t for t in eos_token_ids[1:] if t not in stop]
    if sampling.ignore_eos:
        kw["ignore_eos"] = True
    if stop:
        kw["stop_token_ids"] = stop
        kw["include_stop_str_in_output"] = True
    if sampling.logprobs is not None:
        if sampling.logprobs > max_logprobs:
            raise InvalidRequestError(
                f"this worker returns at most {max_logprobs} logprobs per token",
                param="logprobs",
            )
        kw["logprobs"] = max(1, sampling.logprobs)
    if sampling.repetition_penalty <= 0:
        raise InvalidRequestError(
            "TensorRT-LLM needs repetition_penalty > 0", param="repetition_penalty"
        )
    if sampling.repetition_penalty != 1.0:
        kw["repetition_penalty"] = sampling.repetition_penalty
    if sampling.presence_penalty != 0.0:
        kw["presence_penalty"] = sampling.presence_penalty
    if sampling.frequency_penalty != 0.0:
        kw["frequency_penalty"] = sampling.frequency_penalty
    return kw


# -- what to submit ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationPlan:
    """What `generate_async` gets for one of our requests."""

    prompt_token_ids: list[int]
    max_tokens: int
    # DisaggregatedParams(**disaggregated) or None (aggregated).
    disaggregated: dict[str, Any] | None
    # Tokens TensorRT-LLM repeats at the head of a generation_only output (the
    # context leg's first tokens, which the client already has).
    first_gen_tokens: tuple[int, ...] = ()

    @property
    def context_only(self) -> bool:
        return bool(self.disaggregated and self.disaggregated["request_type"] == CONTEXT_ONLY)


def plan_generation(request: EngineRequest) -> GenerationPlan:
    """The prompt, budget and disaggregation of `request` on TensorRT-LLM.

    Aggregated: prompt + resumed tokens, the rest of the budget. Prefill leg
    (``do_remote_decode``): the same, as ``context_only``. Decode leg (our
    handoff, `decode_handoff`): TensorRT-LLM wants the context leg's prompt, not
    ours with the first tokens appended, and counts those first tokens in
    ``max_tokens``; both are undone here. A handoff that is not ours (another
    engine's prefill) is ignored: the request is served aggregated, as the
    disaggregation contract asks (decode falls back to computing the prefill).
    """
    prompt = [*request.prompt_token_ids, *request.resumed_token_ids]
    left = request.sampling.max_tokens - len(request.resumed_token_ids)
    params = request.kv_transfer_params
    if wants_remote_decode(params):
        return GenerationPlan(prompt, left, {"request_type": CONTEXT_ONLY})
    gen = decode_handoff(params)
    if gen is None:
        return GenerationPlan(prompt, left, None)
    first = tuple(gen.get("first_gen_tokens") or ())
    n = len(first)
    if n == 0 or n > len(request.resumed_token_ids) or list(first) != prompt[-n:]:
        return GenerationPlan(prompt, left, None)
    return GenerationPlan(prompt[:-n], left + n, gen, first)


# -- outputs ---------------------------------------------------------------------------------

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "cancelled": FinishReason.ABORT,
    "timeout": FinishReason.ERROR,
    # A context_only request ends "not finished": its one token was generated.
    "not_finished": FinishReason.LENGTH,
}


def finish_reason(reason: object) -> FinishReason | None:
    """Ours for `CompletionOutput.finish_reason` (None while running)."""
    if reason is None:
        return None
    return _FINISH.get(str(reason), FinishReason.ERROR)


def token_logprobs(
    token_ids: Sequence[int], entries: Sequence[Any], *, top: int
) -> list[TokenLogprob]:
    """Our logprobs for `token_ids`, from the matching `CompletionOutput.logprobs` slice.

    TensorRT-LLM gives, per position, either ``{token_id: Logprob(logprob, rank)}``
    (the sampled token plus the top k, ``TokenLogprobs``) or a bare float (the
    sampled token's logprob, some PyTorch-backend paths).
    """
    if len(entries) < len(token_ids):
        raise EngineError(f"{len(entries)} logprobs for {len(token_ids)} tokens")
    out: list[TokenLogprob] = []
    for token, entry in zip(token_ids, entries, strict=False):
        if isinstance(entry, Mapping):
            sampled = entry.get(token)
            if sampled is None:
                raise EngineError(f"TensorRT-LLM's logprobs miss the sampled token {token}")
            ranked = sorted(
                entry.items(),
                key=lambda kv: (
                    _rank(kv[1]) if _rank(kv[1]) is not None else math.inf,
                    -_logprob(kv[1]),
                ),
            )
            alts = [(int(t), _logprob(lp)) for t, lp in ranked[:top]] if top else []
            out.append(TokenLogprob(int(token), _logprob(sampled), alts))
        else:
            out.append(TokenLogprob(int(token), float(entry), []))
    return out


def _logprob(value: Any) -> float:
    return float(getattr(value, "logprob", value))


def _rank(value: Any) -> int | None:
    rank = getattr(value, "rank", None)
    return None if rank is None else int(rank)


@dataclass(frozen=True)
class DeltaState:
    """How much of a request's cumulative output we have passed on."""

    # Tokens of `CompletionOutput.token_ids` already emitted (or skipped).
    emitted: int = 0
    # Leading tokens that are not ours: None until the first tokens arrive.
    skip: int | None = None
    # An output with content (tokens or a finish) went out: cached_tokens was told.
    started: bool = False


def completion_delta(
    completion: Any,
    state: DeltaState,
    *,
    plan: GenerationPlan,
    logprobs: int | None,
    cached_tokens: int | None = None,
) -> tuple[EngineOutput, DeltaState]:
    """Our delta for one streamed ``RequestOutput.outputs[0]`` (a ``CompletionOutput``).

    `completion.token_ids` is cumulative; the delta is what follows ``emitted``.
    On a generation_only leg TensorRT-LLM's output may begin with the context
    leg's first tokens (``first_gen_tokens``), which the client already has: if
    the output starts with them they are skipped. Stop-id truncation at the end
    (which we turn off, see `sampling_kwargs`) could shrink the list; `emitted`
    then just stays put.
    """
    ids: list[int] = list(completion.token_ids or [])
    skip = state.skip
    first = plan.first_gen_tokens
    if skip is None and (len(ids) >= len(first) or completion.finish_reason is not None):
        skip = len(first) if first and tuple(ids[: len(first)]) == first else 0
    start = max(state.emitted, skip or 0)
    new = ids[start:] if skip is not None else []
    reason = finish_reason(completion.finish_reason)
    out = EngineOutput(token_ids=new, finish_reason=reason)
    content = bool(new) or reason is not None
    if content and not state.started:
        out.cached_tokens = cached_tokens
    if logprobs is not None and new:
        entries = list(completion.logprobs or [])[start : start + len(new)]
        out.logprobs = token_logprobs(new, entries, top=logprobs)
    if reason is FinishReason.ERROR:
        out.error = f"TensorRT-LLM finished the request with {completion.finish_reason!r}"
    return out, DeltaState(emitted=start + len(new), skip=skip, started=state.started or content)


# -- disaggregation ----------------------------------------------------------------------------


def encode_handoff(
    disaggregated_params: Any, *, worker_id: str, num_tokens: int
) -> dict[str, Any] | None:
    """Our JSON-able kv_transfer_params for a context_only leg's ``DisaggregatedParams``.

    None when TensorRT-LLM returned none (it could not keep the KV for a decode).
    """
    if disaggregated_params is None:
        return None
    fields: dict[str, Any] = {}
    for name in _HANDOFF_FIELDS:
        value = getattr(disaggregated_params, name, None)
        if value is None:
            continue
        if name == "opaque_state":
            value = base64.b64encode(bytes(value)).decode("ascii")
        elif isinstance(value, list | tuple):
            value = [int(v) for v in value]
        fields[name] = value
    if "ctx_request_id" not in fields and "disagg_request_id" not in fields:
        return None
    return {
        DO_REMOTE_PREFILL: True,
        "remote_engine_id": worker_id,
        "num_tokens": num_tokens,
        HANDOFF_KEY: fields,
    }


def decode_handoff(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``DisaggregatedParams`` kwargs (generation_only) from our handoff, or None.

    None for no params or params that are not a trtllm handoff. A trtllm handoff
    that is malformed raises `InvalidRequestError`.
    """
    if not params or not params.get(DO_REMOTE_PREFILL):
        return None
    fields = params.get(HANDOFF_KEY)
    if fields is None:
        return None
    if not isinstance(fields, Mapping):
        raise InvalidRequestError("malformed trtllm kv_transfer_params", param="kv_transfer_params")
    kw: dict[str, Any] = {"request_type": GENERATION_ONLY}
    for name in _HANDOFF_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if name == "opaque_state":
            try:
                value = base64.b64decode(str(value), validate=True)
            except (binascii.Error, ValueError):
                raise InvalidRequestError(
                    "malformed trtllm opaque_state", param="kv_transfer_params"
                ) from None
        kw[name] = value
    if not kw.get("first_gen_tokens"):
        raise InvalidRequestError(
            "trtllm kv_transfer_params without first_gen_tokens", param="kv_transfer_params"
        )
    return kw


# -- load ------------------------------------------------------------------------------------


def load_from_stats(stats: Mapping[str, Any]) -> LoadMetrics:
    """`LoadMetrics` from one iteration-stats dict (``get_stats_async``).

    Waiting counts the queue plus requests paused for KV space
    (``inflightBatchingStats.numPausedRequests``), like Dynamo's TensorRT-LLM
    publisher. Blocks used: ``usedNumBlocks`` (``maxNumBlocks - freeNumBlocks``
    where absent).
    """
    kv = stats.get("kvCacheStats") or {}
    ifb = stats.get("inflightBatchingStats") or {}
    total = int(kv.get("maxNumBlocks", 0))
    used = kv.get("usedNumBlocks")
    if used is None:
        used = max(0, total - int(kv.get("freeNumBlocks", total)))
    return LoadMetrics(
        active_requests=int(stats.get("numActiveRequests", 0)),
        waiting_requests=int(stats.get("numQueuedRequests", 0))
        + int(ifb.get("numPausedRequests", 0)),
        kv_blocks_used=int(used),
        kv_blocks_total=total,
    )
