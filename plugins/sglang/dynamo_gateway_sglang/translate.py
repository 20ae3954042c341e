"""Pure translation between our engine protocol and SGLang's (no SGLang import here).

Every function takes plain values shaped as SGLang 0.5.23 produces them and is
unit-tested on recorded values (`tests/sglang_recorded.py` names the SGLang source of
each shape):

* `server_kwargs` / `resolved_server`: `sglang.Engine(**kwargs)` in, the resolved
  `ServerArgs.resolved_dict()` out.
* `sampling_params`: our `SamplingParams` -> SGLang's ``sampling_params`` dict.
* `stream_delta`: one streamed output dict of ``Engine.async_generate(stream=True)``
  -> our `EngineOutput` delta.
* `load_metrics`: the scheduler's `LoadSnapshot`s -> our `LoadMetrics`.
* `bootstrap_params` / `bootstrap_args`: our ``kv_transfer_params`` <-> SGLang's
  ``bootstrap_host`` / ``bootstrap_port`` / ``bootstrap_room``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dynamo_gateway.errors import InvalidRequestError
from dynamo_gateway.protocol.engine import (
    Constraint,
    EngineOutput,
    EngineRequest,
    FinishReason,
    LoadMetrics,
    SamplingParams,
    TokenLogprob,
    WorkerRole,
)

__all__ = [
    "BOOTSTRAP_KEYS",
    "ResolvedServer",
    "advertised_host",
    "bootstrap_args",
    "bootstrap_params",
    "finish_reason",
    "load_metrics",
    "prompt_of",
    "resolved_server",
    "sampling_params",
    "server_kwargs",
    "stream_delta",
    "to_logprobs",
]

# The keys of a prefill leg's handoff; SGLang's generate takes them under these names.
BOOTSTRAP_KEYS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")

# SGLang's SamplingParams.verify() ranges (sglang/srt/sampling/sampling_params.py).
_PENALTY = (-2.0, 2.0)
_REPETITION_MAX = 2.0
_INT64 = (-(2**63), 2**63 - 1)
_ROOM_MAX = 2**63 - 1

_ROLE_MODE = {
    WorkerRole.AGGREGATED: "null",
    WorkerRole.PREFILL: "prefill",
    WorkerRole.DECODE: "decode",
}


# -- server arguments ---------------------------------------------------------------------


def server_kwargs(
    model_path: str,
    *,
    block_size: int,
    max_model_len: int | None,
    role: WorkerRole,
    kv_events_endpoint: str | None,
    user: Mapping[str, Any],
) -> dict[str, Any]:
    """`sglang.Engine` keyword arguments: ours first, the user's `server_args` over them.

    The frontend owns the tokenizer and stop strings, so SGLang skips its own
    (``skip_tokenizer_init``: token ids in, token ids out). Pages are our blocks,
    so that SGLang's KV events name blocks of our size.
    """
    kwargs: dict[str, Any] = {
        "model_path": model_path,
        "page_size": block_size,
        "skip_tokenizer_init": True,
        "disaggregation_mode": _ROLE_MODE[role],
    }
    if max_model_len is not None:
        kwargs["context_length"] = max_model_len
    if kv_events_endpoint is not None:
        config = {"publisher": "zmq", "endpoint": kv_events_endpoint, "topic": ""}
        kwargs["kv_events_config"] = json.dumps(config)
    kwargs.update(user)
    return kwargs


@dataclass(frozen=True)
class ResolvedServer:
    """What the engine needs from SGLang's resolved server args."""

    page_size: int
    incremental_streaming: bool  # streamed output_ids are deltas (else cumulative)
    deterministic: bool  # per-request seeds are honoured
    disaggregation_mode: str  # "null", "prefill" or "decode"
    host: str
    bootstrap_port: int


def resolved_server(info: Mapping[str, Any]) -> ResolvedServer:
    """From `ServerArgs.resolved_dict()` (the same keys `Engine.get_server_info()` has)."""
    return ResolvedServer(
        page_size=int(info.get("page_size") or 1),
        incremental_streaming=bool(info.get("incremental_streaming_output", False)),
        deterministic=bool(info.get("enable_deterministic_inference", False)),
        disaggregation_mode=str(info.get("disaggregation_mode") or "null"),
        host=str(info.get("host") or "127.0.0.1"),
        bootstrap_port=int(info.get("disaggregation_bootstrap_port") or 8998),
    )


# -- requests -----------------------------------------------------------------------------


def prompt_of(request: EngineRequest) -> tuple[list[int], int]:
    """The input ids SGLang sees and how many tokens it may still generate.

    Resumed tokens (migration, or a disaggregated request's first token) are part
    of the prompt; ``max_tokens`` keeps counting the whole completion.
    """
    resumed = request.resumed_token_ids
    left = request.sampling.max_tokens - len(resumed)
    if left < 1:
        raise InvalidRequestError("nothing left to generate: max_tokens reached by resumed tokens")
    return [*request.prompt_token_ids, *resumed], left


def sampling_params(
    params: SamplingParams, *, max_new_tokens: int, deterministic: bool
) -> dict[str, Any]:
    """SGLang's ``sampling_params`` for ours, one to one.

    Raises `InvalidRequestError` (a 400) for what SGLang would refuse later
    (`SamplingParams.verify`) or ignore silently: a seed on an engine started
    without ``enable_deterministic_inference`` (SGLang's sampler only reads
    ``sampling_seed`` in deterministic mode).
    """
    if params.top_k < 0:
        raise InvalidRequestError("top_k must be >= 0 (0 disables it)", param="top_k")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise InvalidRequestError("temperature must be finite and >= 0", param="temperature")
    if not 0.0 < params.top_p <= 1.0:
        raise InvalidRequestError("SGLang needs top_p in (0, 1]", param="top_p")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not _PENALTY[0] <= value <= _PENALTY[1]:
            raise InvalidRequestError(f"SGLang needs {name} in [-2, 2]", param=name)
    if not 0.0 < params.repetition_penalty <= _REPETITION_MAX:
        raise InvalidRequestError(
            "SGLang needs repetition_penalty in (0, 2]", param="repetition_penalty"
        )
    if params.min_tokens > max_new_tokens:
        raise InvalidRequestError("min_tokens exceeds max_tokens", param="min_tokens")
    out: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,  # -1: whole vocabulary
        "min_new_tokens": params.min_tokens,
        "ignore_eos": params.ignore_eos,
        "stop_token_ids": list(params.stop_token_ids) or None,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
    }
    if params.seed is not None:
        if not _INT64[0] <= params.seed <= _INT64[1]:
            raise InvalidRequestError("seed must fit in a signed 64-bit integer", param="seed")
        # Greedy requests do not sample: their seed changes nothing, on any engine.
        if params.temperature > 0 and not deterministic:
            raise InvalidRequestError(
                "this SGLang engine ignores seeds; start it with "
                "server_args.enable_deterministic_inference = true",
                param="seed",
            )
        out["sampling_seed"] = params.seed
    if params.logit_bias:
        out["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
    out.update(constraint_params(params.constraint))
    if params.constraint is not None:
        # A structured output ends where its grammar does (see the vllm plugin).
        out["ignore_eos"] = False
        out["min_new_tokens"] = 0
    return out


def constraint_params(constraint: Constraint | None) -> dict[str, Any]:
    """SGLang's structured-output sampling params for our constraint (its grammar
    backend compiles them: ``json_schema``, ``regex`` or ``ebnf``)."""
    if constraint is None:
        return {}
    if constraint.after_token_ids:
        raise InvalidRequestError(
            "the sglang engine cannot start structured output after reasoning; give SGLang "
            "its own reasoning parser instead of the gateway's",
            param="response_format",
        )
    if constraint.kind == "json_schema":
        return {"json_schema": constraint.spec}
    if constraint.kind == "json_object":
        return {"json_schema": '{"type": "object"}'}
    if constraint.kind == "regex":
        return {"regex": constraint.spec}
    if constraint.kind == "choice":
        return {"ebnf": constraint.choice_grammar()}
    return {"ebnf": constraint.spec}


# -- outputs ------------------------------------------------------------------------------


def finish_reason(reason: Mapping[str, Any] | None) -> tuple[FinishReason | None, str | None]:
    """Ours (and an error message) for ``meta_info["finish_reason"]``.

    SGLang's are ``BaseFinishReason.to_json()`` dicts (schedule_batch.py):
    ``{"type": "stop", "matched": ...}``, ``{"type": "length", "length": n}`` and
    ``{"type": "abort", "message", "status_code", "err_type"}``; an abort with an
    HTTP error status (400 for a bad request, 5xx) is the engine refusing or
    failing the request, not a cancellation.
    """
    if reason is None:
        return None, None
    kind = reason.get("type")
    if kind == "stop":
        return FinishReason.STOP, None
    if kind == "length":
        return FinishReason.LENGTH, None
    if kind == "abort":
        status = reason.get("status_code")
        if isinstance(status, int) and status >= 400:
            return FinishReason.ERROR, f"SGLang: {reason.get('message') or 'aborted'}"
        return FinishReason.ABORT, None
    return FinishReason.ERROR, f"SGLang finished the request with {reason!r}"


def to_logprobs(
    token_ids: Sequence[int],
    token_logprobs: Sequence[Sequence[Any]] | None,
    top_logprobs: Sequence[Sequence[Sequence[Any]] | None] | None,
    k: int | None,
) -> list[TokenLogprob] | None:
    """Ours for ``meta_info["output_token_logprobs"]`` / ``["output_top_logprobs"]``.

    Each entry is SGLang's ``(logprob, token_id, text_or_None)``
    (`TokenizerManager.detokenize_logprob_tokens`); a top list is ``None`` where
    SGLang had none. The lists are already aligned with ``token_ids``.
    """
    if k is None or token_logprobs is None:
        return None
    out: list[TokenLogprob] = []
    for i, (token, entry) in enumerate(zip(token_ids, token_logprobs, strict=True)):
        top: list[tuple[int, float]] = []
        if k > 0 and top_logprobs is not None and i < len(top_logprobs):
            row = top_logprobs[i] or ()
            top = [(int(alt[1]), float(alt[0])) for alt in row[:k]]
        out.append(TokenLogprob(int(token), float(entry[0]), top))
    return out


def stream_delta(
    out: Mapping[str, Any],
    *,
    seen: int,
    incremental: bool,
    first: bool,
    k: int | None,
) -> tuple[EngineOutput | None, int]:
    """Our delta for one streamed output dict, and the new count of tokens seen.

    The dict is ``{"output_ids", "meta_info"}`` (`TokenizerManager._handle_batch_output`
    for `BatchTokenIDOutput`). With ``incremental_streaming_output`` off (SGLang's
    default) ``output_ids`` and the logprob lists are *cumulative*; with it on they
    are deltas, except the echo of an abort (`_handle_abort_req`), which repeats the
    last token already sent. ``meta_info["completion_tokens"]`` counts every token
    so far in both modes, so it decides what is new. Returns None for an output
    with nothing new and no finish reason.
    """
    meta: Mapping[str, Any] = out.get("meta_info") or {}
    ids: Sequence[int] = out.get("output_ids") or ()
    total = meta.get("completion_tokens")
    if incremental:
        # Start of the new tokens within this delta.
        new = len(ids) if total is None else max(0, min(len(ids), int(total) - seen))
        start = len(ids) - new
    else:
        start = seen
    tokens = [int(t) for t in ids[start:]]
    reason, error = finish_reason(meta.get("finish_reason"))
    if not tokens and reason is None:
        return None, seen
    logprobs = None
    if k is not None:
        token_lps = meta.get("output_token_logprobs")
        top_lps = meta.get("output_top_logprobs")
        # Cumulative lists are cut at the same place as the ids; incremental ones
        # line up with this delta's ids.
        token_lps = None if token_lps is None else list(token_lps)[start : start + len(tokens)]
        top_lps = None if top_lps is None else list(top_lps)[start : start + len(tokens)]
        if token_lps is not None and len(token_lps) == len(tokens):
            logprobs = to_logprobs(tokens, token_lps, top_lps, k)
    cached = int(meta.get("cached_tokens") or 0) if first else None
    delta = EngineOutput(
        token_ids=tokens,
        finish_reason=reason,
        cached_tokens=cached,
        logprobs=logprobs,
        error=error,
    )
    return delta, seen + len(tokens)


# -- load ---------------------------------------------------------------------------------


def load_metrics(snapshots: Sequence[Mapping[str, Any]], page_size: int) -> LoadMetrics:
    """Our load from the schedulers' `LoadSnapshot`s (one per data-parallel rank).

    SGLang counts KV in tokens (``num_used_tokens`` of ``max_total_num_tokens``);
    ours is in blocks of ``page_size`` tokens.
    """
    page = max(1, page_size)
    used = sum(int(s.get("num_used_tokens", 0)) for s in snapshots)
    capacity = sum(int(s.get("max_total_num_tokens", 0)) for s in snapshots)
    return LoadMetrics(
        active_requests=sum(int(s.get("num_running_reqs", 0)) for s in snapshots),
        waiting_requests=sum(int(s.get("num_waiting_reqs", 0)) for s in snapshots),
        kv_blocks_used=-(-used // page),
        kv_blocks_total=capacity // page,
    )


# -- disaggregation -----------------------------------------------------------------------


_WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})


def advertised_host(configured: str | None, server_host: str, fallback: str) -> str:
    """The host a decode worker dials for this prefill worker's bootstrap server.

    SGLang binds it on ``ServerArgs.host``; a wildcard there names no host, so the
    plugin setting, else ``fallback`` (this machine's address) is advertised.
    """
    if configured:
        return configured
    return fallback if server_host in _WILDCARDS else server_host


def bootstrap_params(host: str, port: int, room: int) -> dict[str, Any]:
    """A prefill leg's ``kv_transfer_params``: where SGLang's decode side meets it."""
    return {
        "do_remote_prefill": True,
        "bootstrap_host": host,
        "bootstrap_port": port,
        "bootstrap_room": room,
    }


def bootstrap_args(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``async_generate`` bootstrap keyword arguments for a decode leg's params.

    None when the params are not an SGLang handoff (absent, or from a prefill
    worker of another engine); raises `ValueError` for a malformed one.
    """
    if not params or "bootstrap_room" not in params:
        return None
    host = params.get("bootstrap_host")
    port = params.get("bootstrap_port")
    room = params.get("bootstrap_room")
    if not isinstance(host, str) or not host:
        raise ValueError("SGLang handoff without a bootstrap_host")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"SGLang handoff with a bad bootstrap_port {port!r}")
    if not isinstance(room, int) or not 0 <= room <= _ROOM_MAX:
        raise ValueError(f"SGLang handoff with a bad bootstrap_room {room!r}")
    return {"bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": room}
