"""Responses API bodies to the chat requests that run them (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dynamo_gateway.errors import InvalidRequestError
from dynamo_gateway.protocol.openai import NamedToolChoice, decode_body
from dynamo_gateway.protocol.responses import ResponsesRequest, to_chat


def responses(**fields: Any) -> ResponsesRequest:
    return decode_body(json.dumps({"model": "m", **fields}).encode(), ResponsesRequest)


def test_a_string_input_with_instructions_is_a_system_and_a_user_message() -> None:
    chat = to_chat(responses(input="Hi", instructions="Be brief.", max_output_tokens=7))
    assert [(m.role, m.content) for m in chat.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert chat.max_tokens == 7


def test_items_of_a_tool_loop_become_chat_messages() -> None:
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "w", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": "rain"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "ok"}],
        },
    ]
    tools = [{"type": "function", "name": "w", "parameters": {"type": "object"}}]
    chat = to_chat(
        responses(input=items, tools=tools, tool_choice={"type": "function", "name": "w"})
    )
    roles = [m.role for m in chat.messages]
    assert roles == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c.id for c in chat.messages[1].tool_calls or ()] == ["c1", "c2"]  # one turn, two calls
    assert chat.messages[2].tool_call_id == "c1" and chat.messages[3].content == "rain"
    assert chat.tools is not None and chat.tools[0].function.name == "w"
    assert isinstance(chat.tool_choice, NamedToolChoice) and chat.tool_choice.function.name == "w"


def test_text_format_is_the_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"format": {"type": "json_schema", "name": "x", "schema": schema, "strict": True}}
    chat = to_chat(responses(input="x", text=fmt))
    assert chat.response_format is not None and chat.response_format.json_schema is not None
    assert chat.response_format.json_schema.schema == schema


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"input": "x", "store": True}, "stateless"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "text only"),
        ({"input": [{"type": "web_search_call"}]}, "not supported"),
        ({"input": [{"type": "function_call", "call_id": "c"}]}, "needs 'name'"),
        ({"input": "x", "tool_choice": "required"}, "needs `tools`"),
    ],
)
def test_what_cannot_be_honoured_is_a_400(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        to_chat(responses(**fields))


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="Unrecognized request argument supplied: foo"):
        responses(input="x", foo=1)
