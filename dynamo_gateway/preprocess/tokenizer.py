"""A thin wrapper over a Hugging Face ``tokenizers.Tokenizer`` and its tokenizer_config.json.

Encoding and decoding are single calls into the Rust library; the wrapper adds
what the gateway needs on top: the special tokens named in tokenizer_config.json,
and per-token text/bytes for logprobs.

How :meth:`Tokenizer.token_bytes` recovers a token's raw bytes depends on the
tokenizer's decoder (read from its serialized JSON once, at construction):

* added tokens (special or not) are stored verbatim: their UTF-8 encoding;
* byte-level BPE (GPT-2, Llama 3, Qwen, the demo model): every character of the
  vocabulary string stands for one byte through the GPT-2 byte-to-unicode table,
  which is inverted here;
* SentencePiece-style byte fallback (Llama 2, Mistral): ``<0xHH>`` tokens are the
  byte HH, other pieces are UTF-8 with ``▁`` meaning a space;
* anything else: the UTF-8 encoding of the token decoded on its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tokenizers

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.models.gguf import GgufModel, find_gguf

__all__ = ["Tokenizer"]

_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


def _byte_level_decode_table() -> dict[str, int]:
    """Map each character of GPT-2's byte-level alphabet back to its byte.

    Bytes that are printable and not whitespace stand for themselves (as Latin-1
    code points); the remaining 68 bytes are shifted, in order, to code points
    256, 257, ... so that every byte has a visible, non-space character.
    """
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    }
    table: dict[str, int] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


_BYTE_LEVEL_TABLE = _byte_level_decode_table()


def _decoder_types(raw: tokenizers.Tokenizer) -> set[str]:
    """The ``type`` names of the decoder and, for a Sequence, of its parts."""
    decoder = raw.decoder
    if decoder is None:
        return set()
    try:
        state = json.loads(decoder.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return set()
    types: set[str] = set()
    pending = [state]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                types.add(node["type"])
            pending.extend(node.get("decoders") or ())
    return types


def _special_token_name(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class Tokenizer:
    """A fast tokenizer plus the special tokens declared in tokenizer_config.json."""

    def __init__(self, raw: tokenizers.Tokenizer, config: Mapping[str, Any] | None = None) -> None:
        self._raw = raw
        self._config: Mapping[str, Any] = MappingProxyType(dict(config or {}))
        self._vocab_size = int(raw.get_vocab_size(with_added_tokens=True))
        added = raw.get_added_tokens_decoder()
        self._added: dict[int, str] = {int(i): tok.content for i, tok in added.items()}
        self._special_ids = frozenset(int(i) for i, tok in added.items() if tok.special)
        self._bos_token = _special_token_name(self._config.get("bos_token"))
        self._eos_token = _special_token_name(self._config.get("eos_token"))
        self._pad_token = _special_token_name(self._config.get("pad_token"))
        decoder_types = _decoder_types(raw)
        self._byte_level = "ByteLevel" in decoder_types
        self._byte_fallback = "ByteFallback" in decoder_types
        self._metaspace = bool(decoder_types & {"Metaspace", "Replace"})
        # Filled lazily: logprobs only ever touch a small part of a large vocabulary.
        self._bytes_cache: dict[int, bytes] = {}
        self._text_cache: dict[int, str] = {}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (required) and ``tokenizer_config.json`` (optional).

        For a GGUF file (or a directory holding only one), both are rebuilt from
        its metadata instead.
        """
        root = Path(path)
        gguf_file = find_gguf(root)
        if gguf_file is not None:
            gguf = GgufModel.open(gguf_file)
            try:
                built = tokenizers.Tokenizer.from_str(gguf.tokenizer_json())
            except Exception as exc:  # the Rust side raises plain Exception subclasses
                raise ConfigError(f"cannot build the tokenizer of {gguf_file}: {exc}") from exc
            return cls(built, gguf.tokenizer_config())
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ConfigError(
                f"{tokenizer_file} is missing: the gateway needs a fast (tokenizers) "
                "tokenizer saved as tokenizer.json"
            )
        try:
            raw = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise ConfigError(f"cannot load {tokenizer_file}: {exc}") from exc
        config: dict[str, Any] = {}
        config_file = root / "tokenizer_config.json"
        if config_file.is_file():
            try:
                loaded = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read {config_file}: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ConfigError(f"{config_file} does not hold a JSON object")
            config = loaded
        return cls(raw, config)

    # -- properties ---------------------------------------------------------------

    @property
    def raw(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._raw

    @property
    def config(self) -> Mapping[str, Any]:
        """tokenizer_config.json, read-only (empty if the directory had none)."""
        return self._config

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._vocab_size

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def pad_token(self) -> str | None:
        return self._pad_token

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self._bos_token) if self._bos_token is not None else None

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self._eos_token) if self._eos_token is not None else None

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (those ``skip_special_tokens`` drops)."""
        return self._special_ids

    # -- encoding and decoding ----------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` runs the post-processor (BOS...).

        Chat prompts rendered by a template that already holds BOS should be
        encoded with ``add_special_tokens=False``.
        """
        ids: list[int] = self._raw.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> list[list[int]]:
        """Encode several texts in one (parallel) call, without computing offsets."""
        encodings = self._raw.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids outside the vocabulary are ignored (as ``tokenizers`` does)."""
        if not isinstance(ids, list):
            ids = list(ids)
        text: str = self._raw.decode(ids, skip_special_tokens=skip_special_tokens)
        return text

    def token_to_id(self, token: str) -> int | None:
        token_id = self._raw.token_to_id(token)
        return None if token_id is None else int(token_id)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of a token (byte-level characters, ``▁``... as stored)."""
        token: str | None = self._raw.id_to_token(token_id)
        return token

    # -- single tokens, for logprobs ----------------------------------------------

    def token_bytes(self, token_id: int) -> list[int]:
        """The raw bytes of one token (see the module docstring for how).

        Ids outside the vocabulary give ``[]``.
        """
        return list(self._bytes(token_id))

    def token_text(self, token_id: int) -> str:
        """The text of one token; bytes that are not complete UTF-8 become U+FFFD.

        Unlike ``decode([id])`` this keeps a SentencePiece token's leading space.
        Ids outside the vocabulary give ``""``.
        """
        text = self._text_cache.get(token_id)
        if text is None:
            text = self._bytes(token_id).decode("utf-8", errors="replace")
            self._text_cache[token_id] = text
        return text

    def _bytes(self, token_id: int) -> bytes:
        data = self._bytes_cache.get(token_id)
        if data is None:
            data = self._compute_bytes(token_id)
            self._bytes_cache[token_id] = data
        return data

    def _compute_bytes(self, token_id: int) -> bytes:
        added = self._added.get(token_id)
        if added is not None:
            return added.encode("utf-8")
        token = self._raw.id_to_token(token_id)
        if token is None:
            return b""
        if self._byte_level:
            table = _BYTE_LEVEL_TABLE
            if all(char in table for char in token):
                return bytes(table[char] for char in token)
        if self._byte_fallback:
            match = _BYTE_FALLBACK_TOKEN.fullmatch(token)
            if match is not None:
                return bytes([int(match.group(1), 16)])
        if self._metaspace or self._byte_fallback:
            return token.replace(_METASPACE, " ").encode("utf-8")
        text: str = self._raw.decode([token_id], skip_special_tokens=False)
        return text.encode("utf-8")

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self._vocab_size}, bos_token={self._bos_token!r}, "
            f"eos_token={self._eos_token!r})"
        )
