"""Picking parsers for a model the user named none for, from its chat template.

A chat template that renders tool calls shows the model the format it was
trained on, so its source names the markers; ``config.json``'s
``model_type`` is the fallback when there is no template. Both functions are
pure and return a built-in parser name or ``None`` (no tool or reasoning
parsing).
"""

from __future__ import annotations

import re

# (markers the template must all contain, parser), most specific first:
# Qwen3-Coder's template also contains "<tool_call>".
_TOOL_MARKERS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("<function=", "<parameter="), "qwen3_coder"),
    (("<tool_call>",), "hermes"),
    (("[TOOL_CALLS]",), "mistral"),
    (("<|python_start|>",), "pythonic"),
    (("<|python_tag|>",), "llama3_json"),
)

_TOOL_MODEL_TYPES = {
    "qwen2": "hermes",
    "qwen2_moe": "hermes",
    "qwen3": "hermes",
    "qwen3_moe": "hermes",
    "mistral": "mistral",
    "mixtral": "mistral",
    "llama": "llama3_json",
    "llama4": "pythonic",
}

# The generation prompt opens the thinking: "<think>" then only newlines before
# the string literal closes ('<think>\n' in DeepSeek-R1's and Qwen3-Thinking's
# templates). An empty "<think>\n\n</think>" (thinking switched off) does not match.
_OPENS_THINKING = re.compile(r"<think>(?:\\n|\n)*['\"]")

_REASONING_MODEL_TYPES = {"qwen3": "qwen3", "qwen3_moe": "qwen3"}


def detect_tool_parser(chat_template_source: str | None, model_type: str | None) -> str | None:
    """The tool parser for a model, from its chat template or else its ``model_type``."""
    if chat_template_source:
        for markers, parser in _TOOL_MARKERS:
            if all(marker in chat_template_source for marker in markers):
                return parser
    return _TOOL_MODEL_TYPES.get(model_type or "")


def detect_reasoning_parser(chat_template_source: str | None, model_type: str | None) -> str | None:
    """The reasoning parser for a model, from its chat template or else its ``model_type``.

    ``deepseek_r1`` when the template opens ``<think>`` in the generation
    prompt, ``qwen3`` when it otherwise mentions ``<think>``.
    """
    if chat_template_source and "<think>" in chat_template_source:
        if _OPENS_THINKING.search(chat_template_source):
            return "deepseek_r1"
        return "qwen3"
    return _REASONING_MODEL_TYPES.get(model_type or "")
