"""`dynamo_gateway.engines.constraints`: the vocabulary xgrammar sees, compiling, the
cache, the per-request matcher and the logits mask, without an engine."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers

from dynamo_gateway.engines.constraints import (
    ConstraintCompiler,
    ConstraintMatcher,
    _apply_unpacked,
    apply_token_bitmask,
    compiler_for,
    grammar_source,
    json_strings_without_controls,
)
from dynamo_gateway.errors import InvalidRequestError
from dynamo_gateway.preprocess.tokenizer import Tokenizer
from dynamo_gateway.protocol.engine import Constraint

VOCAB = 2048  # the demo model's
EOS = (1, 3)


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path) -> Tokenizer:
    return Tokenizer.from_dir(demo_model)


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer) -> ConstraintCompiler:
    return ConstraintCompiler(tokenizer, vocab_size=VOCAB, stop_token_ids=EOS)


def allowed_ids(matcher: ConstraintMatcher) -> set[int]:
    return {int(i) for i in np.flatnonzero(matcher.allowed())}


def feed(matcher: ConstraintMatcher, tokenizer: Tokenizer, text: str) -> None:
    for token in tokenizer.encode(text, add_special_tokens=False):
        matcher.accept(token)


# -- grammar_source: pure ------------------------------------------------------------------


def test_each_kind_maps_to_a_source() -> None:
    assert grammar_source(Constraint(kind="json_schema", spec='{"type": "integer"}')) == (
        "json_schema",
        '{"type": "integer"}',
    )
    assert grammar_source(Constraint(kind="json_object")) == ("json_schema", '{"type": "object"}')
    assert grammar_source(Constraint(kind="regex", spec="a+")) == ("regex", "a+")
    assert grammar_source(Constraint(kind="grammar", spec='root ::= "a"')) == (
        "ebnf",
        'root ::= "a"',
    )
    how, text = grammar_source(Constraint(kind="choice", spec='["a", "b", "a"]'))
    assert (how, text) == ("ebnf", 'root ::= "a" | "b"')


@pytest.mark.parametrize(
    ("constraint", "param", "words"),
    [
        (Constraint(kind="json_schema", spec="{nope"), "response_format", "not JSON"),
        (Constraint(kind="json_schema", spec="[1, 2]"), "response_format", "object"),
        (Constraint(kind="choice", spec="[]"), "guided_choice", "non-empty"),
        (Constraint(kind="choice", spec='{"a": 1}'), "guided_choice", "non-empty list"),
        (Constraint(kind="choice", spec='["a", 2]'), "guided_choice", "string"),
        (Constraint(kind="regex", spec=""), "guided_regex", "empty"),
        (Constraint(kind="grammar", spec="  "), "guided_grammar", "empty"),
    ],
)
def test_malformed_specs_are_refused_before_compiling(
    constraint: Constraint, param: str, words: str
) -> None:
    with pytest.raises(InvalidRequestError, match=words) as info:
        grammar_source(constraint)
    assert info.value.param == param
    assert constraint.kind in info.value.message


# -- the vocabulary ------------------------------------------------------------------------


def test_xgrammar_sees_each_tokens_bytes(
    tokenizer: Tokenizer, compiler: ConstraintCompiler
) -> None:
    decoded = compiler.decoded_vocab()
    assert len(decoded) == VOCAB
    assert compiler.info.vocab_type.name == "BYTE_LEVEL"
    for i in range(VOCAB):
        if i in tokenizer.special_token_ids:
            assert decoded[i] == b"", i  # special: never part of a grammar's text
        else:
            assert decoded[i] == bytes(tokenizer.token_bytes(i)), i
    assert set(compiler.info.stop_token_ids) == set(EOS)


def test_special_tokens_never_appear_inside_a_string(
    tokenizer: Tokenizer, compiler: ConstraintCompiler
) -> None:
    grammar = compiler.compile(Constraint(kind="json_object"))
    matcher = compiler.matcher(grammar)
    feed(matcher, tokenizer, '{"key')
    allowed = allowed_ids(matcher)
    assert len(allowed) > 1000  # nearly anything may go in a string
    assert not allowed & set(tokenizer.special_token_ids)


def test_padded_logits_ids_are_never_allowed(tokenizer: Tokenizer) -> None:
    """A model whose logits are wider than the tokenizer (padded embeddings)."""
    wide = ConstraintCompiler(tokenizer, vocab_size=VOCAB + 64, stop_token_ids=EOS)
    assert wide.bitmask_width == (VOCAB + 64) // 32
    matcher = wide.matcher(wide.compile(Constraint(kind="regex", spec="[a-z ]+")))
    allowed = matcher.allowed()
    assert allowed.shape == (VOCAB + 64,)
    assert allowed[:VOCAB].any() and not allowed[VOCAB:].any()


def _byte_fallback_tokenizer(root: Path) -> Tokenizer:
    """A Llama-2-style vocabulary: ``▁`` for spaces, ``<0xHH>`` byte tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ("▁", "a", "b", "▁a", "▁b", "ab", "{", "}"):
        vocab[piece] = len(vocab)
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    raw.add_special_tokens(["<s>", "</s>"])
    raw.save(str(root / "tokenizer.json"))
    return Tokenizer.from_dir(root)


def test_a_byte_fallback_vocabulary_is_raw_bytes(tmp_path: Path) -> None:
    tokenizer = _byte_fallback_tokenizer(tmp_path)
    compiler = ConstraintCompiler(tokenizer, stop_token_ids=(2,))
    assert compiler.info.vocab_type.name == "RAW"
    decoded = compiler.decoded_vocab()
    assert decoded[3 + 0x0A] == b"\n"  # <0x0A>
    assert decoded[tokenizer.token_to_id("▁a") or 0] == b" a"
    assert decoded[1] == decoded[2] == b""
    matcher = compiler.matcher(compiler.compile(Constraint(kind="regex", spec="a\nb")))
    matcher.accept(tokenizer.token_to_id("a") or 0)
    assert allowed_ids(matcher) == {3 + 0x0A}  # only the newline byte


# -- compiling and the cache --------------------------------------------------------------


@pytest.mark.parametrize(
    ("constraint", "param", "words"),
    [
        (Constraint(kind="json_schema", spec='{"type": "strin"}'), "response_format", "strin"),
        (
            Constraint(kind="json_schema", spec='{"properties": {"a": {"$ref": "#/nope"}}}'),
            "response_format",
            "nope",
        ),
        (Constraint(kind="regex", spec="a(b"), "guided_regex", "parenthesis"),
        (Constraint(kind="grammar", spec='root ::= "a" rest'), "guided_grammar", "rest"),
        (Constraint(kind="grammar", spec='start ::= "a"'), "guided_grammar", "root"),
    ],
)
def test_uncompilable_specs_name_the_problem(
    compiler: ConstraintCompiler, constraint: Constraint, param: str, words: str
) -> None:
    with pytest.raises(InvalidRequestError, match=words) as info:
        compiler.compile(constraint)
    assert info.value.param == param and info.value.status == 400
    # xgrammar's C++ source location is not the client's business.
    assert ".cc:" not in info.value.message and "\n" not in info.value.message


def test_compiled_grammars_are_cached_least_recently_used_first(tokenizer: Tokenizer) -> None:
    compiler = ConstraintCompiler(tokenizer, vocab_size=VOCAB, stop_token_ids=EOS, cache_size=2)
    a, b, c = (Constraint(kind="regex", spec=s) for s in ("a+", "b+", "c+"))
    assert compiler.cached(a) is None
    first = compiler.compile(a)
    assert compiler.compile(a) is first and compiler.cached(a) is first
    # The cache key is the grammar, not where it starts applying.
    later = Constraint(kind="regex", spec="a+", after_token_ids=(5, 6))
    assert compiler.compile(later) is first
    compiler.compile(b)
    compiler.compile(a)  # a is now the most recently used
    compiler.compile(c)  # evicts b
    assert compiler.compilations == 3 and compiler.cache_len == 2
    assert compiler.cached(b) is None and compiler.cached(a) is first
    # A failed compilation caches nothing.
    with pytest.raises(InvalidRequestError):
        compiler.compile(Constraint(kind="regex", spec="("))
    assert compiler.compilations == 3


def test_compiler_for_shares_one_per_model(demo_model: Path, tmp_path: Path) -> None:
    one = compiler_for(demo_model, vocab_size=VOCAB, stop_token_ids=EOS)
    assert compiler_for(demo_model, vocab_size=VOCAB, stop_token_ids=EOS) is one
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10}))
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        compiler_for(tmp_path, vocab_size=10)


def test_choices_are_escaped(tokenizer: Tokenizer, compiler: ConstraintCompiler) -> None:
    choices = ['say "hi"', "back\\slash", "two\nlines", "ünïcode 😀", "a | b"]
    grammar = compiler.compile(Constraint(kind="choice", spec=json.dumps([*choices, ""])))
    for choice in choices:
        matcher = compiler.matcher(grammar)
        feed(matcher, tokenizer, choice)
        assert matcher.ended and matcher.error is None, choice
    matcher = compiler.matcher(grammar)
    assert matcher.is_completed()  # the empty choice: done before the first token
    feed(matcher, tokenizer, "a |")
    assert not matcher.ended  # a prefix of "a | b" only
    feed(matcher, tokenizer, " c")
    assert matcher.error is not None


def test_json_object_is_an_object_on_one_line(
    tokenizer: Tokenizer, compiler: ConstraintCompiler
) -> None:
    grammar = compiler.compile(Constraint(kind="json_object"))
    for text, ok in [('{"a": [1, {"b": null}]}', True), ("[1]", False), ('{\n"a": 1}', False)]:
        matcher = compiler.matcher(grammar)
        feed(matcher, tokenizer, text)
        assert matcher.ended and (matcher.error is None) is ok, text


def _surrogate_start(token: bytes) -> bool:
    """Whether `token` holds the first two bytes of a UTF-8-spelled UTF-16 surrogate."""
    return any(a == 0xED and 0xA0 <= b <= 0xBF for a, b in pairwise(token))


# Where the allowed tokens are looked at: inside a string of each kind xgrammar builds.
STRING_SCHEMAS = [
    pytest.param({"type": "string"}, '"', id="free"),
    pytest.param({"type": "string", "maxLength": 12}, '"', id="maxLength"),
    pytest.param({"type": "string", "minLength": 2}, '"', id="minLength"),
    pytest.param(
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}},
        '{"name": "ab',
        id="property",
    ),
    pytest.param(
        {"type": "object", "propertyNames": {"maxLength": 5}, "additionalProperties": True},
        '{"',
        id="propertyNames",
    ),
]


@pytest.mark.parametrize(("spec", "prefix"), STRING_SCHEMAS)
def test_no_raw_control_character_is_allowed_inside_a_json_string(
    tokenizer: Tokenizer, compiler: ConstraintCompiler, spec: dict[str, object], prefix: str
) -> None:
    """JSON forbids raw U+0000-U+001F in a string; xgrammar 0.2.9 lets them into strings
    with a length bound (mlc-ai/xgrammar#800) unless the compiler narrows the class."""
    vocab = compiler.decoded_vocab()
    controls = {i for i, token in enumerate(vocab) if any(b < 0x20 for b in token)}
    assert len(controls) >= 32  # the demo model has a token for each of those bytes
    matcher = compiler.matcher(
        compiler.compile(Constraint(kind="json_schema", spec=json.dumps(spec)))
    )
    feed(matcher, tokenizer, prefix)
    assert matcher.error is None
    allowed = allowed_ids(matcher)
    assert len(allowed) > 1000  # nearly anything may go in a string...
    assert not allowed & controls, sorted(vocab[i] for i in allowed & controls)  # ...not those


def test_a_utf16_surrogate_is_no_character_of_a_bounded_string(
    tokenizer: Tokenizer, compiler: ConstraintCompiler
) -> None:
    """ED A0-BF xx is no UTF-8 (it decodes to three U+FFFD, past the ``maxLength``)."""
    vocab = compiler.decoded_vocab()
    lead = vocab.index(b"\xed")
    spec = json.dumps({"type": "string", "maxLength": 3})
    matcher = compiler.matcher(compiler.compile(Constraint(kind="json_schema", spec=spec)))
    feed(matcher, tokenizer, '"')
    allowed = allowed_ids(matcher)
    assert lead in allowed  # U+D000-U+D7FF start with it
    assert not [vocab[i] for i in allowed if _surrogate_start(vocab[i])]
    matcher.accept(lead)
    nexts = {vocab[i][0] for i in allowed_ids(matcher) if vocab[i]}
    assert nexts and max(nexts) < 0xA0, sorted(nexts)


def test_only_the_loose_string_class_is_narrowed() -> None:
    loose = r"[^\"\\\r\n]"  # as xgrammar prints it
    narrow = r"[^\0-\x1f\"\\\r\n\ud800-\udfff]"
    free = r"[^\0-\x1f\"\\\r\n]"  # the class of strings without a length bound
    literal = r'"x[^\"\\\r\n]y"'  # a string literal spelling the loose class: text

    def grammar(bounded: str) -> str:
        return f'root ::= "\\"" s{{0, 3}} "\\"" {literal}\ns ::= {bounded} | {free}\n'

    assert json_strings_without_controls(grammar(loose)) == grammar(narrow)
    assert json_strings_without_controls(grammar("[a]")) == grammar("[a]")


# -- the matcher ---------------------------------------------------------------------------


def test_a_finished_grammar_ends_the_request(
    tokenizer: Tokenizer, compiler: ConstraintCompiler
) -> None:
    matcher = compiler.matcher(compiler.compile(Constraint(kind="choice", spec='["red", "reds"]')))
    assert matcher.constrains and not matcher.ended
    feed(matcher, tokenizer, "red")
    # "red" is complete, but "reds" may follow: not ended; the stop tokens are allowed.
    assert matcher.is_completed() and not matcher.ended
    assert set(EOS) <= allowed_ids(matcher)
    feed(matcher, tokenizer, "s")
    assert matcher.ended and matcher.error is None and not matcher.constrains
    assert matcher.num_accepted == len(tokenizer.encode("reds", add_special_tokens=False))


def test_a_stop_token_ends_a_grammar_that_may_go_on(
    tokenizer: Tokenizer, compiler: ConstraintCompiler
) -> None:
    matcher = compiler.matcher(compiler.compile(Constraint(kind="regex", spec="[0-9]+")))
    feed(matcher, tokenizer, "42")
    assert matcher.is_completed() and not matcher.ended
    matcher.accept(EOS[0])
    assert matcher.ended and matcher.error is None


def test_a_rejected_token_is_an_error(tokenizer: Tokenizer, compiler: ConstraintCompiler) -> None:
    matcher = compiler.matcher(compiler.compile(Constraint(kind="regex", spec="[0-9]+")))
    feed(matcher, tokenizer, "x")
    assert matcher.ended and matcher.error is not None and "constraint" in matcher.error


def test_after_token_ids_hold_the_grammar_back(
    tokenizer: Tokenizer, compiler: ConstraintCompiler
) -> None:
    grammar = compiler.compile(Constraint(kind="regex", spec="[0-9]{2}"))
    matcher = compiler.matcher(grammar, after_token_ids=(10, 11))
    assert not matcher.constrains
    for token in (500, 10, 12, 11, 10):  # free text; "10 11" not yet in a row
        matcher.accept(token)
    assert not matcher.active and matcher.num_accepted == 0 and not matcher.jump_forward_tokens()
    matcher.accept(11)
    assert matcher.constrains
    assert allowed_ids(matcher) <= {
        t
        for t in range(VOCAB)
        if tokenizer.decode([t]).isdigit() and len(tokenizer.decode([t])) <= 2
    }
    feed(matcher, tokenizer, "12")
    assert matcher.ended and matcher.error is None


def test_jump_forward_spells_forced_text(
    tokenizer: Tokenizer, compiler: ConstraintCompiler
) -> None:
    spec = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    matcher = compiler.matcher(
        compiler.compile(Constraint(kind="json_schema", spec=json.dumps(spec)))
    )
    forced = matcher.jump_forward_tokens()
    assert tokenizer.decode(forced) == '{"name": "'


# -- the logits mask -----------------------------------------------------------------------


@pytest.mark.parametrize("apply", [apply_token_bitmask, _apply_unpacked])
def test_the_mask_touches_the_constrained_rows_only(
    tokenizer: Tokenizer, compiler: ConstraintCompiler, apply: object
) -> None:
    grammar = compiler.compile(Constraint(kind="choice", spec='["yes", "no"]'))
    logits = torch.randn(4, VOCAB)
    before = logits.clone()
    # Rows 0 and 3 unconstrained: their bitmask rows hold garbage that must not matter.
    bitmask = torch.zeros(4, compiler.bitmask_width, dtype=torch.int32)
    rows = [1, 2]
    for row in rows:
        compiler.matcher(grammar).fill_bitmask(bitmask, row)
    apply(logits, bitmask, rows)  # type: ignore[operator]
    allowed = allowed_ids(compiler.matcher(grammar))
    assert allowed and len(allowed) < 20
    for row in rows:
        finite = {int(i) for i in torch.nonzero(logits[row] > -math.inf).flatten()}
        assert finite == allowed
        kept = sorted(finite)
        assert torch.equal(logits[row, kept], before[row, kept])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[3], before[3])
