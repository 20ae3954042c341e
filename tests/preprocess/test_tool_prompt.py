"""Tool use written into the messages a chat template renders (pure)."""

from __future__ import annotations

import json
from typing import Any

from dynamo_gateway.parsers.hermes import HermesToolParser
from dynamo_gateway.preprocess.tool_prompt import messages_for_template, template_knows_tools

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
LOOP: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def test_a_template_that_knows_tools_gets_them_and_object_arguments() -> None:
    assert template_knows_tools("{% if tools %}...{% endif %}")
    assert not template_knows_tools("{{ messages[0]['content'] }}")
    messages, tools = messages_for_template(LOOP, TOOLS, native=True)
    assert tools == TOOLS
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[3] == LOOP[3]
    assert LOOP[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # untouched


def test_without_template_support_the_conversation_carries_the_tools_in_hermes_form() -> None:
    messages, tools = messages_for_template(LOOP, TOOLS, native=False)
    assert tools is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert system.startswith("Be brief.") and "<tools>" in system and "get_weather" in system
    # The earlier call reads back with the parser the gateway then uses for this model.
    parsed = HermesToolParser().parse(messages[2]["content"])
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert messages[3]["content"] == "<tool_response>\nsunny\n</tool_response>"
    assert all(isinstance(m["content"], str) for m in messages)  # no None for a plain template


def test_consecutive_tool_results_share_one_user_turn_and_no_system_is_made_up() -> None:
    loop = [
        LOOP[1],
        {**LOOP[2], "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
        {**LOOP[3]},
        {**LOOP[3], "tool_call_id": "call_2", "content": "warm"},
    ]
    messages, _ = messages_for_template(loop, TOOLS, native=False)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"].count("<tool_call>") == 2
    assert messages[3]["content"].count("<tool_response>") == 2
    plain, tools = messages_for_template([LOOP[1]], None, native=False)
    assert plain == [LOOP[1]] and tools is None
