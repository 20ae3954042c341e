"""Tool use in chat messages: what the chat template gets for a request with `tools`.

A template that knows tools (it reads the ``tools`` variable, as Qwen2.5's,
Llama 3.1's or Mistral's do) gets them as the ``tools`` variable and the
messages in the shape Hugging Face templates expect: an assistant message's
``tool_calls`` with each call's ``arguments`` as an object (templates apply
``tojson`` to it), and ``tool`` messages with their ``tool_call_id``.

A template that does not (many small chat models', e.g. SmolLM2's) would drop
the tools and break on an assistant message without content. For it the gateway
writes tool use into the conversation itself, in the Hermes format that the
`hermes` tool-call parser reads back: the tool definitions and the calling
convention go into the system message, earlier calls become
``<tool_call>{...}</tool_call>`` text in their assistant message, and results
become user messages wrapped in ``<tool_response>``. Pure: dicts in, dicts out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

__all__ = ["FALLBACK_PARSER", "messages_for_template", "template_knows_tools"]

#: The tool-call parser that reads what `messages_for_template` asks a model without
#: template tool support to write.
FALLBACK_PARSER = "hermes"

_INSTRUCTIONS = (
    "# Tools\n\n"
    "You can call functions to help with the user's request. The available functions, "
    "as JSON schemas, are inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and arguments "
    "inside <tool_call></tool_call> tags, one per call:\n"
    '<tool_call>\n{{"name": "<function-name>", "arguments": {{<arguments>}}}}\n</tool_call>'
)


def template_knows_tools(source: str) -> bool:
    """Whether a chat template reads the ``tools`` variable."""
    return "tools" in source


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a client's malformed arguments: pass them on as written


def messages_for_template(
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None,
    *,
    native: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and ``tools`` variable to render (see the module docstring).

    `messages` are OpenAI-shaped dicts (``tool_calls`` with ``arguments`` as JSON
    text); `native` says whether the template reads ``tools`` itself.
    """
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {
                        **c,
                        "function": {
                            **c["function"],
                            "arguments": _arguments(c["function"]["arguments"]),
                        },
                    }
                    for c in m["tool_calls"]
                ]
            out.append(m)
        return out, list(tools) if tools else None
    if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return list(messages), None
    out = []
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        section = _INSTRUCTIONS.format(tools=listing)
        if messages and messages[0]["role"] in ("system", "developer"):
            first = dict(messages[0])
            first["content"] = f"{first.get('content') or ''}\n\n{section}".lstrip()
            first["role"] = "system"
            out.append(first)
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": section})
    for m in messages:
        if m["role"] == "tool":
            response = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_responses"):
                out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n{response}"}
            else:
                out.append({"role": "user", "content": response, "tool_responses": True})
        elif m.get("tool_calls"):
            calls = [
                "<tool_call>\n"
                + json.dumps(
                    {
                        "name": c["function"]["name"],
                        "arguments": _arguments(c["function"]["arguments"]),
                    },
                    ensure_ascii=False,
                )
                + "\n</tool_call>"
                for c in m["tool_calls"]
            ]
            text = "\n".join([m["content"], *calls] if m.get("content") else calls)
            out.append({"role": "assistant", "content": text})
        else:
            out.append(m)
    for m in out:
        m.pop("tool_responses", None)
    return out, None
