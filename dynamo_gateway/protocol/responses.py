"""The OpenAI Responses API request body (`POST /v1/responses`), and its chat form.

A Responses request is a chat request in other clothes: `instructions` and
`input` items are messages, function tools are tools, `text.format` is the
response format. `to_chat()` turns it into the `ChatCompletionRequest` the
gateway already knows how to run, so templates, constraints, tool and
reasoning parsers work the same way behind both endpoints.

Stateless: nothing is stored, so `store: true` and `previous_response_id` are
refused (400) instead of pretending; `input` must carry the conversation.
"""

from __future__ import annotations

from typing import Any, Literal

from dynamo_gateway.errors import InvalidRequestError
from dynamo_gateway.protocol.openai import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDef,
    JsonSchemaFormat,
    NamedToolChoice,
    PositiveInt,
    ResponseFormat,
    Temperature,
    Tool,
    ToolCallIn,
    ToolChoiceFunction,
    TopP,
    _Body,
    check_request,
)

__all__ = ["ResponsesRequest", "to_chat"]


class FunctionTool(_Body, kw_only=True):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Body, kw_only=True):
    type: Literal["function"]
    name: str


class TextFormat(_Body, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str = "output"
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Body, kw_only=True):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_Body, kw_only=True):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in (
                "input_text", "output_text", "text",
            ):  # fmt: skip
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequestError(
                    f"content of type {kind!r} is not supported; this model takes text only",
                    param=f"{where}.content[{i}]",
                )
            parts.append(str(part.get("text", "")))
        return "\n".join(parts)
    raise InvalidRequestError("content must be a string or a list of text parts", param=where)


def _messages(req: ResponsesRequest) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    if req.instructions:
        out.append(ChatMessage(role="system", content=req.instructions))
    if isinstance(req.input, str):
        out.append(ChatMessage(role="user", content=req.input))
        return out
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequestError(f"unknown role {role!r}", param=f"{where}.role")
            out.append(ChatMessage(role=role, content=_text_of(item.get("content"), where)))
        elif kind == "function_call":
            try:
                call = ToolCallIn(
                    id=str(item["call_id"]),
                    function=FunctionCall(name=str(item["name"]), arguments=str(item["arguments"])),
                )
            except KeyError as exc:
                raise InvalidRequestError(
                    f"a function_call item needs {exc.args[0]!r}", param=where
                ) from None
            last = out[-1] if out else None
            if last is not None and last.role == "assistant" and last.tool_calls is not None:
                last.tool_calls.append(call)  # parallel calls of one assistant turn
            else:
                out.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif kind == "function_call_output":
            if "call_id" not in item:
                raise InvalidRequestError("a function_call_output needs 'call_id'", param=where)
            output = item.get("output", "")
            text = output if isinstance(output, str) else _text_of(output, where)
            out.append(ChatMessage(role="tool", content=text, tool_call_id=str(item["call_id"])))
        elif kind == "reasoning":
            continue  # an earlier answer's reasoning: models do not take it back
        else:
            raise InvalidRequestError(
                f"input item of type {kind!r} is not supported", param=f"{where}.type"
            )
    return out


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that runs `req` (raises InvalidRequestError for what cannot)."""
    if req.store:
        raise InvalidRequestError(
            "`store: true` is not supported: this gateway is stateless", param="store"
        )
    if req.previous_response_id is not None:
        raise InvalidRequestError(
            "previous_response_id is not supported (stateless): send the conversation "
            "as `input` items",
            param="previous_response_id",
        )
    tools = [
        Tool(type="function", function=FunctionDef(
            name=t.name, description=t.description, parameters=t.parameters, strict=t.strict,
        ))
        for t in req.tools or ()
    ]  # fmt: skip
    choice: Literal["none", "auto", "required"] | NamedToolChoice | None
    if isinstance(req.tool_choice, NamedFunction):
        choice = NamedToolChoice(
            type="function", function=ToolChoiceFunction(name=req.tool_choice.name)
        )
    else:
        choice = req.tool_choice
    fmt = req.text.format if req.text is not None else None
    response_format = None
    if fmt is not None and fmt.type == "json_object":
        response_format = ResponseFormat(type="json_object")
    elif fmt is not None and fmt.type == "json_schema":
        response_format = ResponseFormat(
            type="json_schema",
            json_schema=JsonSchemaFormat(
                name=fmt.name, description=fmt.description, schema=fmt.schema, strict=fmt.strict
            ),
        )
    chat = ChatCompletionRequest(
        model=req.model,
        messages=_messages(req),
        max_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        tools=tools or None,
        tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=response_format,
        stream=req.stream,
        user=req.user,
    )
    check_request(chat)  # what a decoded chat body is checked for (roles, tool_choice, ...)
    return chat
