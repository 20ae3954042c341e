"""Built-in tool-call parsers (`hermes`, `llama3_json`, `mistral`, `pythonic`,
`qwen3_coder`) and reasoning parsers (`deepseek_r1`, `qwen3`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dynamo_gateway.hookspecs import hookimpl

if TYPE_CHECKING:
    from dynamo_gateway.parsers.base import ReasoningParser, ToolParser
    from dynamo_gateway.registry import ReasoningParserRegister, ToolParserRegister

Tools = list[dict[str, Any]] | None


def _hermes(tools: Tools) -> ToolParser:
    from dynamo_gateway.parsers.hermes import HermesToolParser

    return HermesToolParser(tools)


def _llama3_json(tools: Tools) -> ToolParser:
    from dynamo_gateway.parsers.llama3_json import Llama3JsonToolParser

    return Llama3JsonToolParser(tools)


def _mistral(tools: Tools) -> ToolParser:
    from dynamo_gateway.parsers.mistral import MistralToolParser

    return MistralToolParser(tools)


def _pythonic(tools: Tools) -> ToolParser:
    from dynamo_gateway.parsers.pythonic import PythonicToolParser

    return PythonicToolParser(tools)


def _qwen3_coder(tools: Tools) -> ToolParser:
    from dynamo_gateway.parsers.qwen3_coder import Qwen3CoderToolParser

    return Qwen3CoderToolParser(tools)


def _deepseek_r1() -> ReasoningParser:
    from dynamo_gateway.parsers.reasoning import deepseek_r1

    return deepseek_r1()


def _qwen3() -> ReasoningParser:
    from dynamo_gateway.parsers.reasoning import qwen3

    return qwen3()


@hookimpl
def dynamo_gateway_register_tool_parsers(register: ToolParserRegister) -> None:
    register(
        "hermes",
        _hermes,
        description='<tool_call>{"name": ..., "arguments": ...}</tool_call> (Hermes, Qwen2.5/3)',
    )
    register(
        "llama3_json",
        _llama3_json,
        description='{"name": ..., "parameters": ...}; ... (Llama 3.1/3.2/3.3)',
    )
    register(
        "mistral",
        _mistral,
        description="[TOOL_CALLS][{...}] and [TOOL_CALLS]name[ARGS]{...} (Mistral)",
    )
    register(
        "pythonic",
        _pythonic,
        description='[f(a=1, b="x"), g()] (Llama 3.2 / Llama 4 pythonic)',
    )
    register(
        "qwen3_coder",
        _qwen3_coder,
        description="<tool_call><function=f><parameter=a>...</parameter> XML (Qwen3-Coder)",
    )


@hookimpl
def dynamo_gateway_register_reasoning_parsers(register: ReasoningParserRegister) -> None:
    register(
        "deepseek_r1",
        _deepseek_r1,
        description="output starts inside <think> (the template opens it); ends at </think>",
    )
    register(
        "qwen3",
        _qwen3,
        description="optional <think>...</think> at the start; without it all content",
    )
