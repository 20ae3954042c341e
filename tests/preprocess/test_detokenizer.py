"""Incremental detokenizer: UTF-8 across tokens, stop strings, flush, batching."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_gateway.models.demo import build_demo_model
from dynamo_gateway.preprocess import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="session")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(build_demo_model(tmp_path_factory.mktemp("detok") / "demo"))


@pytest.fixture(scope="session")
def byte_ids(tok: Tokenizer) -> dict[int, int]:
    """Token id of every single byte (a byte-level vocabulary has all 256)."""
    table: dict[int, int] = {}
    for token_id in range(tok.vocab_size):
        data = tok.token_bytes(token_id)
        if len(data) == 1 and token_id not in tok.special_token_ids:
            table[data[0]] = token_id
    assert len(table) == 256
    return table


def per_byte(byte_ids: dict[int, int], text: str) -> list[int]:
    """Ids spelling ``text`` one byte per token: every multi-byte char spans tokens."""
    return [byte_ids[b] for b in text.encode("utf-8")]


def stream(detok: IncrementalDetokenizer, chunks: Sequence[Sequence[int]]) -> list[str]:
    return [detok.push(chunk) for chunk in chunks] + [detok.flush()]


def singles(ids: Sequence[int]) -> list[list[int]]:
    return [[i] for i in ids]


def test_plain_stream_equals_decode(tok: Tokenizer) -> None:
    text = "The quick brown fox, naïve café, 你好 😀!"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    assert "".join(stream(detok, singles(ids))) == text
    assert not detok.stopped
    assert detok.matched_stop is None


@pytest.mark.parametrize("text", ["😀", "日本", "a😀b", "é🚀x日", "🤖🤖"])
def test_multibyte_character_split_across_tokens(
    tok: Tokenizer, byte_ids: dict[int, int], text: str
) -> None:
    ids = per_byte(byte_ids, text)
    detok = IncrementalDetokenizer(tok)
    outputs = [detok.push([i]) for i in ids]
    assert "".join(outputs) + detok.flush() == text == tok.decode(ids)
    # Text appears only once a character is complete, never as a replacement char.
    assert all("\ufffd" not in out for out in outputs)
    position = 0
    for char in text:
        width = len(char.encode("utf-8"))
        assert outputs[position : position + width - 1] == [""] * (width - 1)
        assert outputs[position + width - 1] == char
        position += width


def test_bpe_token_split_character(tok: Tokenizer) -> None:
    # The demo BPE splits "日" between " \xe6" and the rest of "日本語".
    ids = tok.encode(" 日本語", add_special_tokens=False)
    assert len(ids) >= 2
    assert tok.token_text(ids[0]).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok)
    assert detok.push([ids[0]]) == ""
    assert "".join(detok.push([i]) for i in ids[1:]) == " 日本語"


def test_flush_replaces_an_incomplete_trailing_character(
    tok: Tokenizer, byte_ids: dict[int, int]
) -> None:
    ids = per_byte(byte_ids, "ok😀")[:-2]  # generation stopped mid-emoji
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push([i]) for i in ids) == "ok"
    tail = detok.flush()
    assert "ok" + tail == tok.decode(ids)
    assert tail and set(tail) == {"\ufffd"}
    assert detok.flush() == ""


def test_stop_string_spanning_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("the answer STOP and more", add_special_tokens=False)
    assert len(tok.encode(" STOP", add_special_tokens=False)) > 1
    detok = IncrementalDetokenizer(tok, stop=["STOP"])
    assert "".join(stream(detok, singles(ids))) == "the answer "
    assert detok.stopped
    assert detok.matched_stop == "STOP"


def test_stop_string_at_the_very_beginning(tok: Tokenizer) -> None:
    ids = tok.encode("STOP right there", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, stop=["STOP"])
    assert stream(detok, singles(ids)) == [""] * (len(ids) + 1)
    assert detok.stopped


def test_stop_string_inside_one_token(tok: Tokenizer) -> None:
    ids = tok.encode("the world is big", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, stop=["orl"])
    assert "".join(stream(detok, singles(ids))) == "the w"


def test_earliest_completing_stop_string_wins(tok: Tokenizer) -> None:
    text = "alpha beta gamma delta"
    ids = tok.encode(text, add_special_tokens=False)
    for chunks in (singles(ids), [ids]):
        detok = IncrementalDetokenizer(tok, stop=["delta", "beta", "gamma"])
        assert "".join(stream(detok, chunks)) == "alpha "
        assert detok.matched_stop == "beta"
    # "a g" completes before "beta gamma": the earlier *start* does not matter, so
    # the result is the same however the ids are batched.
    for chunks in (singles(ids), [ids]):
        detok = IncrementalDetokenizer(tok, stop=["beta gamma", "a g"])
        assert "".join(stream(detok, chunks)) == "alpha bet"
        assert detok.matched_stop == "a g"
    # Completing at the same character: the longer (earlier-starting) one wins.
    detok = IncrementalDetokenizer(tok, stop=["ta", "beta"])
    assert "".join(stream(detok, [ids])) == "alpha "
    assert detok.matched_stop == "beta"


def test_stop_string_that_never_completes_is_released_by_flush(tok: Tokenizer) -> None:
    ids = tok.encode("wait for it: STO", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, stop=["STOP"])
    emitted = "".join(detok.push([i]) for i in ids)
    assert emitted == "wait for it: "
    assert detok.held_back == "STO"
    assert detok.flush() == "STO"
    assert not detok.stopped


def test_held_back_text_is_released_once_disambiguated(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, stop=["</answer>"])
    out = [detok.push([i]) for i in tok.encode("x </ans", add_special_tokens=False)]
    assert "".join(out) == "x "
    assert detok.held_back == "</ans"
    assert detok.push(tok.encode("wered", add_special_tokens=False)) == "</answered"
    assert detok.held_back == ""


def test_hold_back_is_bounded_by_the_longest_stop(tok: Tokenizer) -> None:
    stops = ["aaaa", "ab"]
    detok = IncrementalDetokenizer(tok, stop=stops)
    emitted = ""
    for token_id in tok.encode("a" * 40 + "c", add_special_tokens=False):
        emitted += detok.push([token_id])
        assert len(detok.held_back) <= 3
    # "aaaa" occurs as soon as four a's are there.
    assert emitted == ""
    assert detok.matched_stop == "aaaa"


def test_push_after_stop_is_ignored(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, stop=["end"])
    assert detok.push(tok.encode("the end", add_special_tokens=False)) == "the "
    assert detok.push(tok.encode(" more text", add_special_tokens=False)) == ""
    assert detok.flush() == ""
    assert detok.stopped


def test_stop_string_with_multibyte_characters(tok: Tokenizer, byte_ids: dict[int, int]) -> None:
    ids = per_byte(byte_ids, "ok 日本語 then")
    detok = IncrementalDetokenizer(tok, stop=["本語"])
    outputs = stream(detok, singles(ids))
    assert "".join(outputs) == "ok 日"
    assert all("\ufffd" not in out for out in outputs)


def test_skip_special_tokens(tok: Tokenizer) -> None:
    im_end = tok.eos_token_id
    assert im_end is not None
    ids = [
        *tok.encode("hi", add_special_tokens=False),
        im_end,
        *tok.encode(" there", add_special_tokens=False),
    ]
    skipping = IncrementalDetokenizer(tok)
    assert "".join(stream(skipping, singles(ids))) == "hi there"
    keeping = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(stream(keeping, singles(ids))) == "hi<|im_end|> there"
    # A special token's text can be a stop string when it is not skipped.
    stopping = IncrementalDetokenizer(tok, skip_special_tokens=False, stop=["<|im_end|>"])
    assert "".join(stream(stopping, singles(ids))) == "hi"


def test_trailing_skipped_special_token(tok: Tokenizer) -> None:
    ids = [*tok.encode("done", add_special_tokens=False), tok.eos_token_id or 0]
    detok = IncrementalDetokenizer(tok)
    assert "".join(stream(detok, singles(ids))) == "done"


def test_prompt_ids_give_context(tok: Tokenizer) -> None:
    prompt = tok.encode("User said: 日本", add_special_tokens=True)
    generated = tok.encode(" and 語 more", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    text = "".join(stream(detok, singles(generated)))
    assert text == tok.decode(prompt + generated)[len(tok.decode(prompt)) :]


def test_batched_pushes_match_single_pushes(tok: Tokenizer) -> None:
    ids = tok.encode("Batch me: 😀 STOP after", add_special_tokens=False)
    chunks = [ids[i : i + 3] for i in range(0, len(ids), 3)]
    for stop in ((), ("STOP",)):
        one = "".join(stream(IncrementalDetokenizer(tok, stop=stop), singles(ids)))
        batched = "".join(stream(IncrementalDetokenizer(tok, stop=stop), chunks))
        assert one == batched
    assert IncrementalDetokenizer(tok).push([]) == ""


def test_empty_and_duplicate_stop_strings_are_ignored(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, stop=["", "x", "x"])
    assert detok.stop_strings == ("x",)
    assert detok.push(tok.encode("abc", add_special_tokens=False)) == "abc"


ALPHABET = st.sampled_from([*"ab ST\n,.", "é", "ß", "日", "本", "😀", "🚀", " the", "OP"])
TEXTS = st.lists(ALPHABET, min_size=0, max_size=30).map("".join)


def _chunked(ids: list[int], cuts: list[int]) -> list[list[int]]:
    points = sorted({c % (len(ids) + 1) for c in cuts} | {0, len(ids)})
    return [ids[a:b] for a, b in pairwise(points)]


@settings(max_examples=150, deadline=None)
@given(text=TEXTS, cuts=st.lists(st.integers(0, 200), max_size=10), bytewise=st.booleans())
def test_property_stream_equals_decode(
    tok: Tokenizer, byte_ids: dict[int, int], text: str, cuts: list[int], bytewise: bool
) -> None:
    ids = per_byte(byte_ids, text) if bytewise else tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    outputs = stream(detok, _chunked(ids, cuts))
    assert "".join(outputs) == tok.decode(ids) == text
    assert all("\ufffd" not in out for out in outputs)


@settings(max_examples=150, deadline=None)
@given(
    text=TEXTS,
    stop=st.sampled_from(["STOP", "b", "ab a", "日本", "😀 ", "the", "\n\n", ". S"]),
    cuts=st.lists(st.integers(0, 200), max_size=10),
    bytewise=st.booleans(),
)
def test_property_stop_string_cuts_at_first_occurrence(
    tok: Tokenizer,
    byte_ids: dict[int, int],
    text: str,
    stop: str,
    cuts: list[int],
    bytewise: bool,
) -> None:
    ids = per_byte(byte_ids, text) if bytewise else tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, stop=[stop])
    emitted = ""
    for chunk in _chunked(ids, cuts):
        emitted += detok.push(chunk)
        # Nothing that could be (part of) the stop string is ever emitted early.
        assert stop not in emitted + detok.held_back or detok.stopped
        assert len(detok.held_back) < len(stop)
    emitted += detok.flush()
    index = text.find(stop)
    assert emitted == (text if index < 0 else text[:index])
    assert detok.stopped == (index >= 0)
