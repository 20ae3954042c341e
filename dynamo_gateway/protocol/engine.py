"""Messages between the frontend and an engine worker.

These are the structs the request plane carries (in-process today, msgpack over
TCP for remote workers), so they are versioned `msgspec.Struct`s with plain
fields only. Field order is part of the wire format: append new fields at the
end with a default.
"""

from __future__ import annotations

import enum
import json
from typing import Any, Literal

import msgspec

WIRE_VERSION = 1


class WorkerRole(enum.StrEnum):
    """What a worker does for its model."""

    AGGREGATED = "aggregated"  # prefill and decode on the same worker
    PREFILL = "prefill"  # prefill only; exports KV blocks to a decode worker
    DECODE = "decode"  # imports KV blocks and decodes


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id, or a stop string
    LENGTH = "length"  # max_tokens or the context window reached
    ABORT = "abort"  # cancelled (client went away, or the worker is shutting down)
    ERROR = "error"  # the engine failed this request


class Constraint(msgspec.Struct, frozen=True, kw_only=True):
    """Structured output the engine must produce, in engine-neutral terms.

    The frontend turns `response_format`, vLLM's `guided_*` / `structured_outputs`
    and `tool_choice` "required" or a named function into one of these; each engine
    enforces it by constrained decoding, or refuses the request with
    `InvalidRequestError` (a 400) when it cannot. Kinds and their `spec`:

    - ``json_schema``: a JSON Schema, as JSON text;
    - ``json_object``: any JSON object (`spec` is empty);
    - ``regex``: a regular expression the whole output matches;
    - ``choice``: a JSON array of strings; the output is exactly one of them;
    - ``grammar``: an EBNF grammar (xgrammar's syntax, GBNF-like, root rule ``root``).

    With `after_token_ids` the output is free until that token sequence has been
    generated (the end of a reasoning block, e.g. ``</think>``), and constrained
    from there on.
    """

    kind: Literal["json_schema", "json_object", "regex", "choice", "grammar"]
    spec: str = ""
    after_token_ids: tuple[int, ...] = ()

    def choice_grammar(self) -> str:
        """A ``choice`` constraint as an EBNF grammar (for engines that take grammars)."""
        choices = dict.fromkeys(json.loads(self.spec))
        return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick tokens. Defaults mean "greedy, until max_tokens"."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token plus top k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # (token id, bias) pairs added to the logits before sampling (OpenAI's logit_bias:
    # -100 bans a token, +100 all but forces it).
    logit_bias: tuple[tuple[int, float], ...] = ()
    constraint: Constraint | None = None


class RequestContext(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker needs to tie its work to the client's request: the request id
    its log lines carry and the W3C trace context of the caller's span (empty
    strings when the frontend does not trace)."""

    request_id: str = ""  # X-Request-Id (the client's, or the frontend's own)
    traceparent: str = ""  # W3C ``traceparent`` of the span that called this worker
    tracestate: str = ""


class EngineRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One sequence to generate. `n > 1` is fanned out by the frontend."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    # Set by the frontend when it resumes a request on another worker: tokens already
    # streamed to the client. The engine treats them as part of the prompt and
    # generates `sampling.max_tokens - len(resumed_token_ids)` new tokens, so that
    # `max_tokens` keeps meaning the whole completion's length.
    resumed_token_ids: list[int] = []
    version: int = WIRE_VERSION
    # Disaggregated serving (`dynamo_gateway.disagg.params`): {"do_remote_decode": true}
    # on a prefill leg, the prefill leg's handoff on a decode leg; owned by the engine.
    kv_transfer_params: dict[str, Any] | None = None
    # Set by the frontend: request id and trace context for the worker's logs and spans.
    context: RequestContext | None = None


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """Logprob of one generated token, with the top alternatives (token_id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


class EngineOutput(msgspec.Struct, kw_only=True):
    """New tokens of one request since the previous output (delta).

    `cached_tokens` is set on the first output: how many prompt tokens were
    served from the prefix cache instead of being computed.
    """

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    cached_tokens: int | None = None
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    # On a prefill leg's final output: where its KV blocks wait for the decode leg.
    kv_transfer_params: dict[str, Any] | None = None


class LoadMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's load, as its engine reports it."""

    active_requests: int = 0  # running (prefill or decode)
    waiting_requests: int = 0  # admitted, waiting for KV blocks or a batch slot
    kv_blocks_used: int = 0  # blocks referenced by live requests
    kv_blocks_total: int = 0  # device KV capacity in blocks

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
