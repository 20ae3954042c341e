"""Structured output and logit bias in the reference engine, on the demo model.

The demo model has random weights: unconstrained, it writes word salad. Every JSON,
regex or grammar below comes out right only because the grammar masks its logits.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from dynamo_gateway.engines.base import EngineContext
from dynamo_gateway.engines.reference.engine import ReferenceEngine
from dynamo_gateway.errors import InvalidRequestError
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.preprocess.tokenizer import Tokenizer
from dynamo_gateway.protocol.engine import Constraint, EngineOutput, EngineRequest, FinishReason
from dynamo_gateway.settings import load_settings
from dynamo_gateway.testing import collect, engine_request, tokens_of

EOS = (1, 3)  # the demo model's

# Nested objects, an array of objects, enums, required fields; bounded strings and
# numbers, so that greedy decoding ends whatever the random weights prefer.
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{2,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Lima", "Oslo"]},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
        "pets": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"kind": {"enum": ["cat", "dog"]}, "young": {"type": "boolean"}},
                "required": ["kind", "young"],
            },
            "minItems": 1,
            "maxItems": 2,
        },
    },
    "required": ["name", "age", "role", "address", "pets"],
}


@pytest.fixture(scope="module")
def card(demo_model: Path) -> ModelCard:
    return ModelCard.load(demo_model)


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path) -> Tokenizer:
    return Tokenizer.from_dir(demo_model)


@asynccontextmanager
async def running(card: ModelCard, **scheduler: Any) -> AsyncIterator[ReferenceEngine]:
    settings = load_settings(
        None,
        reference={"device": "cpu", "num_threads": 1},
        cache={"num_kv_blocks": 512},
        scheduler={"max_num_seqs": 64, **scheduler},
    )
    engine = ReferenceEngine(EngineContext(settings=settings, model=card, worker_id="w0"))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()


def request(rid: str, prompt: list[int], max_tokens: int = 160, **sampling: Any) -> EngineRequest:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("ignore_eos", True)
    return engine_request(rid, prompt, max_tokens, **sampling)


def schema(spec: dict[str, Any]) -> Constraint:
    return Constraint(kind="json_schema", spec=json.dumps(spec))


def text_of(tokenizer: Tokenizer, outputs: list[EngineOutput]) -> str:
    return tokenizer.decode(tokens_of(outputs))


def prompts(tokenizer: Tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.encode(f"Request {i}: tell me about item {i * 7}.") for i in range(n)]


async def test_json_schema_output_validates(card: ModelCard, tokenizer: Tokenizer) -> None:
    async with running(card) as engine:
        for i, prompt in enumerate(prompts(tokenizer, 3)):
            outputs = await collect(engine, request(f"p{i}", prompt, constraint=schema(PERSON)))
            text = text_of(tokenizer, outputs)
            assert outputs[-1].finish_reason is FinishReason.STOP, text
            jsonschema.validate(json.loads(text), PERSON)
            # Compact, one line: no whitespace the schema's separators do not put there.
            assert "\n" not in text and "  " not in text, text


async def test_unconstrained_output_is_not_json(card: ModelCard, tokenizer: Tokenizer) -> None:
    """The control for the test above: the same prompts without a grammar."""
    async with running(card) as engine:
        for i, prompt in enumerate(prompts(tokenizer, 3)):
            outputs = await collect(engine, request(f"free{i}", prompt, 40))
            with pytest.raises(ValueError):
                json.loads(text_of(tokenizer, outputs))


async def test_json_object_with_a_bias_toward_closing(
    card: ModelCard, tokenizer: Tokenizer
) -> None:
    # Left alone, the random model writes one endless key; a bias on quotes and braces
    # (applied before the grammar mask) lets it finish. Any object will do.
    closers = [tokenizer.token_to_id(s) for s in ('"', "}", '"}', '":')]
    bias = tuple((t, 8.0) for t in closers if t is not None)
    async with running(card) as engine:
        for i, prompt in enumerate(prompts(tokenizer, 2)):
            obj = Constraint(kind="json_object")
            outputs = await collect(
                engine, request(f"o{i}", prompt, 64, constraint=obj, logit_bias=bias)
            )
            text = text_of(tokenizer, outputs)
            assert outputs[-1].finish_reason is FinishReason.STOP, text
            assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        (Constraint(kind="regex", spec=r"(yes|no)-[0-9]{3}"), r"(yes|no)-[0-9]{3}"),
        (Constraint(kind="regex", spec=r"[A-Z][a-z]{2,6} [0-9]{2}"), r"[A-Z][a-z]{2,6} [0-9]{2}"),
        (Constraint(kind="choice", spec='["red", "green", "dark \\"blue\\""]'), None),
        (Constraint(kind="grammar", spec='root ::= "(" root ")" | "x"'), r"(\(*)x(\)*)"),
        (
            Constraint(
                kind="grammar",
                spec='root ::= item ("," item){0,2}\nitem ::= "a" | "bb" | "ccc"',
            ),
            r"(a|bb|ccc)(,(a|bb|ccc)){0,2}",
        ),
    ],
)
async def test_regex_choice_and_grammar_hold(
    card: ModelCard, tokenizer: Tokenizer, constraint: Constraint, check: str | None
) -> None:
    async with running(card) as engine:
        for i, prompt in enumerate(prompts(tokenizer, 3)):
            outputs = await collect(engine, request(f"r{i}", prompt, 64, constraint=constraint))
            text = text_of(tokenizer, outputs)
            assert outputs[-1].finish_reason is FinishReason.STOP, text
            if check is None:
                assert text in json.loads(constraint.spec), text
            else:
                match = re.fullmatch(check, text)
                assert match, text
                if check.startswith(r"(\(*)"):
                    assert len(match.group(1)) == len(match.group(2)), text


async def test_grammar_completion_ends_with_stop_without_eos(
    card: ModelCard, tokenizer: Tokenizer
) -> None:
    """Neither ignore_eos nor min_tokens keeps a finished grammar going, and no EOS is
    generated for it: the token that completes the choice is the last one."""
    choice = Constraint(kind="choice", spec='["red", "green"]')
    prompt = prompts(tokenizer, 1)[0]
    async with running(card) as engine:
        for flags in ({"ignore_eos": True, "min_tokens": 10}, {"ignore_eos": False}):
            outputs = await collect(engine, request("c", prompt, 50, constraint=choice, **flags))
            tokens = tokens_of(outputs)
            assert outputs[-1].finish_reason is FinishReason.STOP
            assert tokenizer.decode(tokens) in ("red", "green")
            assert not set(EOS) & set(tokens)


async def test_a_stop_token_the_grammar_allows_ends_the_request(
    card: ModelCard, tokenizer: Tokenizer
) -> None:
    """`[0-9]+` may end after any digit: EOS is allowed there (pushed here by a bias)
    and ends the request with STOP, even under ignore_eos (the grammar is done)."""
    digits = Constraint(kind="regex", spec="[0-9]+")
    prompt = prompts(tokenizer, 1)[0]
    async with running(card) as engine:
        for ignore_eos in (False, True):
            req = request(
                "d", prompt, 20, constraint=digits, ignore_eos=ignore_eos, logit_bias=((1, 100.0),)
            )
            outputs = await collect(engine, req)
            tokens = tokens_of(outputs)
            assert outputs[-1].finish_reason is FinishReason.STOP
            # EOS is forbidden first (the regex needs a digit), the rest of the way it wins.
            assert len(tokens) == 2 and tokens[-1] == 1
            assert re.fullmatch("[0-9]+", tokenizer.decode(tokens[:1]))


async def test_constrained_and_free_requests_batched(card: ModelCard, tokenizer: Tokenizer) -> None:
    """Batched with each other, every request gets what it gets alone (greedy): the
    mask touches its own row only, and free requests are not disturbed."""
    ps = prompts(tokenizer, 6)
    reqs = [
        request("s0", ps[0], constraint=schema(PERSON)),
        request("f1", ps[1], 30),
        request("r2", ps[2], 30, constraint=Constraint(kind="regex", spec=r"[a-z]{3}-[0-9]{4}")),
        request("f3", ps[3], 30, logprobs=2),
        request("c4", ps[4], 30, constraint=Constraint(kind="choice", spec='["up", "down"]')),
        request("b5", ps[5], 30, logit_bias=((ps[5][-1], -100.0),), temperature=0.8, seed=3),
    ]
    async with running(card) as engine:
        together = await asyncio.gather(*(collect(engine, r) for r in reqs))
        alone = [await collect(engine, r) for r in reqs]
    for r, a, b in zip(reqs, together, alone, strict=True):
        assert tokens_of(a) == tokens_of(b), r.request_id
        assert a[-1].finish_reason is b[-1].finish_reason
    assert ps[5][-1] not in tokens_of(together[5])
    jsonschema.validate(json.loads(text_of(tokenizer, together[0])), PERSON)


async def test_a_batch_of_32_constrained_requests(card: ModelCard, tokenizer: Tokenizer) -> None:
    kinds = [
        schema(PERSON),
        Constraint(kind="regex", spec=r"(yes|no)-[0-9]{3}"),
        Constraint(kind="choice", spec='["alpha", "beta", "gamma"]'),
        Constraint(kind="grammar", spec='root ::= "(" root ")" | "x"'),
    ]
    ps = prompts(tokenizer, 32)
    async with running(card) as engine:
        results = await asyncio.gather(
            *(
                collect(
                    engine, request(f"b{i}", p, constraint=kinds[i % 4], temperature=0.7, seed=i)
                )
                for i, p in enumerate(ps)
            )
        )
        assert engine.load().active_requests == 0
    for i, outputs in enumerate(results):
        text = text_of(tokenizer, outputs)
        assert outputs[-1].finish_reason is FinishReason.STOP, (i, text)
        if i % 4 == 0:
            jsonschema.validate(json.loads(text), PERSON)
        elif i % 4 == 1:
            assert re.fullmatch(r"(yes|no)-[0-9]{3}", text), text
        elif i % 4 == 2:
            assert text in ("alpha", "beta", "gamma")
        else:
            assert re.fullmatch(r"\(*x\)*", text), text


# Strings with a length bound: xgrammar 0.2.9 lets raw control characters (and UTF-16
# surrogates) into them unless the compiler narrows their class (mlc-ai/xgrammar#800).
BOUNDED: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


async def test_sampled_bounded_strings_stay_json(card: ModelCard, tokenizer: Tokenizer) -> None:
    """At temperature 1 the random weights draw any byte: before the fix about one seed in
    six wrote a raw control character into "name" (``json.loads`` refuses it)."""
    prompt = tokenizer.encode("Reply as JSON: a person.")
    async with running(card) as engine:
        results = await asyncio.gather(
            *(
                collect(
                    engine,
                    request(
                        f"s{seed}",
                        prompt,
                        120,
                        constraint=schema(BOUNDED),
                        temperature=1.0,
                        seed=seed,
                        ignore_eos=False,
                    ),
                )
                for seed in range(64)
            )
        )
    for seed, outputs in enumerate(results):
        text = text_of(tokenizer, outputs)
        assert outputs[-1].finish_reason is FinishReason.STOP, (seed, text)
        jsonschema.validate(json.loads(text), BOUNDED)


async def test_after_token_ids_frees_the_output_until_they_appear(
    card: ModelCard, tokenizer: Tokenizer
) -> None:
    prompt = prompts(tokenizer, 1)[0]
    # Seeded sampling: the free part of the constrained run draws what the free run drew.
    seeded = {"temperature": 1.0, "seed": 7}
    async with running(card) as engine:
        free = tokens_of(await collect(engine, request("free", prompt, 12, **seeded)))
        # Two of its tokens stand in for "</think>": the first time that pair appears.
        at = next(i for i in range(3, 10) if tuple(free[i : i + 2]) not in _pairs(free[: i + 1]))
        after = tuple(free[at : at + 2])
        regex = Constraint(kind="regex", spec=r"[0-9]{4}", after_token_ids=after)
        outputs = await collect(engine, request("think", prompt, 40, constraint=regex, **seeded))
    tokens = tokens_of(outputs)
    assert tokens[: at + 2] == free[: at + 2], "the grammar applied before its tokens"
    assert outputs[-1].finish_reason is FinishReason.STOP
    assert re.fullmatch("[0-9]{4}", tokenizer.decode(tokens[at + 2 :]))


def _pairs(tokens: list[int]) -> set[tuple[int, ...]]:
    return {tuple(tokens[i : i + 2]) for i in range(len(tokens) - 1)}


async def test_resumed_tokens_feed_the_grammar(card: ModelCard, tokenizer: Tokenizer) -> None:
    prompt = prompts(tokenizer, 1)[0]
    async with running(card) as engine:
        full = tokens_of(await collect(engine, request("full", prompt, constraint=schema(PERSON))))
        outputs = await collect(
            engine, request("resumed", prompt, constraint=schema(PERSON), resumed=full[:9])
        )
    assert full[:9] + tokens_of(outputs) == full
    assert outputs[-1].finish_reason is FinishReason.STOP


async def test_logprobs_come_from_the_masked_distribution(
    card: ModelCard, tokenizer: Tokenizer
) -> None:
    choice = Constraint(kind="choice", spec='["red", "green", "blue"]')
    async with running(card) as engine:
        outputs = await collect(
            engine, request("lp", prompts(tokenizer, 1)[0], constraint=choice, logprobs=8)
        )
    first = next(lp for out in outputs for lp in (out.logprobs or []))
    allowed = {t for t, v in first.top if v > -math.inf}
    # Only what starts one of the choices can have come first; the rest is at -inf.
    assert allowed and all(
        any(c.startswith(tokenizer.decode([t])) for c in ("red", "green", "blue")) for t in allowed
    ), [(tokenizer.decode([t]), v) for t, v in first.top]
    assert len(allowed) < len(first.top)


async def test_logit_bias_bans_and_forces(card: ModelCard, tokenizer: Tokenizer) -> None:
    prompt = prompts(tokenizer, 1)[0]
    async with running(card) as engine:
        free = tokens_of(await collect(engine, request("free", prompt, 10)))
        # Tokens greedy decoding never picks here (the prompt's own).
        a, b = [t for t in dict.fromkeys(prompt) if t not in free][:2]
        banned = tuple((t, -100.0) for t in set(free))
        got = tokens_of(await collect(engine, request("ban", prompt, 10, logit_bias=banned)))
        forced = tokens_of(
            await collect(engine, request("force", prompt, 10, logit_bias=((a, 100.0),)))
        )
        # An id given twice gets both biases: +100 and -100 cancel out.
        twice = ((b, 100.0), (b, -100.0))
        both = tokens_of(await collect(engine, request("twice", prompt, 10, logit_bias=twice)))
    assert len(got) == 10 and not set(got) & set(free)
    assert forced == [a] * 10
    assert both == free


@pytest.mark.parametrize(
    ("bias", "words"),
    [(((2048, 1.0),), "2048"), (((-1, 1.0),), "-1"), (((7, math.nan),), "finite")],
)
async def test_bad_logit_bias_is_refused(
    card: ModelCard, bias: tuple[tuple[int, float], ...], words: str
) -> None:
    async with running(card) as engine:
        with pytest.raises(InvalidRequestError, match=words) as info:
            await collect(engine, request("bad", [5, 6, 7], 4, logit_bias=bias))
        assert info.value.param == "logit_bias"
        assert engine.load().active_requests == engine.load().waiting_requests == 0


async def test_bad_constraints_are_refused_and_grammars_cached(
    card: ModelCard, tokenizer: Tokenizer
) -> None:
    prompt = prompts(tokenizer, 1)[0]
    async with running(card) as engine:
        for bad, words in [
            (Constraint(kind="json_schema", spec='{"type": "strin"}'), "strin"),
            (Constraint(kind="regex", spec="a(b"), "parenthesis"),
            (Constraint(kind="choice", spec="[]"), "non-empty"),
            (Constraint(kind="grammar", spec="root ::= missing"), "missing"),
        ]:
            with pytest.raises(InvalidRequestError, match=words):
                await collect(engine, request("bad", prompt, 4, constraint=bad))
        await engine.check_health()
        regex = Constraint(kind="regex", spec="[0-9]{2}")
        for i in range(3):
            await collect(engine, request(f"again{i}", prompt, 4, constraint=regex))
        compiler = engine._constraint_compiler
        assert compiler is not None
        before = compiler.compilations
        await collect(engine, request("again", prompt, 4, constraint=regex))
        assert compiler.compilations == before


async def test_masks_filled_beside_the_forward_pass_are_the_same(
    card: ModelCard, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Masks filled on a second thread during the forward pass (as on a GPU) or in the
    sampler (as on the CPU) give the same tokens."""
    from dynamo_gateway.engines.reference import engine as engine_module

    ps = prompts(tokenizer, 6)
    reqs = [
        request(f"a{i}", p, 160, constraint=schema(PERSON) if i % 2 else None)
        for i, p in enumerate(ps)
    ]
    async with running(card) as engine:
        inline = await asyncio.gather(*(collect(engine, r) for r in reqs))
        assert engine._grammar_executor is None
    monkeypatch.setattr(engine_module, "GRAMMAR_ASIDE", True)
    async with running(card) as engine:
        aside = await asyncio.gather(*(collect(engine, r) for r in reqs))
        assert engine._grammar_executor is not None
    assert [tokens_of(o) for o in aside] == [tokens_of(o) for o in inline]
    for outputs in inline[1::2]:
        jsonschema.validate(json.loads(text_of(tokenizer, outputs)), PERSON)
