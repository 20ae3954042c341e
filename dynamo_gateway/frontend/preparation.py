"""From a validated OpenAI request to engine requests: template, tokens, limits, sampling."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from dynamo_gateway import clock
from dynamo_gateway.errors import ContextLengthError, InvalidRequestError
from dynamo_gateway.protocol.engine import EngineRequest, SamplingParams
from dynamo_gateway.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    content_text,
    prompts,
    stop_strings,
)
from dynamo_gateway.router.base import RouteRequest
from dynamo_gateway.runtime.pool import ModelPool

# Prompts longer than this (characters) are tokenized in a thread so that one
# huge prompt does not stall every stream on the event loop.
_THREAD_TOKENIZE_CHARS = 16_384


@dataclass(slots=True)
class Choice:
    """One generated sequence: a prompt sampled once."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    engine_request: EngineRequest
    route: RouteRequest


@dataclass(slots=True)
class Prepared:
    """Everything needed to run and answer one request."""

    chat: bool
    response_id: str
    created: int
    model: str
    pool: ModelPool
    choices: list[Choice]
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None
    n: int
    prompt_tokens: int
    started: float = field(default_factory=clock.now)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


async def _encode(pool: ModelPool, text: str, *, add_special_tokens: bool) -> list[int]:
    tok = pool.tokenizer
    if len(text) > _THREAD_TOKENIZE_CHARS:
        return await asyncio.to_thread(tok.encode, text, add_special_tokens=add_special_tokens)
    return tok.encode(text, add_special_tokens=add_special_tokens)


async def prepare_chat(
    pool: ModelPool, req: ChatCompletionRequest, session_id: str | None
) -> Prepared:
    template = pool.chat_template
    if template is None:
        raise InvalidRequestError(
            f"model {pool.name!r} has no chat template; use /v1/completions", param="messages"
        )
    messages: list[dict[str, Any]] = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": m.role, "content": content_text(m)}
        if m.name is not None:
            msg["name"] = m.name
        messages.append(msg)
    text = template.render(messages, add_generation_prompt=True)
    ids = await _encode(pool, text, add_special_tokens=False)
    max_tokens = _max_tokens(
        pool, len(ids), req.max_completion_tokens or req.max_tokens, "messages"
    )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    sampling = _sampling(req, max_tokens, logprobs)
    rid = _new_id("chatcmpl")
    return Prepared(
        chat=True,
        response_id=rid,
        created=int(time.time()),
        model=req.model,
        pool=pool,
        choices=_fan_out(rid, [ids], req.n, sampling, session_id),
        stop=stop_strings(req),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        logprobs=logprobs,
        n=req.n,
        prompt_tokens=len(ids),
    )


async def prepare_completion(
    pool: ModelPool, req: CompletionRequest, session_id: str | None
) -> Prepared:
    all_ids: list[list[int]] = []
    vocab = pool.tokenizer.vocab_size
    for p in prompts(req):
        if isinstance(p, str):
            all_ids.append(await _encode(pool, p, add_special_tokens=True))
        else:
            top = max(p, default=0)  # one C-level pass
            if top >= vocab:
                raise InvalidRequestError(
                    f"token id {top} is out of range for a vocabulary of {vocab}", param="prompt"
                )
            all_ids.append(p)
    if any(not ids for ids in all_ids):
        raise InvalidRequestError("`prompt` must not be empty", param="prompt")
    longest = max(len(ids) for ids in all_ids)
    max_tokens = _max_tokens(pool, longest, req.max_tokens, "prompt")
    sampling = _sampling(req, max_tokens, req.logprobs)
    rid = _new_id("cmpl")
    return Prepared(
        chat=False,
        response_id=rid,
        created=int(time.time()),
        model=req.model,
        pool=pool,
        choices=_fan_out(rid, all_ids, req.n, sampling, session_id),
        stop=stop_strings(req),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        logprobs=req.logprobs,
        n=req.n,
        prompt_tokens=sum(len(ids) for ids in all_ids),
    )


def _max_tokens(pool: ModelPool, prompt_len: int, requested: int | None, param: str) -> int:
    context = pool.card.max_model_len
    if prompt_len >= context or (requested is not None and prompt_len + requested > context):
        asked = prompt_len + (requested or 0)
        raise ContextLengthError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{asked} tokens ({prompt_len} in the {param}, {requested or 0} in the completion). "
            "Please reduce the length of the prompt or completion.",
            param=param,
        )
    return requested if requested is not None else context - prompt_len


def _sampling(
    req: ChatCompletionRequest | CompletionRequest, max_tokens: int, logprobs: int | None
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        seed=req.seed,
        min_tokens=min(req.min_tokens, max_tokens),
        ignore_eos=req.ignore_eos,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        logprobs=logprobs,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
    )


def _fan_out(
    rid: str,
    all_ids: list[list[int]],
    n: int,
    sampling: SamplingParams,
    session_id: str | None,
) -> list[Choice]:
    choices = []
    for p, ids in enumerate(all_ids):
        for i in range(n):
            index = p * n + i
            params = sampling
            if sampling.seed is not None and i > 0:
                # Each of the n samples gets its own reproducible stream.
                params = _with_seed(sampling, (sampling.seed + i) % 2**63)
            sub_id = rid if len(all_ids) * n == 1 else f"{rid}-{index}"
            choices.append(
                Choice(
                    index=index,
                    prompt_index=p,
                    prompt_ids=ids,
                    engine_request=EngineRequest(
                        request_id=sub_id, prompt_token_ids=ids, sampling=params
                    ),
                    route=RouteRequest(sub_id, ids, session_id),
                )
            )
    return choices


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    import msgspec

    return msgspec.structs.replace(params, seed=seed)
