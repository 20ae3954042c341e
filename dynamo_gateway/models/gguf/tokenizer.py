"""A Hugging Face ``tokenizer.json`` rebuilt from GGUF tokenizer metadata.

GGUF stores a byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``) as
its vocabulary (in GPT-2's byte-to-unicode alphabet, as tokenizer.json does),
its merges, a type per token and a pre-tokenizer *name*
(``tokenizer.ggml.pre``). The name stands for the split rules llama.cpp applies
before BPE; `PRE_TOKENIZERS` maps the names we know to the tokenizers
pre-tokenizer that splits the same way. Token types: 3 (control) and 4
(user-defined) are added tokens, control ones special. ``add_bos_token`` becomes
a post-processor that prepends BOS.

Only byte-level BPE is rebuilt; a SentencePiece (``llama``) vocabulary is
refused with a `ConfigError` rather than tokenised wrong.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dynamo_gateway.errors import ConfigError

__all__ = ["PRE_TOKENIZERS", "tokenizer_json"]

_CONTROL = 3
_USER_DEFINED = 4

_BYTE_LEVEL: dict[str, Any] = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": True,
    "use_regex": True,
}


def _split(pattern: str) -> dict[str, Any]:
    return {
        "type": "Split",
        "pattern": {"Regex": pattern},
        "behavior": "Isolated",
        "invert": False,
    }


_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _regex_then_bytes(pattern: str) -> dict[str, Any]:
    return {
        "type": "Sequence",
        "pretokenizers": [_split(pattern), {**_BYTE_LEVEL, "use_regex": False}],
    }


# tokenizer.ggml.pre -> the HF pre-tokenizer with the same splits.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "default": _BYTE_LEVEL,
    "gpt2": _BYTE_LEVEL,
    # SmolLM: every digit on its own, then GPT-2's rules.
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
    },
    "llama-bpe": _regex_then_bytes(_LLAMA3_PATTERN),
    "llama3": _regex_then_bytes(_LLAMA3_PATTERN),
    "qwen2": _regex_then_bytes(_QWEN2_PATTERN),
}


def tokenizer_json(metadata: dict[str, Any]) -> str:
    """Serialised ``tokenizer.json`` for the ``tokenizer.ggml.*`` entries of `metadata`.

    Raises `ConfigError` for a tokenizer model or pre-tokenizer we cannot rebuild.
    """
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConfigError(
            f"GGUF tokenizer model {model!r} is not supported; only byte-level BPE ('gpt2')"
        )
    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise ConfigError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {known})")
    tokens: Sequence[str] = metadata["tokenizer.ggml.tokens"]
    types: Sequence[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges: Sequence[str] = metadata.get("tokenizer.ggml.merges") or []
    added = [
        {
            "id": i,
            "content": tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": kind != _CONTROL,
            "special": kind == _CONTROL,
        }
        for i, kind in enumerate(types)
        if kind in (_CONTROL, _USER_DEFINED)
    ]
    spec: dict[str, Any] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": _post_processor(metadata, tokens),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": pre in ("llama-bpe", "llama3"),
            "vocab": {token: i for i, token in enumerate(tokens)},
            "merges": [merge.split(" ", 1) for merge in merges],
        },
    }  # fmt: skip
    return json.dumps(spec, ensure_ascii=False)


def _post_processor(metadata: dict[str, Any], tokens: Sequence[str]) -> dict[str, Any] | None:
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    if not metadata.get("tokenizer.ggml.add_bos_token") or bos_id is None:
        return None
    bos = tokens[int(bos_id)]
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [int(bos_id)], "tokens": [bos]}},
    }  # fmt: skip
