"""Agents through the official openai client: tools, structured output, /v1/responses.

One gateway per engine (the reference engine on the demo model, and the mocker),
both random-weight or simulated: whatever a model would say, `tool_choice`
"required" or a named function and `response_format` must still come back as
valid calls and schema-valid JSON, enforced by constrained decoding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from dynamo_gateway.testing import GatewayProcess, start_gateway

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
        "required": ["zone"], "additionalProperties": False}  # fmt: skip
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


@pytest.fixture(scope="module", params=["reference", "mocker"])
def gateway(
    request: pytest.FixtureRequest, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    args = ["--model", str(demo_model), "--served-model-name", "demo", "--engine", request.param]
    args += ["--device", "cpu"] if request.param == "reference" else ["--speedup", "100"]
    gw = start_gateway(args, tmp_path_factory.mktemp(f"agents-{request.param}"))
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0) as c:
        yield c


def _valid(name: str, arguments: str) -> dict[str, Any]:
    value = json.loads(arguments)
    jsonschema.validate(value, SCHEMAS[name])
    return value  # type: ignore[no-any-return]


def test_required_tool_choice_returns_valid_calls(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="demo", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200,
        temperature=0,
    )  # fmt: skip
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls or []
    assert calls and choice.message.content is None
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        _valid(call.function.name, call.function.arguments)


def test_a_named_tool_streams_its_arguments(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="demo", messages=ASK, tools=TOOLS, max_tokens=200, stream=True, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    names, ids, fragments, finish = [], [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                assert call.index == 0
                if call.id:
                    ids.append(call.id)
                if call.function and call.function.name:
                    names.append(call.function.name)
                if call.function and call.function.arguments:
                    fragments.append(call.function.arguments)
    assert names == ["get_weather"] and len(ids) == 1
    assert len(fragments) > 1  # streamed, not sent whole
    _valid("get_weather", "".join(fragments))
    assert finish == "tool_calls"


def test_a_full_tool_loop_through_the_chat_template(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model="demo", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200,
        temperature=0,
    )  # fmt: skip
    message = first.choices[0].message
    assert message.tool_calls
    history: list[Any] = [*ASK, message.model_dump(exclude_none=True)]
    for call in message.tool_calls:
        history.append({"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'})
    answer = client.chat.completions.create(
        model="demo", messages=history, tools=TOOLS, tool_choice="none", max_tokens=8,
        stream_options=None,
    )  # fmt: skip
    assert answer.choices[0].message.content
    assert not answer.choices[0].message.tool_calls
    # The call and its result reached the prompt: longer than the question alone.
    alone = client.chat.completions.create(
        model="demo", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1
    )
    assert answer.usage is not None and alone.usage is not None
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens + 10


SHAPE = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_holds(client: openai.OpenAI, stream: bool) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": SHAPE}}
    if stream:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="demo", messages=ASK, response_format=fmt, max_tokens=120, stream=True
            )
            if c.choices
        )
    else:
        resp = client.chat.completions.create(
            model="demo", messages=ASK, response_format=fmt, max_tokens=120
        )
        assert resp.choices[0].finish_reason == "stop"
        text = resp.choices[0].message.content or ""
    jsonschema.validate(json.loads(text), SHAPE)


def test_guided_regex_and_choice_hold(client: openai.OpenAI) -> None:
    regex = client.completions.create(
        model="demo", prompt="A date:", max_tokens=20, extra_body={"guided_regex": r"\d{4}-\d{2}"}
    )
    text = regex.choices[0].text
    assert len(text) == 7 and text[4] == "-" and text.replace("-", "").isdigit(), text
    choice = client.chat.completions.create(
        model="demo", messages=ASK, max_tokens=10, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert choice.choices[0].message.content in ("yes", "no")


def test_an_uncompilable_schema_is_a_400(client: openai.OpenAI) -> None:
    schema = {"type": "object", "minProperties": "x"}
    bad: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", messages=ASK, response_format=bad)
    assert info.value.status_code == 400
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="demo", messages=ASK, extra_body={"guided_regex": "(unclosed"}, stream=stream
            )


def test_logit_bias_forces_a_token_and_checks_the_vocabulary(
    client: openai.OpenAI, gateway: GatewayProcess
) -> None:
    # (The engine conformance suite checks bans and forcing by token id.)
    forced = client.completions.create(
        model="demo", prompt="x", max_tokens=5, temperature=0, logit_bias={"42": 100}, logprobs=0
    )
    assert forced.choices[0].logprobs is not None
    tokens = forced.choices[0].logprobs.tokens or []
    assert len(tokens) == 5 and len(set(tokens)) == 1, tokens  # token 42, every time
    r = httpx.post(f"{gateway.url}/v1/completions", json={
        "model": "demo", "prompt": "x", "logit_bias": {"99999999": 5}})  # fmt: skip
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


def test_unknown_fields_are_refused(gateway: GatewayProcess) -> None:
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={
        "model": "demo", "messages": ASK, "functions": [{"name": "f"}]})  # fmt: skip
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "functions"


# -- the Responses API ------------------------------------------------------------------


RESPONSE_TOOLS: list[Any] = [
    {"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}
]


def test_responses_text_and_its_stream(client: openai.OpenAI) -> None:
    # Greedy: sampled, the random-weight demo model may draw its EOS within six tokens.
    resp = client.responses.create(
        model="demo", input="Say hello.", max_output_tokens=6, temperature=0
    )
    assert resp.object == "response" and resp.output_text
    assert resp.usage is not None and resp.usage.output_tokens == 6
    deltas, kinds = [], []
    with client.responses.stream(
        model="demo", input="Say hello.", max_output_tokens=6, instructions="Be brief.",
        temperature=0,
    ) as stream:  # fmt: skip
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type == "response.incomplete":
                final = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.incomplete"  # it stopped at max_output_tokens
    # Six tokens; a token that ends inside a UTF-8 character waits for the next one.
    assert 1 <= len(deltas) <= 6 and all(deltas)
    assert "".join(deltas) == final.output_text
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"


def test_responses_tool_call_and_structured_output(client: openai.OpenAI) -> None:
    resp = client.responses.create(
        model="demo", input="Weather in Oslo?", tools=RESPONSE_TOOLS, tool_choice="required",
        max_output_tokens=200, temperature=0, parallel_tool_calls=False,
    )  # fmt: skip
    calls = [item for item in resp.output if item.type == "function_call"]
    assert calls and resp.status == "completed"
    _valid(calls[0].name, calls[0].arguments)
    with client.responses.stream(
        model="demo", input="Weather in Oslo?", tools=RESPONSE_TOOLS, max_output_tokens=200,
        tool_choice={"type": "function", "name": "get_weather"},
    ) as stream:  # fmt: skip
        fragments = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    call = next(item for item in final.output if item.type == "function_call")
    assert "".join(fragments) == call.arguments
    _valid("get_weather", call.arguments)
    structured = client.responses.create(
        model="demo", input="A person.", max_output_tokens=120,
        text={"format": {"type": "json_schema", "name": "person", "schema": SHAPE, "strict": True}},
    )  # fmt: skip
    jsonschema.validate(json.loads(structured.output_text), SHAPE)
