"""Structured-output fields and tool_choice to one engine Constraint (pure)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from dynamo_gateway.errors import InvalidRequestError
from dynamo_gateway.frontend.structured import request_constraint, tool_constraint
from dynamo_gateway.protocol.openai import ChatCompletionRequest, decode_request

SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return decode_request(json.dumps(body).encode(), ChatCompletionRequest)


@pytest.mark.parametrize(
    ("fields", "kind", "spec", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "json_object", "", "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": SCHEMA},
                }
            },
            "json_schema",
            SCHEMA,
            "response_format",
        ),
        ({"guided_json": SCHEMA}, "json_schema", SCHEMA, "guided_json"),
        ({"guided_json": json.dumps(SCHEMA)}, "json_schema", SCHEMA, "guided_json"),
        ({"guided_regex": "[a-z]+"}, "regex", "[a-z]+", "guided_regex"),
        ({"guided_choice": ["yes", "no"]}, "choice", ["yes", "no"], "guided_choice"),
        ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"', "guided_grammar"),
        ({"structured_outputs": {"regex": "b+"}}, "regex", "b+", "structured_outputs"),
        ({"structured_outputs": {"json_object": True}}, "json_object", "", "structured_outputs"),
    ],
)
def test_each_field_becomes_one_constraint(
    fields: dict[str, Any], kind: str, spec: Any, param: str
) -> None:
    got = request_constraint(chat(**fields))
    assert got is not None
    constraint, where = got
    assert (constraint.kind, where) == (kind, param)
    if kind in ("json_schema", "choice"):
        assert json.loads(constraint.spec) == spec
    else:
        assert constraint.spec == spec


def test_no_field_no_constraint() -> None:
    assert request_constraint(chat()) is None
    assert request_constraint(chat(response_format={"type": "text"})) is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"guided_regex": "a", "guided_choice": ["b"]}, "only one structured-output constraint"),
        ({"response_format": {"type": "json_schema"}}, "needs `json_schema.schema`"),
        ({"guided_json": "{not json"}, "not valid JSON"),
        ({"guided_json": "[1, 2]"}, "must be a JSON Schema object"),
        ({"guided_choice": []}, "at least one choice"),
        ({"structured_outputs": {"regex": "a", "grammar": "b"}}, "exactly one of"),
        ({"structured_outputs": {}}, "exactly one of"),
    ],
)
def test_bad_fields_are_400s(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        request_constraint(chat(**fields))


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "now"}},
]


def test_named_tool_choice_constrains_the_arguments() -> None:
    req = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert req.tools is not None
    c = tool_constraint(req.tools, "get_weather", parallel=True)
    assert c.kind == "json_schema" and json.loads(c.spec) == SCHEMA
    no_params = tool_constraint(req.tools, "now", parallel=True)
    assert json.loads(no_params.spec) == {"type": "object", "properties": {}}


def test_required_constrains_a_list_of_calls_of_the_tools() -> None:
    req = chat(tools=TOOLS, tool_choice="required")
    assert req.tools is not None
    schema = json.loads(tool_constraint(req.tools, None, parallel=True).spec)
    ok = [{"name": "get_weather", "arguments": {"x": 1}}, {"name": "now", "arguments": {}}]
    jsonschema.validate(ok, schema)
    for bad in (
        [],
        [{"name": "get_weather", "arguments": {}}],
        [{"name": "other", "arguments": {}}],
        [{"name": "now"}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = json.loads(tool_constraint(req.tools, None, parallel=False).spec)
    assert single["maxItems"] == 1
