"""A small, deterministic English-ish text corpus for training the demo tokenizer.

The demo model (see :mod:`dynamo_gateway.models.demo`) must be built offline, so
its tokenizer is trained on text generated here from fixed word lists and a
seeded :class:`random.Random`. The text mixes prose, numbers, punctuation,
code-like lines and some non-ASCII words (accented Latin, CJK, emoji) so that
multi-byte UTF-8 sequences get their own merges and are exercised by tests.

Everything is pure Python with a private RNG: the same seed gives the same text
on every machine and Python version (``random.Random`` with an int seed is
stable across releases for the methods used here).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["DEFAULT_SEED", "corpus_lines", "generate_corpus"]

DEFAULT_SEED = 20240611


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_DETERMINERS = _words(
    "the a an this that these those every each some any no my your his her its our their"
)

_PRONOUNS = _words("I you he she it we they someone everyone nobody")

_NOUNS = _words(
    "time year people way day man woman child world life hand part place case week "
    "company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car "
    "city community name president team minute idea kid body information back parent face "
    "others level office door health person art war history party result change morning "
    "reason research girl guy moment air teacher force education foot boy age policy "
    "music market sense nation plan college interest death experience effect class "
    "control care field development role effort rate heart drug show leader light voice "
    "wife police mind price report decision son view relationship town road arm "
    "difference value building action model season society tax director position player "
    "record paper space ground form event official matter center couple site project "
    "activity star table need court oil situation cost industry figure street image phone "
    "data picture practice piece land product doctor wall patient worker news test movie "
    "north love support technology step baby computer type attention film tree source "
    "organization hair window evidence population site garden river mountain ocean bridge "
    "kitchen letter engine server request token model gateway cache network signal"
)

_VERBS = _words(
    "be have do say go get make know think take see come want look use find give tell "
    "work call try ask need feel become leave put mean keep let begin seem help talk turn "
    "start show hear play run move like live believe hold bring happen write provide sit "
    "stand lose pay meet include continue set learn change lead understand watch follow "
    "stop create speak read allow add spend grow open walk win offer remember love "
    "consider appear buy wait serve die send expect build stay fall cut reach kill remain "
    "suggest raise pass sell require report decide pull return explain hope develop carry "
    "break receive agree support hit produce eat cover catch draw choose route stream"
)

_PAST = _words(
    "was had did said went got made knew thought took saw came wanted looked used found "
    "gave told worked called tried asked needed felt became left meant kept began seemed "
    "helped talked turned started showed heard played ran moved lived believed brought "
    "happened wrote sat stood lost paid met learned led understood watched followed "
    "stopped created spoke read allowed added grew opened walked won offered remembered"
)

_ADJECTIVES = _words(
    "good new first last long great little own other old right big high different small "
    "large next early young important few public bad same able late hard major better "
    "economic strong possible whole free military true federal international full special "
    "easy clear recent certain personal open red difficult available likely short single "
    "medical current wrong private past foreign fine common poor natural significant "
    "similar hot dead central happy serious ready simple left physical general "
    "environmental financial blue democratic dark various entire close legal religious "
    "cold final main green nice huge popular traditional cultural quiet bright fast slow"
)

_ADVERBS = _words(
    "up so out just now how then more also here well only very even back there down still "
    "in as too when never really most often always sometimes together quickly slowly "
    "almost already perhaps finally probably usually suddenly carefully simply"
)

_PREPOSITIONS = _words(
    "of in to for with on at from by about into over after under between through during "
    "without before against among across behind beyond near since toward upon within"
)

_CONJUNCTIONS = _words("and but or because although while if unless until so yet")

_NAMES = _words(
    "Alice Bob Carol David Erin Frank Grace Heidi Ivan Judy Mallory Niaj Olivia Peggy "
    "Rupert Sybil Trent Victor Walter London Paris Tokyo Berlin Madrid Cairo Lima Oslo "
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday January March June October"
)

# Non-ASCII material: two-byte (Latin-1 / Latin Extended / Greek / Cyrillic),
# three-byte (CJK, symbols) and four-byte (emoji) UTF-8 sequences.
_ACCENTED = _words(
    "café naïve résumé façade jalapeño über Straße Ångström señor déjà vu crème brûlée "
    "São Paulo Zürich Kraków smörgåsbord piñata coöperate élan Ærø Ελλάδα καλημέρα "
    "привет мир спасибо"
)

_CJK = _words("你好 世界 谢谢 中文 日本語 東京 ありがとう こんにちは 한국어 안녕하세요 漢字 学习")

_EMOJI = _words("😀 😂 🙂 🚀 🌍 🎉 👍 ❤️ 🔥 ✨ 🐍 🤖 ☕ 📦 ✅ 🍕")

# Escaped so that look-alike characters (en dash, curly quotes, times sign) are explicit.
_SYMBOLS = _words(
    "\u2026 \u2014 \u2013 \u201c \u201d \u2018 \u2019 \u20ac \u00a3 \u00a5 \u00a9 \u00ae "
    "\u2122 \u00b0 \u00b1 \u00d7 \u00f7 \u2264 \u2265 \u2260 \u2192 \u2190 \u2211 \u221a "
    "\u221e \u00b5"
)

_CODE_TEMPLATES = (
    "def {v}_{n}(x, y=None):",
    "    return {n}.{v}(x) + {num}",
    "for i in range({num}):",
    "    {n}s[i] = {v}({n}, i * {num})",
    "if {n} is not None and len({n}) > {num}:",
    'print(f"{{{n}}} -> {{{v}}}")',
    "{n}_{v} = [{num}, {num}, {num}]",
    'const {n} = await fetch("/v1/{n}s/{num}");',
    "let {n}: Vec<u32> = vec![{num}; {num}];",
    '{{"{n}": {num}, "{v}": true, "name": "{n}"}}',
    "# TODO: {v} the {n} before {num} ms",
    "SELECT {n}, COUNT(*) FROM {n}s WHERE id = {num};",
    "class {N}{N2}:",
    "    def __init__(self, {n}: int = {num}) -> None:",
    "$ curl -s http://localhost:8000/v1/{n}s | jq .{v}",
)

_PUNCT_END = (".", ".", ".", ".", "!", "?", "...", ";")


def _number(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return str(rng.randrange(10))
    if kind == 1:
        return str(rng.randrange(10, 1000))
    if kind == 2:
        return f"{rng.randrange(1, 100000):,}"
    if kind == 3:
        return f"{rng.randrange(0, 1000)}.{rng.randrange(0, 100):02d}"
    if kind == 4:
        return f"{rng.randrange(1900, 2030)}"
    return f"{rng.randrange(0, 101)}%"


def _noun_phrase(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.12:
        return rng.choice(_NAMES)
    if r < 0.2:
        return rng.choice(_PRONOUNS)
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.45:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(_NOUNS))
    if rng.random() < 0.08:
        words.append(rng.choice(_ACCENTED))
    return " ".join(words)


def _clause(rng: random.Random) -> str:
    parts = [_noun_phrase(rng)]
    if rng.random() < 0.25:
        parts.append(rng.choice(_ADVERBS))
    parts.append(rng.choice(_PAST) if rng.random() < 0.6 else rng.choice(_VERBS))
    parts.append(_noun_phrase(rng))
    if rng.random() < 0.5:
        parts.append(rng.choice(_PREPOSITIONS))
        parts.append(_noun_phrase(rng))
    if rng.random() < 0.15:
        parts.append(f"{rng.choice(_PREPOSITIONS)} {_number(rng)} {rng.choice(_NOUNS)}s")
    return " ".join(parts)


def _sentence(rng: random.Random) -> str:
    text = _clause(rng)
    if rng.random() < 0.35:
        text += f", {rng.choice(_CONJUNCTIONS)} {_clause(rng)}"
    if rng.random() < 0.1:
        text = f'"{text}," said {rng.choice(_NAMES)}'
    elif rng.random() < 0.08:
        text += f" ({rng.choice(_ACCENTED)})"
    text = text[0].upper() + text[1:]
    if rng.random() < 0.05:
        text += " " + rng.choice(_EMOJI)
    return text + rng.choice(_PUNCT_END)


def _code_line(rng: random.Random) -> str:
    template = rng.choice(_CODE_TEMPLATES)
    return template.format(
        n=rng.choice(_NOUNS),
        v=rng.choice(_VERBS),
        num=rng.randrange(0, 4096),
        N=rng.choice(_NOUNS).capitalize(),
        N2=rng.choice(_NOUNS).capitalize(),
    )


def _unicode_line(rng: random.Random) -> str:
    pool = (_ACCENTED, _CJK, _EMOJI, _SYMBOLS)
    words = [rng.choice(rng.choice(pool)) for _ in range(rng.randrange(3, 10))]
    if rng.random() < 0.5:
        words.insert(rng.randrange(len(words) + 1), rng.choice(_NOUNS))
    return " ".join(words)


def corpus_lines(seed: int = DEFAULT_SEED, *, paragraphs: int = 2500) -> Iterator[str]:
    """Yield the corpus one paragraph (or code block) at a time, deterministically."""
    rng = random.Random(seed)
    for _ in range(paragraphs):
        kind = rng.random()
        if kind < 0.72:
            yield " ".join(_sentence(rng) for _ in range(rng.randrange(2, 7)))
        elif kind < 0.86:
            yield "\n".join(_code_line(rng) for _ in range(rng.randrange(2, 6)))
        elif kind < 0.95:
            yield _unicode_line(rng)
        else:
            items = (f"{i}. {_clause(rng)}" for i in range(1, rng.randrange(3, 6)))
            yield "\n".join(items)


def generate_corpus(seed: int = DEFAULT_SEED, *, paragraphs: int = 2500) -> str:
    """The whole corpus as one string, paragraphs separated by blank lines."""
    return "\n\n".join(corpus_lines(seed, paragraphs=paragraphs))


# Plain lower-case English words of the corpus: the mocker prefers vocabulary
# tokens that spell one of these, so its output reads as words, not fragments.
ENGLISH_WORDS: frozenset[str] = frozenset(
    w
    for group in (
        _DETERMINERS, _PRONOUNS, _NOUNS, _VERBS, _PAST, _ADJECTIVES, _ADVERBS,
        _PREPOSITIONS, _CONJUNCTIONS,
    )
    for w in group
    if w.isascii() and w.isalpha() and w.islower()
)  # fmt: skip
