"""Chat templates: render OpenAI-style messages into a prompt string, as Hugging Face does.

Templates come from the model directory and are untrusted code, so they run in
Jinja's immutable sandbox (no access to ``__dunder__`` attributes, no mutation of
the messages passed in). The environment mirrors ``transformers``: ``trim_blocks``
and ``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception`` and
``strftime_now`` globals, and a ``tojson`` filter that keeps non-ASCII text.

Message content is normalized before rendering (see :func:`normalize_messages`):
a list of content parts is joined into one string, because most templates only
handle string content and the gateway serves text-only models.

Rendered prompts usually start with BOS already; encode them with
``add_special_tokens=False`` so that it is not added twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dynamo_gateway.errors import ConfigError, InvalidRequestError
from dynamo_gateway.models.gguf import GgufModel, find_gguf

__all__ = ["ChatTemplate", "normalize_messages"]

_TEXT_PART_TYPES = frozenset({"text", "input_text"})

# Exceptions a template can raise because of what a request sent (a missing key,
# a wrong type); they are the client's problem, not a server error.
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy ``messages`` with list content joined into a single string.

    Text parts (``{"type": "text", "text": ...}``) are joined with ``"\\n"``, like
    vLLM's "string" content format; any other part type is rejected with
    InvalidRequestError because the gateway serves text-only models. String and
    ``None`` content (an assistant message with only tool calls) pass unchanged.
    The input is never modified: changed messages are shallow copies.
    """
    result: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(
                f"messages[{index}] must be an object", param=f"messages[{index}]"
            )
        content = message.get("content")
        copied = dict(message)
        if isinstance(content, list):
            copied["content"] = _join_parts(content, index)
        result.append(copied)
    return result


def _join_parts(parts: list[Any], index: int) -> str:
    texts: list[str] = []
    for part_index, part in enumerate(parts):
        param = f"messages[{index}].content[{part_index}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise InvalidRequestError(f"{param} must be an object", param=param)
        part_type = part.get("type")
        if part_type not in _TEXT_PART_TYPES:
            raise InvalidRequestError(
                f"{param}: content part type {part_type!r} is not supported; only text parts are",
                param=param,
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError(f"{param}.text must be a string", param=param)
        texts.append(text)
    return "\n".join(texts)


def _raise_exception(message: str) -> NoReturn:
    raise InvalidRequestError(f"chat template error: {message}")


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson escapes HTML characters and forces ASCII; chat
    # templates expect plain json.dumps output (what transformers provides).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], autoescape=False
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template; render it as many times as needed (thread-safe)."""

    def __init__(
        self, source: str, *, bos_token: str | None = None, eos_token: str | None = None
    ) -> None:
        """Compile ``source``; a syntax error raises ConfigError (a bad model directory)."""
        self._source = source
        self._bos_token = bos_token or ""
        self._eos_token = eos_token or ""
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"chat template does not compile: {exc} (line {exc.lineno})") from exc

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate | None:
        """Load the model directory's chat template, or ``None`` if it has none.

        Looks, in order, at ``chat_template.jinja``, the ``chat_template`` of
        tokenizer_config.json (a string, or a list of ``{"name", "template"}`` of
        which "default" is taken, else the first), then ``chat_template.json``.
        bos/eos tokens come from tokenizer_config.json. Unreadable files or a
        template that does not compile raise ConfigError. A GGUF file's template
        and special tokens come from its metadata.
        """
        root = Path(path)
        gguf_file = find_gguf(root)
        if gguf_file is not None:
            meta = GgufModel.open(gguf_file).tokenizer_config()
            gguf_source = meta.get("chat_template")
            if not isinstance(gguf_source, str):
                return None
            return cls(
                gguf_source, bos_token=meta.get("bos_token"), eos_token=meta.get("eos_token")
            )
        config = _read_json(root / "tokenizer_config.json")
        source: str | None = None
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                source = jinja_file.read_text(encoding="utf-8")
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read {jinja_file}: {exc}") from exc
        if source is None:
            source = _pick_template(config.get("chat_template"), root / "tokenizer_config.json")
        if source is None:
            extra = _read_json(root / "chat_template.json")
            source = _pick_template(extra.get("chat_template"), root / "chat_template.json")
        if source is None:
            return None
        return cls(
            source,
            bos_token=_token_name(config.get("bos_token")),
            eos_token=_token_name(config.get("eos_token")),
        )

    @property
    def source(self) -> str:
        return self._source

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
        **extra: Any,
    ) -> str:
        """Render ``messages`` (normalized with :func:`normalize_messages`) to a prompt.

        ``extra`` becomes template variables too (``documents``, ``enable_thinking``,
        ...); it may override ``bos_token``/``eos_token``. Template errors, including
        ``raise_exception`` calls, raise InvalidRequestError.
        """
        variables: dict[str, Any] = {
            "bos_token": self._bos_token,
            "eos_token": self._eos_token,
            **extra,
            "messages": normalize_messages(messages),
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
        }
        try:
            return self._template.render(variables)
        except InvalidRequestError:
            raise
        except _RENDER_ERRORS as exc:
            raise InvalidRequestError(f"chat template error: {exc}", param="messages") from exc

    def __repr__(self) -> str:
        return f"ChatTemplate({len(self._source)} chars)"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return data


def _pick_template(value: Any, origin: Path) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named: dict[str, str] = {}
        for item in value:
            if not (
                isinstance(item, Mapping)
                and isinstance(item.get("name"), str)
                and isinstance(item.get("template"), str)
            ):
                raise ConfigError(f"{origin}: chat_template entries need 'name' and 'template'")
            named.setdefault(item["name"], item["template"])
        if not named:
            return None
        return named.get("default", next(iter(named.values())))
    raise ConfigError(f"{origin}: chat_template must be a string or a list of named templates")


def _token_name(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None
