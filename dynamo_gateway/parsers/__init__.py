"""Tool-call and reasoning parsers: model output text to OpenAI-shaped pieces.

Pure, per request, pluggable. A frontend gets a factory from the registry
(``registry.tool_parsers.get(name)``, ``registry.reasoning_parsers.get(name)``),
builds a parser per request (``factory(tools)`` / ``factory()``) and either
parses a whole output or streams it delta by delta. Run a reasoning parser
first and feed only its content to the tool parser. ``base`` holds the types
and the content rule; each format has its own module; ``detect`` picks parsers
from a chat template.
"""

from __future__ import annotations

from dynamo_gateway.parsers.base import (
    ContentDelta,
    IdFactory,
    ParsedTools,
    ReasoningParser,
    ReasoningParserFactory,
    ReasoningPiece,
    ReasoningStream,
    ToolArgumentsDelta,
    ToolCall,
    ToolCallStart,
    ToolDelta,
    ToolParser,
    ToolParserFactory,
    ToolStream,
    collect,
    collect_reasoning,
    new_call_id,
)
from dynamo_gateway.parsers.detect import detect_reasoning_parser, detect_tool_parser

__all__ = [
    "ContentDelta",
    "IdFactory",
    "ParsedTools",
    "ReasoningParser",
    "ReasoningParserFactory",
    "ReasoningPiece",
    "ReasoningStream",
    "ToolArgumentsDelta",
    "ToolCall",
    "ToolCallStart",
    "ToolDelta",
    "ToolParser",
    "ToolParserFactory",
    "ToolStream",
    "collect",
    "collect_reasoning",
    "detect_reasoning_parser",
    "detect_tool_parser",
    "new_call_id",
]
