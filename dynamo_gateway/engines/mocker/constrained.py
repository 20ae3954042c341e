"""The mocker's structured output and logit bias: words a grammar accepts, ending soon.

A mocker has no logits, so it cannot mask them; a `Picker` instead chooses each token
of a request that has a `logit_bias` or a constraint, among the ids allowed, with the
request's word stream (`text.py`) as its only randomness: ONE `stream.next()` per
token, as for any request, so greedy output stays a function of the prompt (and of
the resumed tokens: `replay()` walks the same states), and a resumed request carries on
exactly where it stopped.

Logit bias: a bias <= -100 bans a token (never emitted, while anything else is
allowed); a bias >= +100 forces it (among several, the draw picks). Smaller biases have
nothing to act on and are accepted.

Constraint, per token:

1. forced text (xgrammar's jump-forward: ``{"name": "`` after ``{`` in a schema) is
   emitted as the grammar spells it;
2. "free" (strings, numbers, free JSON): the stream's own word if the grammar allows it
   (strings read as words), else a printable token the grammar allows, drawn; openers
   (``{ [ (``) only where nothing else fits, so free JSON stays flat;
3. "steering", after `FREE_RUN` free tokens since the last forced text, or after
   `FREE_TOTAL` constrained tokens: prefer what ends a string (``"``, ``"}``), then
   what ends a container (``} ] )``), then other punctuation (a ``,`` or ``.`` ends a
   number), then words and digits, openers last; and an ending is taken as soon as the
   grammar allows one. So a free string or number ends a few tokens after `FREE_RUN`,
   nesting stops growing after `FREE_TOTAL` tokens and then closes. What this cannot
   bound is a grammar that only goes on through openers: such a request runs to
   ``max_tokens`` and ends with LENGTH, like any mocker request.

The request ends with STOP right after the token that completes the grammar when
nothing else may follow; where the grammar could end or go on, it ends there with a
coin flip of the draw (always when steering). The mocker never emits EOS itself; only
a grammar that allows nothing but its end at the very start (choice ``[""]``) makes it.

`after_token_ids` (the end of a reasoning block): the mocker plays a reasoning model:
a few free words (4 to 11, by the first draw), then those ids, then the constrained
output.

Costs: a constrained token fills and unpacks one bitmask row (O(vocab / 32) bytes) on
the event loop; requests without bias or constraint never come here.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from dynamo_gateway.protocol.engine import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from dynamo_gateway.engines.constraints import ConstraintCompiler, ConstraintMatcher
    from dynamo_gateway.engines.mocker.text import TokenStream, WordSource

__all__ = ["FREE_RUN", "FREE_TOTAL", "Picker", "TokenClasses", "token_classes"]

#: Free tokens in a row before the picker steers toward an ending.
FREE_RUN = 6
#: Constrained tokens after which the picker always steers.
FREE_TOTAL = 64
#: Biases at or beyond these ban / force a token.
BAN_BIAS = -100.0
FORCE_BIAS = 100.0

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15

# Steering ranks, best first: what ends a string, what ends a container, other
# punctuation (a comma or a dot ends a number, an "@" moves a regex on), words and
# digits, and openers last.
_QUOTE, _CLOSES, _PUNCT, _WORD, _OPENS = range(5)
_CLOSERS = frozenset("}])")
_OPENERS = frozenset("{[(")


def _mix(x: int) -> int:
    """splitmix64's finaliser: spreads a word id and a position over 64 bits."""
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class TokenClasses:
    """Per vocabulary: which ids are printable on their own, and their steering rank."""

    __slots__ = ("printable", "rank", "size")

    def __init__(self, decoded: Sequence[bytes]) -> None:
        size = len(decoded)
        printable = np.zeros(size, dtype=bool)
        rank = np.full(size, _OPENS, dtype=np.int8)
        for i, raw in enumerate(decoded):
            if not raw:
                continue  # special, or no such token
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue  # a piece of a character: never chosen unless nothing else fits
            if not text.isprintable():
                continue
            printable[i] = True
            chars = set(text)
            if chars & _OPENERS:
                rank[i] = _OPENS
            elif all(c.isalnum() or c == " " for c in text):
                rank[i] = _WORD
            elif text[0] == '"' and not any(c.isalnum() for c in text):
                rank[i] = _QUOTE
            elif chars <= _CLOSERS:
                rank[i] = _CLOSES
            else:
                rank[i] = _PUNCT
        self.size = size
        self.printable = printable
        self.rank = rank


_classes: weakref.WeakKeyDictionary[ConstraintCompiler, TokenClasses] = weakref.WeakKeyDictionary()
_classes_lock = threading.Lock()


def token_classes(compiler: ConstraintCompiler) -> TokenClasses:
    """The `TokenClasses` of a compiler's vocabulary, built once (O(vocab); call it off
    the event loop the first time)."""
    with _classes_lock:
        classes = _classes.get(compiler)
        if classes is None:
            classes = _classes[compiler] = TokenClasses(compiler.decoded_vocab())
        return classes


class Picker:
    """Chooses one request's tokens (see the module docstring); `next()` per token."""

    __slots__ = (
        "_after",
        "_banned",
        "_classes",
        "_forced",
        "_free_words",
        "_matcher",
        "_n",
        "_reasoning",
        "_run",
        "_source",
    )

    def __init__(
        self,
        params: SamplingParams,
        source: WordSource,
        *,
        matcher: ConstraintMatcher | None = None,
        classes: TokenClasses | None = None,
    ) -> None:
        self._source = source
        self._matcher = matcher
        self._classes = classes
        self._banned = frozenset(t for t, b in params.logit_bias if b <= BAN_BIAS)
        self._forced = sorted({t for t, b in params.logit_bias if b >= FORCE_BIAS})
        self._free_words: list[int] | None = None  # the words not banned, when needed
        constraint = params.constraint
        self._after = tuple(constraint.after_token_ids) if constraint is not None else ()
        self._reasoning = -1  # free words before `_after` (set by the first draw)
        self._n = 0  # tokens so far
        self._run = 0  # free constrained tokens in a row

    def next(self, stream: TokenStream, top_k: int | None) -> tuple[int, TokenLogprob | None, bool]:
        """(token, synthetic logprob or None, whether the request ends after it: STOP)."""
        logprob: TokenLogprob | None = None
        if top_k is None:
            word = stream.next()
        else:
            word, logprob = stream.next_with_logprob(top_k)
        r = _mix(word ^ (self._n * _GOLDEN & _MASK))
        matcher = self._matcher
        forced_step = False
        if matcher is not None and matcher.constrains:
            jump = matcher.jump_forward_tokens()
            token = self._constrained(word, r, matcher, jump)
            forced_step = bool(jump) and jump[0] == token
        elif matcher is not None and not matcher.active and not matcher.ended:
            token = self._reasoning_token(word, r)
        else:
            token = self._free(word, r)
        if token != word:
            stream.emitted(token)  # the context holds what was emitted
        self._observe(token, forced_step)
        ends = False
        if matcher is not None:
            matcher.accept(token)
            steering = self._run >= FREE_RUN or matcher.num_accepted >= FREE_TOTAL
            ends = matcher.ended or (matcher.is_completed() and (steering or bool(r >> 62 & 1)))
        if logprob is not None and token != word:
            lp = logprob.logprob
            others = [p for p in logprob.top if p[0] != token]
            top = [(token, lp), *others][: len(logprob.top)]
            logprob = TokenLogprob(token, lp, top)
        return token, logprob, ends

    def replay(self, stream: TokenStream, token: int) -> None:
        """Walk past a token generated before (a resumed request), as `next()` would."""
        word = stream.next()
        stream.emitted(token)
        r = _mix(word ^ (self._n * _GOLDEN & _MASK))
        matcher = self._matcher
        forced_step = False
        if matcher is not None and matcher.constrains:
            forced = matcher.jump_forward_tokens()
            forced_step = bool(forced) and forced[0] == token
        elif self._reasoning < 0:
            self._reasoning = 4 + (r >> 40) % 8
        self._observe(token, forced_step)
        if matcher is not None:
            matcher.accept(token)

    @property
    def error(self) -> str | None:
        return self._matcher.error if self._matcher is not None else None

    # -- the choices ------------------------------------------------------------------

    def _observe(self, token: int, forced: bool) -> None:
        self._n += 1
        matcher = self._matcher
        if matcher is not None and matcher.constrains:
            # Forced text (a schema's next key) starts a new run of free tokens.
            self._run = 0 if forced else self._run + 1

    def _free(self, word: int, r: int) -> int:
        """A token with no grammar: the stream's word, unless the bias says otherwise."""
        if self._forced:
            return self._forced[r % len(self._forced)]
        if word not in self._banned:
            return word
        words = self._free_words
        if words is None:
            words = self._free_words = [w for w in self._source.words if w not in self._banned]
        return words[r % len(words)] if words else word

    def _reasoning_token(self, word: int, r: int) -> int:
        """Before the grammar applies: free words, then `after_token_ids`."""
        if self._reasoning < 0:
            self._reasoning = 4 + (r >> 40) % 8
        at = self._n - self._reasoning
        if 0 <= at < len(self._after):
            return self._after[at]
        return self._free(word, r)

    def _constrained(self, word: int, r: int, matcher: ConstraintMatcher, jump: list[int]) -> int:
        """The token of a constrained step; `jump`: the tokens of the forced text."""
        classes = self._classes
        assert classes is not None
        allowed = matcher.allowed()  # [V] bool
        ok = allowed
        if self._banned:
            ok = allowed.copy()
            ok[[t for t in self._banned if 0 <= t < ok.size]] = False
            if not ok.any():
                ok = allowed  # the grammar wins over the bias
        if self._forced:
            forced = [t for t in self._forced if 0 <= t < ok.size and ok[t]]
            if forced:
                return forced[r % len(forced)]
        if jump and 0 <= jump[0] < ok.size and ok[jump[0]]:
            return jump[0]
        steering = self._run >= FREE_RUN or matcher.num_accepted >= FREE_TOTAL
        if not steering and 0 <= word < ok.size and ok[word]:
            return word
        pool = ok & classes.printable[: ok.size]
        if not pool.any():
            pool = ok
        ranks = classes.rank[: pool.size]
        if steering:
            best = int(ranks[pool].min())
            pool = pool & (ranks == best)
        else:
            flat = pool & (ranks != _OPENS)
            if flat.any():
                pool = flat
        choices = np.flatnonzero(pool)
        if choices.size == 0:  # nothing allowed at all: the grammar has ended
            return word
        return int(choices[r % choices.size])
