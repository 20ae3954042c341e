"""OpenAI request bodies, decoded and validated in one pass by msgspec.

Types and ranges live in the annotations, so a wrong type or an out-of-range
value is rejected while decoding, with the JSON path of the offending field.
Unknown fields are rejected too (400 naming the field): a field the gateway
does not act on must not look accepted. The few OpenAI fields that change
nothing here (`user`, `metadata`, `store: false`, `service_tier`) are declared
and accepted; fields it cannot honour (e.g. ``echo``) are refused explicitly.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from dynamo_gateway.errors import InvalidRequestError

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=2.0)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
N = Annotated[int, Meta(ge=1, le=128)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
MAX_STOP = 16

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A part of a request body: unknown fields are an error, not ignored."""


class StreamOptions(_Body, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; usage comes at the end here


class TextPart(_Body, kw_only=True):
    type: str
    text: str | None = None


class FunctionCall(_Body, kw_only=True):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallIn(_Body, kw_only=True):
    """A tool call of an earlier assistant message, sent back by the client."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body, kw_only=True):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this answers
    reasoning_content: str | None = None  # an earlier answer's reasoning, sent back


class FunctionDef(_Body, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body, kw_only=True):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(_Body, kw_only=True):
    name: str


class NamedToolChoice(_Body, kw_only=True):
    type: Literal["function"]
    function: ToolChoiceFunction


class JsonSchemaFormat(_Body, kw_only=True):
    name: str = "output"
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(_Body, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body, kw_only=True):
    """vLLM's `structured_outputs` (exactly one of these)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class NvExt(_Body, kw_only=True):
    """NVIDIA Dynamo's request extensions (``nvext``), the part the gateway acts on.

    ``extra_fields`` asks for response metadata, as in Dynamo: ``"worker_id"`` (the
    workers that served the request) and ``"timing"`` (queue, routing, TTFT and
    total time), returned in the body's ``nvext`` or the last streamed chunk's.
    Dynamo's other ``nvext`` fields are refused like any unknown field.
    """

    extra_fields: list[Literal["worker_id", "timing"]] | None = None


Bias = Annotated[float, Meta(ge=-100.0, le=100.0)]


class _Sampling(_Body, kw_only=True):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    n: N = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[NonNegInt] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: bool = False
    min_tokens: NonNegInt = 0
    logit_bias: dict[str, Bias] | None = None  # token id (as a string) -> bias
    response_format: ResponseFormat | None = None
    # vLLM's structured-output fields (the older `guided_*` and the newer object).
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    # Accepted, nothing to do: they describe the caller or ask for no side effect.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool = False
    service_tier: Literal["auto", "default"] | None = None
    nvext: NvExt | None = None  # Dynamo's extensions: response metadata on request


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class CompletionRequest(_Sampling, kw_only=True):
    # str | list[str] | list[int] | list[list[int]]: checked in `prompts()`, since
    # msgspec unions hold one array type only.
    prompt: str | list[Any]
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: PositiveInt | None = None


Endpoint = Literal["chat", "completions"]
R = TypeVar("R", bound=_Sampling)

_PATH = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`")


def decode_request(body: bytes, kind: type[R]) -> R:
    """Decode and validate a request body, or raise InvalidRequestError (400)."""
    req = decode_body(body, kind)
    check_request(req)
    return req


B = TypeVar("B", bound=msgspec.Struct)


def decode_body(body: bytes, kind: type[B]) -> B:
    """Decode a JSON body into `kind` (types and ranges checked), or InvalidRequestError."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH.search(message)
        param = match.group(1) if match else None
        unknown = _UNKNOWN.search(message)
        if unknown is not None:
            field = f"{param}.{unknown[1]}" if param else unknown[1]
            message = f"Unrecognized request argument supplied: {field} (not supported here)"
            param = field
        raise InvalidRequestError(message, param=param or None) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from None
    except RecursionError:  # msgspec's depth guard on a deeply nested object
        raise InvalidRequestError(
            "The JSON body of your request is nested too deeply", code="invalid_json"
        ) from None


def check_request(req: _Sampling) -> None:
    """What decoding alone does not check (stop lists, tool_choice vs tools, roles, ...)."""
    if not req.model:
        raise InvalidRequestError("`model` must not be empty", param="model")
    stops = stop_strings(req)
    if len(stops) > MAX_STOP:
        raise InvalidRequestError(f"at most {MAX_STOP} stop sequences are allowed", param="stop")
    if any(not s for s in stops):
        raise InvalidRequestError("stop sequences must not be empty", param="stop")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError(
            "`stream_options` is only allowed when `stream` is true", param="stream_options"
        )
    if req.store:
        raise InvalidRequestError(
            "`store: true` is not supported: this gateway keeps no completions", param="store"
        )
    if req.logit_bias:
        for key in req.logit_bias:
            if not key.isdigit():
                raise InvalidRequestError(
                    f"logit_bias keys are token ids; {key!r} is not one", param="logit_bias"
                )
    if isinstance(req, ChatCompletionRequest):
        _check_chat(req)
    elif isinstance(req, CompletionRequest):
        _check_completion(req)


def _check_chat(req: ChatCompletionRequest) -> None:
    if not req.messages:
        raise InvalidRequestError("`messages` must hold at least one message", param="messages")
    for i, message in enumerate(req.messages):
        if message.role not in ROLES:
            raise InvalidRequestError(
                f"unknown role {message.role!r}; expected one of {', '.join(sorted(ROLES))}",
                param=f"messages[{i}].role",
            )
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type != "text" or part.text is None:
                    raise InvalidRequestError(
                        f"content part of type {part.type!r} is not supported; "
                        "this model takes text only",
                        param=f"messages[{i}].content[{j}]",
                    )
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError(
            "`top_logprobs` requires `logprobs` to be true", param="top_logprobs"
        )
    names = [t.function.name for t in req.tools or ()]
    if len(set(names)) != len(names):
        raise InvalidRequestError("two tools share a name", param="tools")
    choice = req.tool_choice
    if choice is not None and choice != "none" and not names:
        raise InvalidRequestError(
            f"tool_choice {_choice_name(choice)!r} needs `tools`", param="tool_choice"
        )
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequestError(
            f"tool_choice names {choice.function.name!r}, which is not one of the tools",
            param="tool_choice",
        )
    for i, message in enumerate(req.messages):
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequestError(
                "a tool message needs `tool_call_id`", param=f"messages[{i}].tool_call_id"
            )
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequestError(
                "only assistant messages carry `tool_calls`", param=f"messages[{i}].tool_calls"
            )


def _choice_name(choice: str | NamedToolChoice) -> str:
    return choice if isinstance(choice, str) else choice.function.name


def _check_completion(req: CompletionRequest) -> None:
    if req.echo:
        raise InvalidRequestError("`echo` is not supported", param="echo")
    if req.suffix:
        raise InvalidRequestError("`suffix` is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequestError("`best_of` other than `n` is not supported", param="best_of")
    prompts(req)  # validates the shape


def stop_strings(req: _Sampling) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


def prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request: each a string or a list of token ids."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise InvalidRequestError("`prompt` must not be empty", param="prompt")
    if all(isinstance(x, str) for x in p):
        return list(p)
    if _is_token_list(p):
        return [list(p)]
    if all(isinstance(x, list) and _is_token_list(x) for x in p):
        return [list(x) for x in p]
    raise InvalidRequestError(
        "`prompt` must be a string, a list of strings, a list of token ids, "
        "or a list of lists of token ids",
        param="prompt",
    )


def _is_token_list(xs: list[Any]) -> bool:
    """Non-empty, every item a non-negative int (not a bool). C-level passes only: a
    100k-token prompt is checked in a few ms rather than tens."""
    return bool(xs) and set(map(type, xs)) == {int} and min(xs) >= 0


def content_text(message: ChatMessage) -> str | None:
    """A message's text, with text parts joined."""
    if isinstance(message.content, list):
        return "".join(part.text or "" for part in message.content)
    return message.content
