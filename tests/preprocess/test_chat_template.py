"""Chat templates: loading from a model directory, rendering, sandboxing, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dynamo_gateway.errors import ConfigError, InvalidRequestError
from dynamo_gateway.models.demo import CHAT_TEMPLATE
from dynamo_gateway.preprocess import ChatTemplate, normalize_messages

CHATML = ChatTemplate(CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>")


def _write_config(directory: Path, **config: Any) -> None:
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def test_chatml_rendering() -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<s><|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
    )
    assert CHATML.render(messages, add_generation_prompt=False) == expected
    assert CHATML.render(messages) == expected + "<|im_start|>assistant\n"


def test_list_and_null_content() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
    ]
    prompt = CHATML.render(messages, add_generation_prompt=False)
    assert prompt == "<s><|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"


def test_list_content_is_joined_for_templates_that_expect_strings() -> None:
    template = ChatTemplate("{% for m in messages %}[{{ m.content | upper }}]{% endfor %}")
    content = [{"type": "text", "text": "one"}, {"type": "input_text", "text": "two"}]
    assert template.render([{"role": "user", "content": content}]) == "[ONE\nTWO]"


def test_normalize_messages_does_not_mutate_its_input() -> None:
    parts = [{"type": "text", "text": "x"}]
    messages = [{"role": "user", "content": parts, "name": "bob"}]
    normalized = normalize_messages(messages)
    assert normalized == [{"role": "user", "content": "x", "name": "bob"}]
    assert messages[0]["content"] is parts


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([{"type": "image_url", "image_url": {"url": "http://x"}}], "image_url"),
        ([{"type": "text", "text": 3}], "must be a string"),
        ([5], "must be an object"),
    ],
)
def test_normalize_messages_rejects_unsupported_parts(content: list[Any], match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match) as info:
        normalize_messages([{"role": "user", "content": content}])
    assert info.value.param == "messages[0].content[0]"


def test_tools_and_extra_variables() -> None:
    template = ChatTemplate(
        "{% if tools %}{{ tools | tojson }}|{{ tools | tojson(indent=2) | length > 30 }}"
        "{% endif %}{{ greeting }}{{ bos_token }}"
    )
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {}}}]
    out = template.render([], tools=tools, greeting="hé")
    assert out.startswith('[{"type": "function", "function": {"name": "météo"')
    assert out.endswith("|Truehé")
    assert template.render([]) == ""  # tools default to None
    assert template.render([], bos_token="<b>") == "<b>"


def test_trim_and_lstrip_blocks_and_loop_controls() -> None:
    source = (
        "{% for m in messages %}\n"
        "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "{{ m.content }};\n"
        "{% endfor %}\n"
    )
    messages = [{"role": "user", "content": str(i)} for i in range(5)]
    assert ChatTemplate(source).render(messages) == "0;\n1;\n"


def test_strftime_now() -> None:
    year = ChatTemplate("{{ strftime_now('%Y') }}").render([])
    assert year.isdigit()
    assert len(year) == 4


def test_raise_exception_becomes_invalid_request() -> None:
    template = ChatTemplate(
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('Conversation must start with a user message') }}{% endif %}ok"
    )
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidRequestError, match="must start with a user message"):
        template.render([{"role": "system", "content": "x"}])


def test_runtime_errors_become_invalid_request() -> None:
    with pytest.raises(InvalidRequestError, match="chat template error"):
        ChatTemplate("{{ messages[0].content + 1 }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(InvalidRequestError, match="chat template error"):
        ChatTemplate("{{ messages[3]['content'].x }}").render([])


def test_sandbox_blocks_dunder_attributes() -> None:
    leaky = ChatTemplate("{{ ''.__class__ }}")
    assert leaky.render([]) == ""  # unsafe attribute reads come back undefined
    with pytest.raises(InvalidRequestError):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([])
    with pytest.raises(InvalidRequestError):
        ChatTemplate("{{ raise_exception.__globals__['json'] }}").render([])


def test_sandbox_is_immutable() -> None:
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(InvalidRequestError):
        ChatTemplate("{{ messages.append({'role': 'x'}) }}").render(messages)
    assert len(messages) == 1


def test_bad_template_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m }")
    _write_config(tmp_path, chat_template="{% if %}")
    with pytest.raises(ConfigError):
        ChatTemplate.from_dir(tmp_path)


def test_from_dir_reads_tokenizer_config(tmp_path: Path) -> None:
    _write_config(
        tmp_path,
        chat_template="{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
        bos_token="<s>",
        eos_token={"content": "</s>", "special": True},
    )
    template = ChatTemplate.from_dir(tmp_path)
    assert template is not None
    assert template.render([{"role": "user", "content": "x"}]) == "<s>x</s>"


def test_from_dir_picks_the_default_named_template(tmp_path: Path) -> None:
    _write_config(
        tmp_path,
        chat_template=[
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "default"},
        ],
    )
    template = ChatTemplate.from_dir(tmp_path)
    assert template is not None
    assert template.render([]) == "default"
    _write_config(tmp_path, chat_template=[{"name": "rag", "template": "rag"}])
    first = ChatTemplate.from_dir(tmp_path)
    assert first is not None
    assert first.source == "rag"


def test_from_dir_prefers_chat_template_jinja(tmp_path: Path) -> None:
    _write_config(tmp_path, chat_template="from config", bos_token="<s>")
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}from file", encoding="utf-8")
    template = ChatTemplate.from_dir(tmp_path)
    assert template is not None
    assert template.render([]) == "<s>from file"


def test_from_dir_reads_chat_template_json(tmp_path: Path) -> None:
    payload = json.dumps({"chat_template": "processor"})
    (tmp_path / "chat_template.json").write_text(payload, encoding="utf-8")
    template = ChatTemplate.from_dir(tmp_path)
    assert template is not None
    assert template.render([]) == "processor"


def test_from_dir_without_a_template(tmp_path: Path) -> None:
    assert ChatTemplate.from_dir(tmp_path) is None
    _write_config(tmp_path, bos_token="<s>")
    assert ChatTemplate.from_dir(tmp_path) is None


@pytest.mark.parametrize(
    "value", [42, [{"name": "default"}], {"default": "x"}], ids=["int", "no-template", "dict"]
)
def test_from_dir_rejects_malformed_chat_template(tmp_path: Path, value: object) -> None:
    _write_config(tmp_path, chat_template=value)
    with pytest.raises(ConfigError):
        ChatTemplate.from_dir(tmp_path)


def test_from_dir_rejects_unreadable_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read"):
        ChatTemplate.from_dir(tmp_path)
