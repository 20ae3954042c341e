"""Choosing parsers from a chat template (or model_type) when the user named none."""

from __future__ import annotations

import pytest

from dynamo_gateway.parsers import detect_reasoning_parser, detect_tool_parser
from dynamo_gateway.plugins import load_plugins

# Fragments of the tool sections of real templates (as found in tokenizer_config.json).
QWEN25 = (
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\\n</tool_call>'
)
QWEN3_CODER = (
    "<tool_call>\\n<function=example_function_name>\\n<parameter=example_parameter_1>\\n"
    "value_1\\n</parameter>\\n</function>\\n</tool_call>"
)
MISTRAL = (
    "{%- if message.tool_calls %}{{- '[TOOL_CALLS][' }}{%- for tool_call in message.tool_calls %}"
)
LLAMA31 = (
    "{{- '<|python_tag|>' + tool_call.name + '.call(' }} ... Respond in the format "
    '{\\"name\\": function name, \\"parameters\\": dictionary of argument name and its value}'
)
LLAMA4 = "{{- '<|python_start|>' }}{{- '[' + tool_call.name + '(' }}"
# DeepSeek's markers use FULLWIDTH VERTICAL LINE (U+FF5C)
DEEPSEEK_R1 = "{% if add_generation_prompt %}{{'<\uff5cAssistant\uff5c><think>\\n'}}{% endif %}"
QWEN3_HYBRID = (
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}" + QWEN25
)
QWEN3_THINKING_2507 = "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}"


@pytest.mark.parametrize(
    ("template", "model_type", "parser"),
    [
        (QWEN25, "qwen2", "hermes"),
        (QWEN3_CODER, "qwen3_moe", "qwen3_coder"),
        (MISTRAL, None, "mistral"),
        (LLAMA31, "llama", "llama3_json"),
        (LLAMA4, "llama4", "pythonic"),
        ("{{ messages }}", None, None),
        (None, "qwen3", "hermes"),
        (None, "mistral", "mistral"),
        (None, "gpt2", None),
        (None, None, None),
    ],
)
def test_detect_tool_parser(
    template: str | None, model_type: str | None, parser: str | None
) -> None:
    assert detect_tool_parser(template, model_type) == parser


@pytest.mark.parametrize(
    ("template", "model_type", "parser"),
    [
        (DEEPSEEK_R1, "qwen2", "deepseek_r1"),
        (QWEN3_THINKING_2507, "qwen3_moe", "deepseek_r1"),
        (QWEN3_HYBRID, "qwen3", "qwen3"),
        ("real newline '<think>\n'", None, "deepseek_r1"),
        (QWEN25, "qwen2", None),
        (None, "qwen3", "qwen3"),
        (None, "llama", None),
    ],
)
def test_detect_reasoning_parser(
    template: str | None, model_type: str | None, parser: str | None
) -> None:
    assert detect_reasoning_parser(template, model_type) == parser


def test_every_detected_name_is_a_builtin() -> None:
    registry = load_plugins(entry_points=False).registry
    templates = [QWEN25, QWEN3_CODER, MISTRAL, LLAMA31, LLAMA4, DEEPSEEK_R1, QWEN3_HYBRID]
    types = ["qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "mistral", "mixtral", "llama", "llama4"]
    for template in templates:
        for name in (detect_tool_parser(template, None), detect_reasoning_parser(template, None)):
            assert (
                name is None or name in registry.tool_parsers or name in registry.reasoning_parsers
            )
    for model_type in types:
        tool = detect_tool_parser(None, model_type)
        assert tool in registry.tool_parsers
        reasoning = detect_reasoning_parser(None, model_type)
        assert reasoning is None or reasoning in registry.reasoning_parsers
