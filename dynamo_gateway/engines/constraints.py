"""Structured output for the engines that pick their own tokens: grammars via xgrammar.

A request's `SamplingParams.constraint` becomes a grammar compiled against the model's
vocabulary; a per-request `ConstraintMatcher` follows the tokens generated and says,
before each step, which token ids may come next (a bitmask row: one bit per id). Both
scheduler-driven engines use it: the reference engine masks its logits with it, the
mocker picks its words among the allowed ids.

- `grammar_source(constraint)` (pure): what to compile for each kind, checked; a
  ``choice`` list becomes an EBNF alternation of its strings.
- `ConstraintCompiler`: one per (tokenizer, logits width): the `xgrammar.TokenizerInfo`,
  a `GrammarCompiler` and an LRU cache of compiled grammars keyed by (kind, spec).
  `compile()` costs 10-500 ms on a large vocabulary, so engines call it in a thread
  when a request is submitted (`ScheduledEngine`), never per step. `compiler_for()`
  shares one per model directory within a process.
- `ConstraintMatcher`: one per request (see there).
- `apply_token_bitmask()`: one step's mask on the constrained rows of the logits.

Vocabulary: xgrammar must know each token's bytes. A byte-level BPE vocabulary is given
as `VocabType.BYTE_LEVEL`, every token spelled in the GPT-2 byte-to-unicode alphabet
(added tokens, stored as plain text, are re-spelled); any other as `VocabType.RAW`
bytes (`Tokenizer.token_bytes`: byte fallback and ``▁`` resolved). Special tokens, and
ids past the tokenizer up to the logits width, are given as empty strings, which
xgrammar treats as special: a grammar never allows them, so ``<|im_end|>`` cannot turn
up inside a JSON string (the detokenizer would drop it). Stop tokens are the model
card's EOS ids.

JSON: ``json_schema`` compiles in xgrammar's strict mode (properties and items the
schema does not declare are not generated unless it allows them explicitly; the output
is a subset of what the schema accepts, so it always validates) and without free
whitespace (one line, ``", "`` and ``": "`` separators), so that a small model cannot
ramble in whitespace. ``json_object`` is the schema ``{"type": "object"}`` compiled the
same way: any object, and only an object (xgrammar's builtin JSON grammar would allow
any value, and any whitespace). xgrammar (0.2.9 at least: mlc-ai/xgrammar#800) spells
a string with ``minLength`` or ``maxLength`` as a bounded repetition of a character class
that keeps out only the quote, the backslash, CR and LF, so raw control characters
(U+0000-U+001F, which JSON forbids in a string) could be generated there:
`json_strings_without_controls()` narrows that class before the grammar is compiled
(to the class of xgrammar's other strings, less the UTF-16 surrogates, which it takes
for characters too).

The end of the grammar: after each token the matcher checks whether the grammar is
complete and nothing but a stop token may follow; the request then ends with STOP
right after that token, without generating EOS, and neither ``min_tokens`` nor
``ignore_eos`` holds it back (nothing else could follow). Where the grammar may end or
go on (a regex ``\\d+``), the stop tokens are allowed along with the rest, and a
sampled EOS ends the request as any EOS does (STOP, EOS the last token); a stop token
the grammar accepted ends it even under ``ignore_eos``.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynamo_gateway.errors import ConfigError, InvalidRequestError
from dynamo_gateway.protocol.engine import Constraint

if TYPE_CHECKING:
    import torch
    from xgrammar import CompiledGrammar

    from dynamo_gateway.preprocess.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "ConstraintCompiler",
    "ConstraintMatcher",
    "apply_token_bitmask",
    "compiler_for",
    "constraint_param",
    "fill_bitmasks",
    "grammar_source",
    "json_strings_without_controls",
]

#: Compiled grammars kept per compiler (a large vocabulary's grammar holds masks of a
#: few hundred KB to a few MB).
DEFAULT_CACHE_SIZE = 128

# Error texts from xgrammar's C++ start with "[hh:mm:ss] /path/file.cc:123: ".
_XGR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")
_XGR_CHECK = re.compile(r"^Check failed: \(.*?\) is false:\s*")
_MAX_MESSAGE = 300

# A character of a length-bounded string in xgrammar's JSON grammars, as it prints it
# (see the module docstring), and the one it should be: no C0 control character, and no
# UTF-16 surrogate either (xgrammar would take its 3 bytes, ED A0-BF xx, for one
# character; they are not UTF-8 and decode to 3 U+FFFD, past `maxLength`).
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n\ud800-\udfff]"
# The tokens of a printed grammar that may hold brackets or quotes: string literals
# (also the arguments of ``Regex(...)``) and character classes, escapes included.
_EBNF_LITERAL_OR_CLASS = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]', re.DOTALL)


def constraint_param(kind: str) -> str:
    """The request field a client most likely set for a constraint of this kind."""
    if kind in ("json_schema", "json_object"):
        return "response_format"
    return f"guided_{kind}"


def _invalid(constraint: Constraint, problem: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"invalid {constraint.kind} constraint: {problem}", param=constraint_param(constraint.kind)
    )


def grammar_source(constraint: Constraint) -> tuple[str, str]:
    """(how, text) to compile `constraint`: ``how`` is ``json_schema``, ``regex`` or
    ``ebnf``. Raises `InvalidRequestError` for a spec that is not even well-formed
    (not JSON, a choice list that is not a non-empty list of strings, an empty
    regex or grammar); xgrammar finds the rest when compiling."""
    kind, spec = constraint.kind, constraint.spec
    if kind == "json_schema":
        try:
            schema = json.loads(spec)
        except ValueError as exc:
            raise _invalid(constraint, f"the schema is not JSON ({exc})") from None
        if not isinstance(schema, dict | bool):
            raise _invalid(constraint, "a JSON schema is an object (or a boolean)")
        return "json_schema", spec
    if kind == "json_object":
        return "json_schema", '{"type": "object"}'
    if kind == "regex":
        if not spec:
            raise _invalid(constraint, "the regular expression is empty")
        return "regex", spec
    if kind == "choice":
        try:
            choices = json.loads(spec)
        except ValueError as exc:
            raise _invalid(constraint, f"the choices are not JSON ({exc})") from None
        if not isinstance(choices, list) or not choices:
            raise _invalid(constraint, "the choices must be a non-empty list of strings")
        if not all(isinstance(c, str) for c in choices):
            raise _invalid(constraint, "every choice must be a string")
        # JSON string literals are EBNF string literals (same escapes; non-ASCII raw,
        # since xgrammar does not join \u surrogate pairs): `root ::= "a" | "b"`.
        return "ebnf", constraint.choice_grammar()
    if kind == "grammar":
        if not spec.strip():
            raise _invalid(constraint, "the grammar is empty")
        return "ebnf", spec
    raise _invalid(constraint, f"unknown kind {kind!r}")


def json_strings_without_controls(ebnf: str) -> str:
    """`ebnf`, a JSON schema's grammar as xgrammar prints it, with each character class
    that lets raw control characters into a length-bounded string (`_LOOSE_STRING_CHAR`)
    narrowed to `_JSON_STRING_CHAR`; string literals are left as they are. Pure."""

    def narrow(match: re.Match[str]) -> str:
        token = match.group()
        return _JSON_STRING_CHAR if token == _LOOSE_STRING_CHAR else token

    return _EBNF_LITERAL_OR_CLASS.sub(narrow, ebnf)


def _clean_error(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location, one line, bounded."""
    text = str(exc).strip()
    text = _XGR_PREFIX.sub("", text)
    text = _XGR_CHECK.sub("", text)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


# -- the vocabulary ---------------------------------------------------------------------


def _byte_to_unicode() -> list[str]:
    """GPT-2's byte-to-unicode table: byte -> the character spelling it in the vocabulary."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(0xA1, 0xAC + 1),
        *range(0xAE, 0xFF + 1),
    ]
    table = [""] * 256
    kept = set(printable)
    shifted = 0
    for byte in range(256):
        if byte in kept:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_TO_UNICODE = _byte_to_unicode()


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer's decoder (or a part of its Sequence) is ByteLevel."""
    decoder = tokenizer.raw.decoder
    if decoder is None:
        return False
    try:
        pending: list[Any] = [json.loads(decoder.__getstate__())]
    except (AttributeError, TypeError, ValueError):
        return False
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                return True
            pending.extend(node.get("decoders") or ())
    return False


def encoded_vocab(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str] | list[bytes], bool]:
    """What `xgrammar.TokenizerInfo` is built from: (one entry per id below
    `vocab_size`, byte-level?). Byte-level: strings in the byte-to-unicode alphabet;
    otherwise raw bytes. Special and unknown ids are empty (see the module docstring)."""
    special = tokenizer.special_token_ids
    size = tokenizer.vocab_size
    if _is_byte_level(tokenizer):
        table = _BYTE_TO_UNICODE
        return [
            "" if i in special or i >= size else "".join(table[b] for b in tokenizer.token_bytes(i))
            for i in range(vocab_size)
        ], True
    return [
        b"" if i in special or i >= size else bytes(tokenizer.token_bytes(i))
        for i in range(vocab_size)
    ], False


# -- the compiler -----------------------------------------------------------------------


class ConstraintCompiler:
    """Compiles constraints for one vocabulary; thread-safe (see the module docstring).

    `vocab_size` is the width of the model's logits, which may exceed the tokenizer's
    (padded embeddings); every bitmask row covers that many ids.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        vocab_size: int = 0,
        stop_token_ids: Sequence[int] = (),
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.stop_token_ids = tuple(t for t in stop_token_ids if 0 <= t < self.vocab_size)
        vocab, byte_level = encoded_vocab(tokenizer, self.vocab_size)
        self.info = xgr.TokenizerInfo(
            vocab,
            xgr.VocabType.BYTE_LEVEL if byte_level else xgr.VocabType.RAW,
            vocab_size=self.vocab_size,
            stop_token_ids=list(self.stop_token_ids) or None,
        )
        # Our LRU is the cache (bounded); xgrammar's own would grow without limit.
        self._compiler = xgr.GrammarCompiler(
            self.info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False
        )
        self.bitmask_width = math.ceil(self.vocab_size / 32)
        # [W] int32: a bit for every id but the stop tokens (completion checks).
        not_stop = np.zeros(self.bitmask_width * 32, dtype=bool)
        not_stop[: self.vocab_size] = True
        not_stop[[t for t in self.info.stop_token_ids if 0 <= t < self.vocab_size]] = False
        self.not_stop = np.packbits(not_stop, bitorder="little").view(np.int32)
        self.stop_set = frozenset(self.info.stop_token_ids)
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.compilations = 0  # grammars compiled (cache misses), for tests and stats

    def cached(self, constraint: Constraint) -> CompiledGrammar | None:
        """The compiled grammar if the cache has it (cheap: call it on the event loop)."""
        key = (constraint.kind, constraint.spec)
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
            return grammar

    def compile(self, constraint: Constraint) -> CompiledGrammar:
        """The compiled grammar of `constraint` (from the cache when it has it).

        Raises `InvalidRequestError` naming the problem when the spec does not compile.
        Blocking: 10-500 ms on a miss; run it in a thread.
        """
        grammar = self.cached(constraint)
        if grammar is not None:
            return grammar
        how, text = grammar_source(constraint)
        try:
            if how == "json_schema":
                grammar = self._compile_json_schema(text, strict=constraint.kind == "json_schema")
            elif how == "regex":
                grammar = self._compiler.compile_regex(text)
            else:
                grammar = self._compiler.compile_grammar(text)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise _invalid(constraint, _clean_error(exc)) from None
        key = (constraint.kind, constraint.spec)
        with self._lock:
            self.compilations += 1
            self._cache[key] = grammar
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _compile_json_schema(self, schema: str, *, strict: bool) -> CompiledGrammar:
        """A schema's grammar (see the module docstring), control characters kept out of
        its strings (the grammar is parsed again from its text only where it had to change)."""
        import xgrammar as xgr

        grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict)
        ebnf = str(grammar)
        narrowed = json_strings_without_controls(ebnf)
        if narrowed == ebnf:
            return self._compiler.compile_grammar(grammar)
        return self._compiler.compile_grammar(narrowed)

    def matcher(
        self, grammar: CompiledGrammar, *, after_token_ids: Sequence[int] = ()
    ) -> ConstraintMatcher:
        """A new request's matcher for a grammar `compile()` returned."""
        return ConstraintMatcher(self, grammar, after_token_ids=after_token_ids)

    @property
    def cache_len(self) -> int:
        with self._lock:
            return len(self._cache)

    def decoded_vocab(self) -> list[bytes]:
        """Each id's bytes as xgrammar sees them (empty: special or unknown)."""
        return list(self.info.decoded_vocab)


_compilers: dict[tuple[str, int, tuple[int, ...]], ConstraintCompiler] = {}
_compilers_lock = threading.Lock()


def compiler_for(
    model_path: str | Path, *, vocab_size: int = 0, stop_token_ids: Sequence[int] = ()
) -> ConstraintCompiler:
    """The `ConstraintCompiler` of a model directory (its tokenizer), built once per
    process: engines of one model share its grammar cache. Blocking (reads the
    tokenizer and imports xgrammar: seconds); thread-safe. Raises
    `InvalidRequestError` when the model has no usable tokenizer (structured output
    is then impossible, not the server's fault)."""
    from dynamo_gateway.preprocess.tokenizer import Tokenizer

    key = (str(Path(model_path).resolve()), vocab_size, tuple(stop_token_ids))
    with _compilers_lock:
        compiler = _compilers.get(key)
        if compiler is None:
            try:
                tokenizer = Tokenizer.from_dir(model_path)
            except ConfigError as exc:
                raise InvalidRequestError(
                    f"structured output needs the model's tokenizer: {exc}",
                    param="response_format",
                ) from exc
            compiler = ConstraintCompiler(
                tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
            )
            _compilers[key] = compiler
        return compiler


# -- per request ------------------------------------------------------------------------


class ConstraintMatcher:
    """One request's walk through its grammar.

    Inactive until the generated tokens end with `after_token_ids` (at once when
    there are none): no mask, tokens not fed to the grammar. Then `fill_bitmask()`
    writes the next step's allowed ids into a row of a bitmask and `accept()` feeds
    each generated token (the engine calls it when it records the token). `ended`:
    the grammar is done and the request must end now, with STOP (see the module
    docstring); `error`: a token the grammar rejected (the request fails).

    Not thread-safe; the engines call it from one thread at a time (the reference
    engine fills masks in its step thread and accepts on the loop, never at once).
    """

    __slots__ = (
        "_after",
        "_compiler",
        "_matcher",
        "_probe",
        "_tail",
        "active",
        "ended",
        "error",
        "num_accepted",
    )

    def __init__(
        self,
        compiler: ConstraintCompiler,
        grammar: CompiledGrammar,
        *,
        after_token_ids: Sequence[int] = (),
    ) -> None:
        import xgrammar as xgr

        self._compiler = compiler
        self._matcher = xgr.GrammarMatcher(grammar)
        self._after = tuple(after_token_ids)
        self._tail: list[int] = []
        self._probe: torch.Tensor | None = None  # [1, W] int32, for completion checks
        self.active = not self._after
        self.ended = False
        self.error: str | None = None
        self.num_accepted = 0  # tokens fed to the grammar

    @property
    def bitmask_width(self) -> int:
        """Int32 words per bitmask row: ceil(vocab_size / 32)."""
        return self._compiler.bitmask_width

    @property
    def constrains(self) -> bool:
        """Whether the next token is constrained (active and not ended)."""
        return self.active and not self.ended

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next ids into ``bitmask[row]`` ([N, W] int32, CPU)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        """Feed a generated token (see the class docstring)."""
        if self.ended:
            return
        if not self.active:
            after = self._after
            tail = self._tail
            tail.append(token_id)
            if len(tail) > len(after):
                del tail[0]
            if tuple(tail) == after:
                self.active = True
                self._tail = []
            return
        if not self._matcher.accept_token(token_id):
            self.ended = True
            self.error = f"token {token_id} does not match the request's constraint"
            return
        self.num_accepted += 1
        # An accepted stop token terminates the grammar; a set lookup spares a call.
        if token_id in self._compiler.stop_set or (
            self._matcher.is_completed() and self._only_stop()
        ):
            self.ended = True

    def is_completed(self) -> bool:
        """The text so far is a complete match (the grammar may still allow more)."""
        return self.active and bool(self._matcher.is_completed())

    def jump_forward_tokens(self) -> list[int]:
        """Tokens spelling the text the grammar forces next (may be empty)."""
        if not self.constrains:
            return []
        return list(self._matcher.find_jump_forward_tokens())

    def allowed(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """[vocab_size] bool: the ids allowed next (for engines without logits)."""
        probe = self._fill_probe()
        bits = np.unpackbits(probe.numpy().view(np.uint8), bitorder="little")
        return bits[: self._compiler.vocab_size].astype(bool)

    def _fill_probe(self) -> torch.Tensor:
        probe = self._probe
        if probe is None:
            import xgrammar as xgr

            probe = self._probe = xgr.allocate_token_bitmask(1, self._compiler.vocab_size)
        self._matcher.fill_next_token_bitmask(probe, 0)
        return probe

    def _only_stop(self) -> bool:
        """Whether nothing but a stop token may follow (the grammar is done)."""
        row = self._fill_probe().numpy()[0]
        return not bool(np.any(row & self._compiler.not_stop))


_batch = threading.local()  # one xgrammar BatchGrammarMatcher per thread that fills


def fill_bitmasks(
    matchers: Sequence[ConstraintMatcher], bitmask: torch.Tensor, rows: Sequence[int]
) -> None:
    """Fill ``bitmask[rows[i]]`` for ``matchers[i]``: a step's constrained rows at once,
    on xgrammar's own threads (it releases the GIL) when there are several."""
    if len(matchers) == 1:
        matchers[0].fill_bitmask(bitmask, rows[0])
        return
    batch = getattr(_batch, "matcher", None)
    if batch is None:
        import xgrammar as xgr

        batch = _batch.matcher = xgr.BatchGrammarMatcher()
    batch.batch_fill_next_token_bitmask([m._matcher for m in matchers], bitmask, list(rows))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in place, every id of ``logits[rows]`` that ``bitmask[rows]`` forbids.

    `logits` [S, V] float32 (the caller's own copy), `bitmask` [S, W] int32 on the CPU
    (rows not in `rows` are ignored). On the CPU xgrammar's kernel does it; elsewhere
    `_apply_unpacked` (no Triton needed).
    """
    if logits.device.type == "cpu":
        import xgrammar as xgr

        vocab = min(logits.shape[1], bitmask.shape[1] * 32)
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows, vocab_size=vocab)
    else:
        _apply_unpacked(logits, bitmask, rows)


def _apply_unpacked(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """`apply_token_bitmask` in plain torch ops on any device: only the constrained rows'
    bitmask travels to the device, unpacked there into a boolean mask."""
    import torch

    vocab = min(logits.shape[1], bitmask.shape[1] * 32)
    device = logits.device
    idx = torch.tensor(rows, dtype=torch.long)
    packed = bitmask[idx].to(device, non_blocking=True)  # [C, W]
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    # [C, W, 32] bits -> [C, V'] allowed
    allowed = ((packed.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)[:, :vocab].bool()
    idx_d = idx.to(device)
    sub = logits[idx_d]  # [C, V]
    sub[:, :vocab].masked_fill_(~allowed, -math.inf)
    logits[idx_d] = sub
