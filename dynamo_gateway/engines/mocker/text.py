"""Readable fake output for the mocker: token ids that decode to English-looking text.

The mocker computes nothing, yet its output goes through the real detokenizer,
stop-string matching and streaming, so it should decode to words. `WordSource`
scans the model's own tokenizer once for tokens that are a whole lowercase word
with a leading space (``" the"``, i.e. ``"Ġthe"`` in byte-level BPE, ``"▁the"``
in SentencePiece), plus ``"."`` and ``","``. A `TokenStream` then draws from
that list with a 64-bit LCG in plain Python ints, which costs a few hundred ns
per token and allocates nothing.

Determinism: temperature 0 makes each token a pure function of the whole context,
prompt ids and every token emitted before it, as a real model's greedy output is:
the stream starts from a hash of the prompt and folds each emitted token into its
state before drawing the next. So a request resumed elsewhere (migration, a
prefill worker's first token) carries on exactly as it would have, and a token lost
or duplicated on the way changes everything after it, which the chaos tests check.
A seed makes the stream a function of (seed, context); otherwise it is random. EOS
and special tokens are never drawn.

Logprobs are synthetic: every token gets ``-log(len(words))`` (the uniform
distribution over the word list), and the "top" alternatives are the sampled
token followed by its neighbours in the word list, all with that same logprob.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from tokenizers import Tokenizer

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.models.corpus import ENGLISH_WORDS
from dynamo_gateway.protocol.engine import TokenLogprob

__all__ = ["TokenStream", "WordSource", "load_word_source"]

log = logging.getLogger(__name__)

_MASK = (1 << 64) - 1
# Knuth's MMIX LCG; full period mod 2**64, and we only use the high bits.
_LCG_A = 6364136223846793005
_LCG_C = 1442695040888963407
_GREEDY_SEED = 0x9E3779B97F4A7C15

# Decoding a token twice in a row shows whether it carries a leading space even
# where a decoder strips the space of the very first token (SentencePiece).
_DOUBLE_WORD = re.compile(r"^ ?([a-z]{2,}) \1$")
_MIN_ENGLISH = 64


class WordSource:
    """The ids a mocker may emit; shared by every engine serving the same tokenizer."""

    __slots__ = ("comma", "logprob", "period", "words")

    def __init__(
        self, words: Sequence[int], *, period: int | None = None, comma: int | None = None
    ) -> None:
        if not words:
            raise ConfigError("the mocker found no token ids it can emit")
        self.words: tuple[int, ...] = tuple(words)
        self.period = period
        self.comma = comma
        self.logprob = -math.log(len(self.words))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, *, exclude: Iterable[int] = ()) -> WordSource:
        """Scan a `tokenizers.Tokenizer` (see the module docstring)."""
        banned = set(exclude)
        for token_id, added in tokenizer.get_added_tokens_decoder().items():
            if added.special:
                banned.add(int(token_id))
        size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        ids = [i for i in range(size) if i not in banned]
        doubled = tokenizer.decode_batch([[i, i] for i in ids], skip_special_tokens=False)
        matches = [(i, _DOUBLE_WORD.match(text)) for i, text in zip(ids, doubled, strict=True)]
        words = [i for i, m in matches if m]
        # Prefer tokens that spell a whole common English word over sub-word pieces
        # (" pro", " rec"), when the vocabulary has enough of them.
        english = [i for i, m in matches if m and m.group(1) in ENGLISH_WORDS]
        if len(english) >= _MIN_ENGLISH:
            words = english
        if not words:
            log.warning("tokenizer has no plain word tokens; the mocker emits arbitrary tokens")
            singles = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
            words = [i for i, text in zip(ids, singles, strict=True) if text.strip()]
        return cls(
            words,
            period=_single_token(tokenizer, ".", banned),
            comma=_single_token(tokenizer, ",", banned),
        )

    def stream(
        self, prompt_token_ids: Sequence[int], *, temperature: float, seed: int | None
    ) -> TokenStream:
        """A new per-request stream (see the module docstring for determinism)."""
        if temperature == 0 or seed is not None:
            data = np.asarray(prompt_token_ids, dtype=np.int64).tobytes()
            key = _GREEDY_SEED if temperature == 0 or seed is None else seed & _MASK
            state = xxhash.xxh3_64_intdigest(data, seed=key)
        else:
            state = random.getrandbits(64)
        return TokenStream(self, state)


def _single_token(tokenizer: Any, text: str, banned: set[int]) -> int | None:
    token_id = tokenizer.token_to_id(text)
    if token_id is None or token_id in banned or tokenizer.decode([token_id]) != text:
        return None
    return int(token_id)


class TokenStream:
    """A per-request generator of word ids; `next()` is the hot path."""

    __slots__ = ("_comma", "_last", "_n", "_period", "_punct", "_source", "_state", "_words")

    def __init__(self, source: WordSource, state: int) -> None:
        self._source = source
        self._words = source.words
        self._n = len(source.words)
        self._period = source.period
        self._comma = source.comma
        self._state = state & _MASK
        self._last = 0  # the token emitted last, folded into the state by next()
        self._punct = True  # no punctuation as the very first token

    def next(self) -> int:
        x = ((self._state ^ self._last) * _LCG_A + _LCG_C) & _MASK
        self._state = x
        r = x >> 33
        low = r & 15
        # About one token in 16 is a period and one in 16 a comma, never two in a row.
        if low < 2 and not self._punct:
            punct = self._period if low == 0 else self._comma
            if punct is not None:
                self._punct = True
                self._last = punct
                return punct
        self._punct = False
        token = self._last = self._words[(r >> 4) % self._n]
        return token

    def emitted(self, token: int) -> None:
        """The request emitted `token` instead of `next()`'s word (a constraint or a
        logit bias chose it): the context, hence the next draw, holds `token`."""
        self._last = token

    def resume(self, token: int) -> None:
        """Walk past `token`, generated before this stream existed (a resumed request)."""
        self.next()
        self._last = token

    def next_with_logprob(self, top_k: int) -> tuple[int, TokenLogprob]:
        """`next()` plus a synthetic logprob with `top_k` alternatives (sampled one first)."""
        token = self.next()
        lp = self._source.logprob
        top: list[tuple[int, float]] = []
        if top_k > 0:
            n = self._n
            words = self._words
            # The word index next() used; its neighbours are distinct from the token.
            idx = (self._state >> 37) % n
            top.append((token, lp))
            top.extend((words[(idx + j) % n], lp) for j in range(1, min(top_k, n)))
        return token, TokenLogprob(token, lp, top)


_cache: dict[tuple[str, int, int, tuple[int, ...]], WordSource] = {}
_cache_lock = threading.Lock()


def load_word_source(
    model_dir: str | Path, *, vocab_size: int = 0, eos_token_ids: Sequence[int] = ()
) -> WordSource:
    """The `WordSource` for a model directory, built once per tokenizer file.

    Reads ``tokenizer.json``. Without one, any id below `vocab_size` except EOS
    is used (nothing can check that it decodes). Thread-safe, so that many
    engines starting at once scan the vocabulary only once.
    """
    path = Path(model_dir) / "tokenizer.json"
    exclude = tuple(sorted(set(eos_token_ids)))
    try:
        st = path.stat()
    except FileNotFoundError:
        if vocab_size <= 0:
            raise ConfigError(f"{model_dir}: no tokenizer.json and no vocab_size") from None
        log.warning("%s has no tokenizer.json; mocker output will not be readable", model_dir)
        return WordSource([i for i in range(vocab_size) if i not in exclude])
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, exclude)
    with _cache_lock:
        source = _cache.get(key)
        if source is None:
            try:
                tokenizer = Tokenizer.from_file(str(path))
            except Exception as exc:  # the library raises a bare Exception
                raise ConfigError(f"cannot load {path}: {exc}") from exc
            source = _cache[key] = WordSource.from_tokenizer(tokenizer, exclude=exclude)
        return source
