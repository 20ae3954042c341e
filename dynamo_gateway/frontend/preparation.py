"""From a validated OpenAI request to engine requests: template, tokens, limits, sampling.

Also where tools, structured outputs and reasoning meet the request: tools go
into the chat template (`preprocess.tool_prompt`), `tool_choice` and
`response_format` become the engine's `Constraint` (`frontend.structured`), and
the parsers that will shape the output are chosen (`OutputParsers`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_gateway import clock
from dynamo_gateway.errors import ContextLengthError, InvalidRequestError
from dynamo_gateway.frontend.shaping import ShapeSpec
from dynamo_gateway.frontend.structured import request_constraint, tool_constraint
from dynamo_gateway.parsers import ReasoningParserFactory, ToolParserFactory, detect_tool_parser
from dynamo_gateway.preprocess.tool_prompt import (
    FALLBACK_PARSER,
    messages_for_template,
    template_knows_tools,
)
from dynamo_gateway.protocol.engine import Constraint, EngineRequest, SamplingParams
from dynamo_gateway.protocol.openai import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NamedToolChoice,
    Tool,
    content_text,
    prompts,
    stop_strings,
)
from dynamo_gateway.router.base import RouteRequest
from dynamo_gateway.runtime.pool import ModelPool

if TYPE_CHECKING:
    from dynamo_gateway.registry import Registry

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


@dataclass(frozen=True)
class OutputParsers:
    """The frontend's tool-call and reasoning parsers, by setting or by model."""

    registry: Registry
    tool_call_parser: str | None = None  # `--tool-call-parser`; None: from the template
    reasoning_parser: str | None = None  # `--reasoning-parser`; None: no reasoning split

    def tool_parser(self, pool: ModelPool, *, native: bool) -> ToolParserFactory | None:
        """The parser of `pool`'s tool calls: the flag's, the template's, or (for a template
        without tools, whose prompt the gateway writes) Hermes; None if unknown."""
        name = self.tool_call_parser
        if name is None and native:
            template = pool.chat_template
            name = detect_tool_parser(
                template.source if template is not None else None,
                str(pool.card.config.get("model_type") or "") or None,
            )
        elif name is None:
            name = FALLBACK_PARSER
        return self.registry.tool_parsers.get(name) if name is not None else None

    def reasoning(self) -> ReasoningParserFactory | None:
        name = self.reasoning_parser
        return self.registry.reasoning_parsers.get(name) if name is not None else None


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
    stream_interval: int = 1  # tokens per streamed event (`frontend.stream_interval`)
    shape: ShapeSpec | None = None  # tools / reasoning: how the output is split


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


async def _encode(pool: ModelPool, text: str, *, add_special_tokens: bool) -> list[int]:
    tok = pool.tokenizer
    if len(text) > _THREAD_TOKENIZE_CHARS:
        return await asyncio.to_thread(tok.encode, text, add_special_tokens=add_special_tokens)
    return tok.encode(text, add_special_tokens=add_special_tokens)


def _message(m: ChatMessage) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": m.role, "content": content_text(m)}
    if m.name is not None:
        msg["name"] = m.name
    if m.tool_calls:
        msg["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in m.tool_calls
        ]  # fmt: skip
    if m.tool_call_id is not None:
        msg["tool_call_id"] = m.tool_call_id
    if m.reasoning_content is not None:
        msg["reasoning_content"] = m.reasoning_content
    return msg


def _tool_def(t: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": t.function.name}
    if t.function.description is not None:
        function["description"] = t.function.description
    function["parameters"] = t.function.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _shape_and_constraint(
    pool: ModelPool, req: ChatCompletionRequest, parsers: OutputParsers, *, native: bool
) -> tuple[ShapeSpec | None, Constraint | None]:
    """How the output is shaped and what constrains it, from tools and formats."""
    asked = request_constraint(req)
    constraint = asked[0] if asked is not None else None
    reasoning = parsers.reasoning()
    tools = req.tools or []
    choice = req.tool_choice
    if not tools or choice == "none":
        shape = ShapeSpec(reasoning=reasoning) if reasoning is not None else None
        return shape, constraint
    defs = [_tool_def(t) for t in tools]
    if choice is None or choice == "auto":
        factory = parsers.tool_parser(pool, native=native)
        if factory is None:
            raise InvalidRequestError(
                f"model {pool.name!r} has no known tool-call format: start the gateway with "
                '--tool-call-parser NAME, or use tool_choice "required" or a named function',
                param="tools",
            )
        return ShapeSpec("parse", factory, defs, reasoning=reasoning), constraint
    if asked is not None:
        raise InvalidRequestError(
            f"tool_choice {'required' if choice == 'required' else 'with a named function'} "
            f"and {asked[1]} cannot both constrain the output",
            param=asked[1],
        )
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        shape = ShapeSpec("named", named=name, reasoning=reasoning)
        return shape, tool_constraint(tools, name, parallel=req.parallel_tool_calls)
    shape = ShapeSpec("required", reasoning=reasoning)
    return shape, tool_constraint(tools, None, parallel=req.parallel_tool_calls)


async def prepare_chat(
    pool: ModelPool,
    req: ChatCompletionRequest,
    session_id: str | None,
    parsers: OutputParsers,
) -> Prepared:
    template = pool.chat_template
    if template is None:
        raise InvalidRequestError(
            f"model {pool.name!r} has no chat template; use /v1/completions", param="messages"
        )
    native = template_knows_tools(template.source)
    use_tools = bool(req.tools) and req.tool_choice != "none"
    messages, tools_var = messages_for_template(
        [_message(m) for m in req.messages],
        [_tool_def(t) for t in req.tools or ()] if use_tools else None,
        native=native,
    )
    text = template.render(messages, add_generation_prompt=True, tools=tools_var)
    ids = await _encode(pool, text, add_special_tokens=False)
    max_tokens = _max_tokens(
        pool, len(ids), req.max_completion_tokens or req.max_tokens, "messages"
    )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    shape, constraint = _shape_and_constraint(pool, req, parsers, native=native)
    if constraint is not None and shape is not None and shape.reasoning is not None:
        # Free text while the model reasons; the constraint starts after it.
        marker = shape.reasoning().end_marker
        after = tuple(pool.tokenizer.encode(marker, add_special_tokens=False))
        constraint = msgspec.structs.replace(constraint, after_token_ids=after)
    sampling = _sampling(req, max_tokens, logprobs, pool, constraint)
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
        shape=shape,
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
    asked = request_constraint(req)
    sampling = _sampling(req, max_tokens, req.logprobs, pool, asked[0] if asked else None)
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


def _logit_bias(pool: ModelPool, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    vocab = pool.card.vocab_size or pool.tokenizer.vocab_size
    out = []
    for key, value in bias.items():
        token = int(key)  # digits only: checked when the body was decoded
        if token >= vocab:
            raise InvalidRequestError(
                f"logit_bias names token {token}, outside this model's vocabulary of {vocab}",
                param="logit_bias",
            )
        out.append((token, float(value)))
    return tuple(sorted(out))


def _sampling(
    req: ChatCompletionRequest | CompletionRequest,
    max_tokens: int,
    logprobs: int | None,
    pool: ModelPool,
    constraint: Constraint | None,
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
        logit_bias=_logit_bias(pool, req.logit_bias),
        constraint=constraint,
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
