"""Tokenizer wrapper: loading, special tokens, encode/decode and per-token bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.models.demo import build_demo_model
from dynamo_gateway.preprocess import Tokenizer

TEXT = "Hello world, café 😀 日本語 🚀 def foo(x): return x"


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("tokenizer") / "demo")


@pytest.fixture(scope="session")
def tok(demo_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(demo_dir)


def test_from_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.json is missing"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_with_broken_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot load"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_with_broken_tokenizer_config(tmp_path: Path, demo_dir: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((demo_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="JSON object"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    bare = Tokenizer.from_dir(tmp_path)  # the config file is optional
    assert bare.bos_token is None
    assert bare.vocab_size == 2048


def test_special_tokens(tok: Tokenizer) -> None:
    assert tok.vocab_size == 2048
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token == "<|im_end|>"
    assert tok.bos_token_id == tok.token_to_id("<|begin_of_text|>")
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    assert tok.special_token_ids == frozenset(tok.token_to_id(n) for n in names)
    assert isinstance(tok.raw, tokenizers.Tokenizer)
    assert tok.config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_special_tokens_given_as_added_token_dicts(tmp_path: Path, demo_dir: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((demo_dir / "tokenizer.json").read_bytes())
    config = {"bos_token": {"content": "<|begin_of_text|>", "special": True}, "eos_token": 3}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token is None
    assert tok.eos_token_id is None


def test_encode_and_decode(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT)
    assert ids[0] == tok.bos_token_id
    assert tok.encode(TEXT, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + TEXT
    assert tok.decode(tuple(ids)) == TEXT
    assert tok.decode(iter(ids)) == TEXT
    assert tok.decode([]) == ""


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = [TEXT, "", "the end", "日本"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_special_tokens=False) == [
        tok.encode(t, add_special_tokens=False) for t in texts
    ]


def test_special_token_text_in_input_is_a_special_token(tok: Tokenizer) -> None:
    ids = tok.encode("hi<|im_end|>", add_special_tokens=False)
    assert ids[-1] == tok.eos_token_id


def test_token_bytes_concatenate_to_the_text(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT, add_special_tokens=False)
    data = b"".join(bytes(tok.token_bytes(i)) for i in ids)
    assert data == TEXT.encode("utf-8")


def test_token_bytes_and_text_agree_with_decode_for_every_token(tok: Tokenizer) -> None:
    for token_id in range(tok.vocab_size):
        data = bytes(tok.token_bytes(token_id))
        assert data, token_id
        expected = tok.decode([token_id], skip_special_tokens=False)
        assert data.decode("utf-8", errors="replace") == expected, token_id
        assert tok.token_text(token_id) == expected


def test_token_text_of_a_partial_character(tok: Tokenizer) -> None:
    # Every single byte is in a byte-level vocabulary; the first byte of "日" alone
    # is not valid UTF-8.
    byte_ids = {bytes(tok.token_bytes(i)): i for i in range(tok.vocab_size)}
    first = byte_ids["日".encode()[:1]]
    assert tok.token_bytes(first) == [0xE6]
    assert tok.token_text(first) == "\ufffd"
    assert tok.token_text(tok.eos_token_id or 0) == "<|im_end|>"


def test_unknown_ids(tok: Tokenizer) -> None:
    assert tok.token_bytes(10**6) == []
    assert tok.token_text(10**6) == ""
    assert tok.decode([10**6, *tok.encode("ok", add_special_tokens=False)]) == "ok"


def test_token_bytes_returns_a_fresh_list(tok: Tokenizer) -> None:
    first = tok.token_bytes(100)
    first.append(0)
    assert tok.token_bytes(100) == first[:-1]


def test_sentencepiece_byte_fallback_tokens() -> None:
    # A Llama-2-style tokenizer: "▁" marks spaces, <0xHH> tokens are raw bytes.
    vocab = {"<unk>": 0, "<s>": 1, "▁hello": 2, "▁": 3, "world": 4}
    vocab |= {f"<0x{b:02X}>": 5 + b for b in range(256)}
    raw = tokenizers.Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    raw.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    raw.add_special_tokens(["<s>"])
    tok = Tokenizer(raw, {"bos_token": "<s>"})
    assert tok.token_bytes(2) == list(b" hello")
    assert tok.token_text(2) == " hello"  # the leading space is kept, unlike decode([2])
    assert tok.decode([2]) == "hello"
    assert tok.token_bytes(5 + 0xE6) == [0xE6]
    assert tok.token_text(5 + 0xE6) == "\ufffd"
    assert tok.token_bytes(1) == list(b"<s>")
    assert tok.special_token_ids == frozenset({1})
