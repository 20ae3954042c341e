"""The parser families in the registry: built-ins, a throwaway plugin, lazy imports."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from dynamo_gateway import hookimpl
from dynamo_gateway.errors import DuplicatePluginError
from dynamo_gateway.parsers.base import (
    ParsedTools,
    ReasoningParser,
    ToolCall,
    ToolParser,
)
from dynamo_gateway.parsers.hermes import HermesToolParser
from dynamo_gateway.parsers.reasoning import ThinkReasoningParser
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.registry import ReasoningParserRegister, ToolParserRegister

TOOL_PARSERS = ["hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder"]
REASONING_PARSERS = ["deepseek_r1", "qwen3"]


def test_builtins_are_registered_by_builtin_parsers() -> None:
    registry = load_plugins(entry_points=False).registry
    assert registry.tool_parsers.names() == TOOL_PARSERS
    assert registry.reasoning_parsers.names() == REASONING_PARSERS
    assert registry.provided_by("builtin.parsers") == {
        "tool_parsers": TOOL_PARSERS,
        "reasoning_parsers": REASONING_PARSERS,
    }
    assert "tool_parsers" in registry.families() and "reasoning_parsers" in registry.families()


@pytest.mark.parametrize("name", TOOL_PARSERS)
def test_builtin_tool_factories_build_parsers(name: str) -> None:
    registration = load_plugins(entry_points=False).registry.tool_parsers.registration(name)
    assert registration.description
    parser = registration.factory([{"type": "function", "function": {"name": "f"}}])
    assert isinstance(parser, ToolParser)
    assert parser.parse("plain answer") == ParsedTools("plain answer", [])
    assert registration.factory(None).stream().finish() == []


@pytest.mark.parametrize("name", REASONING_PARSERS)
def test_builtin_reasoning_factories_build_parsers(name: str) -> None:
    registration = load_plugins(entry_points=False).registry.reasoning_parsers.registration(name)
    parser = registration.factory()
    assert isinstance(parser, ReasoningParser) and parser.end_marker == "</think>"
    expected = ("a", "b") if name == "deepseek_r1" else (None, "a</think>b")
    assert parser.parse("a</think>b") == expected


class _Shouting(HermesToolParser):
    """A throwaway parser: hermes, with upper-cased function names."""

    def parse(self, text: str) -> ParsedTools:
        parsed = super().parse(text)
        calls = [ToolCall(c.id, c.name.upper(), c.arguments) for c in parsed.tool_calls]
        return ParsedTools(parsed.content, calls)


def test_a_plugin_registers_its_own_parsers() -> None:
    @hookimpl
    def dynamo_gateway_register_tool_parsers(register: ToolParserRegister) -> None:
        register("shouting", lambda tools: _Shouting(tools), description="test")

    @hookimpl
    def dynamo_gateway_register_reasoning_parsers(register: ReasoningParserRegister) -> None:
        register("always_thinking", lambda: ThinkReasoningParser(starts_in_reasoning=True))

    plugin = types.SimpleNamespace(
        dynamo_gateway_register_tool_parsers=dynamo_gateway_register_tool_parsers,
        dynamo_gateway_register_reasoning_parsers=dynamo_gateway_register_reasoning_parsers,
    )
    registry = load_plugins(entry_points=False, extra=[(plugin, "t")]).registry
    assert registry.provided_by("t") == {
        "tool_parsers": ["shouting"],
        "reasoning_parsers": ["always_thinking"],
    }
    parser = registry.tool_parsers.get("shouting")(None)
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert [c.name for c in parser.parse(text).tool_calls] == ["F"]
    assert registry.reasoning_parsers.get("always_thinking")().parse("x") == ("x", "")


def test_a_duplicate_name_names_both_plugins() -> None:
    @hookimpl
    def dynamo_gateway_register_tool_parsers(register: ToolParserRegister) -> None:
        register("hermes", lambda tools: HermesToolParser(tools))

    plugin = types.SimpleNamespace(
        dynamo_gateway_register_tool_parsers=dynamo_gateway_register_tool_parsers
    )
    with pytest.raises(DuplicatePluginError, match=r"builtin\.parsers.*impostor"):
        load_plugins(entry_points=False, extra=[(plugin, "impostor")])


def test_listing_plugins_does_not_import_the_format_modules() -> None:
    code = (
        "import sys\n"
        "from dynamo_gateway.plugins import load_plugins\n"
        "load_plugins(entry_points=False)\n"
        "print(sorted(m for m in sys.modules if m.startswith('dynamo_gateway.parsers.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout.strip()
    for module in ("hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder", "reasoning"):
        assert f"dynamo_gateway.parsers.{module}'" not in loaded, loaded
