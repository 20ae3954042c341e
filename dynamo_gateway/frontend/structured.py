"""From a request's structured-output fields to one engine-neutral `Constraint` (pure).

OpenAI's `response_format` (``json_object``, ``json_schema``), vLLM's older
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` and
its newer ``structured_outputs`` object all say the same kind of thing; a
request may use one of them. ``tool_choice`` "required" or a named function is a
constraint too (`tool_constraint`): the model's output is made to be the
call(s), so even a small model returns a valid call.

Every engine enforces the constraint or refuses the request with a 400
(`dynamo_gateway.protocol.engine.Constraint`); what is wrong with the request
itself (two constraints at once, a schema that is not a JSON object, an empty
choice) is a 400 here, before any engine sees it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dynamo_gateway.errors import InvalidRequestError
from dynamo_gateway.protocol.engine import Constraint
from dynamo_gateway.protocol.openai import ChatCompletionRequest, CompletionRequest, Tool

__all__ = ["REQUIRED_CALLS_KEYS", "request_constraint", "tool_constraint"]

#: The keys of each element of a `tool_choice: "required"` output (a JSON array).
REQUIRED_CALLS_KEYS = ("name", "arguments")


def _schema_text(value: dict[str, Any] | str, param: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{param} must be a JSON Schema object", param=param)
    return json.dumps(value, separators=(",", ":"))


def _choice(values: Sequence[str], param: str) -> Constraint:
    if not values:
        raise InvalidRequestError(f"{param} needs at least one choice", param=param)
    return Constraint(kind="choice", spec=json.dumps(list(values)))


def request_constraint(
    req: ChatCompletionRequest | CompletionRequest,
) -> tuple[Constraint, str] | None:
    """The constraint a request asks for and the field that asked, or None."""
    found: list[tuple[Constraint, str]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append((Constraint(kind="json_object"), "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema is None:
            raise InvalidRequestError(
                "response_format json_schema needs `json_schema.schema`",
                param="response_format.json_schema",
            )
        spec = _schema_text(fmt.json_schema.schema, "response_format.json_schema.schema")
        found.append((Constraint(kind="json_schema", spec=spec), "response_format"))
    if req.guided_json is not None:
        spec = _schema_text(req.guided_json, "guided_json")
        found.append((Constraint(kind="json_schema", spec=spec), "guided_json"))
    if req.guided_regex is not None:
        found.append((Constraint(kind="regex", spec=req.guided_regex), "guided_regex"))
    if req.guided_choice is not None:
        found.append((_choice(req.guided_choice, "guided_choice"), "guided_choice"))
    if req.guided_grammar is not None:
        found.append((Constraint(kind="grammar", spec=req.guided_grammar), "guided_grammar"))
    so = req.structured_outputs
    if so is not None:
        inner: list[Constraint] = []
        if so.json is not None:
            spec = _schema_text(so.json, "structured_outputs.json")
            inner.append(Constraint(kind="json_schema", spec=spec))
        if so.regex is not None:
            inner.append(Constraint(kind="regex", spec=so.regex))
        if so.choice is not None:
            inner.append(_choice(so.choice, "structured_outputs.choice"))
        if so.grammar is not None:
            inner.append(Constraint(kind="grammar", spec=so.grammar))
        if so.json_object:
            inner.append(Constraint(kind="json_object"))
        if len(inner) != 1:
            raise InvalidRequestError(
                "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                param="structured_outputs",
            )
        found.append((inner[0], "structured_outputs"))
    if len(found) > 1:
        names = ", ".join(sorted({param for _, param in found}))
        raise InvalidRequestError(
            f"only one structured-output constraint per request (got {names})", param=found[1][1]
        )
    return found[0] if found else None


def _parameters(tool: Tool) -> dict[str, Any]:
    params = tool.function.parameters
    return params if params is not None else {"type": "object", "properties": {}}


def tool_constraint(tools: Sequence[Tool], choice: str | None, *, parallel: bool) -> Constraint:
    """The constraint of `tool_choice` "required" (`choice` None) or a named function.

    A named function's output is its arguments object. "required" outputs a JSON
    array of ``{"name": ..., "arguments": {...}}`` (one element unless `parallel`).
    """
    if choice is not None:
        tool = next(t for t in tools if t.function.name == choice)
        spec = json.dumps(_parameters(tool), separators=(",", ":"))
        return Constraint(kind="json_schema", spec=spec)
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "arguments": _parameters(t),
            },
            "required": list(REQUIRED_CALLS_KEYS),
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
    }
    if not parallel:
        schema["maxItems"] = 1
    return Constraint(kind="json_schema", spec=json.dumps(schema, separators=(",", ":")))
