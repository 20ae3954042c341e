"""Structured output and logit bias in the mocker, on the demo model's tokenizer."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
import msgspec
import pytest

from dynamo_gateway.engines.base import EngineContext
from dynamo_gateway.engines.mocker import MockerEngine
from dynamo_gateway.engines.mocker.constrained import FREE_RUN, FREE_TOTAL
from dynamo_gateway.errors import InvalidRequestError
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.preprocess.tokenizer import Tokenizer
from dynamo_gateway.protocol.engine import Constraint, EngineOutput, EngineRequest, FinishReason
from dynamo_gateway.settings import CacheSettings, MockerSettings, SchedulerSettings, Settings
from dynamo_gateway.testing import collect, engine_request, tokens_of

EOS = (1, 3)

# Free strings, numbers and arrays: nothing bounds them but the mocker's steering.
ORDER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "note": {"type": "string"},
        "total": {"type": "number"},
        "count": {"type": "integer"},
        "status": {"enum": ["open", "paid", "void"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                "required": ["sku", "qty"],
            },
        },
        "meta": {
            "type": "object",
            "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["tags"],
        },
    },
    "required": ["customer", "note", "total", "count", "status", "items", "meta"],
}
# What any constrained output may cost at most: forced structure plus bounded free runs.
MAX_CONSTRAINED = 3 * FREE_TOTAL


@pytest.fixture(scope="module")
def card(demo_model: Path) -> ModelCard:
    return ModelCard.load(demo_model)


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path) -> Tokenizer:
    return Tokenizer.from_dir(demo_model)


@asynccontextmanager
async def running(card: ModelCard, cls: type[MockerEngine] = MockerEngine) -> AsyncIterator[Any]:
    settings = Settings(
        mocker=MockerSettings(speedup=1e6),
        cache=CacheSettings(num_kv_blocks=1024),
        scheduler=SchedulerSettings(max_num_seqs=64),
    )
    engine = cls(EngineContext(settings=settings, model=card, worker_id="w0"))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()


def request(rid: str, prompt: list[int], max_tokens: int = 400, **sampling: Any) -> EngineRequest:
    sampling.setdefault("temperature", 0.0)
    return engine_request(rid, prompt, max_tokens, **sampling)


def prompts(tokenizer: Tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.encode(f"Order {i}: what did customer {i * 13} buy?") for i in range(n)]


def text_of(tokenizer: Tokenizer, outputs: list[EngineOutput]) -> str:
    return tokenizer.decode(tokens_of(outputs))


def schema(spec: dict[str, Any]) -> Constraint:
    return Constraint(kind="json_schema", spec=json.dumps(spec))


async def test_json_schema_with_free_fields_validates_and_ends(
    card: ModelCard, tokenizer: Tokenizer
) -> None:
    async with running(card) as engine:
        for i, prompt in enumerate(prompts(tokenizer, 8)):
            outputs = await collect(engine, request(f"s{i}", prompt, constraint=schema(ORDER)))
            tokens = tokens_of(outputs)
            text = tokenizer.decode(tokens)
            assert outputs[-1].finish_reason is FinishReason.STOP, text
            assert len(tokens) < MAX_CONSTRAINED, text
            jsonschema.validate(json.loads(text), ORDER)
            # Readable: every token decodes to printable text on its own, no EOS.
            assert all(tokenizer.decode([t]).isprintable() for t in tokens), text
            assert not set(EOS) & set(tokens)


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        (Constraint(kind="regex", spec=r"(yes|no)-[0-9]{3}"), r"(yes|no)-[0-9]{3}"),
        (Constraint(kind="regex", spec=r"[a-z]+@[a-z]+\.com"), r"[a-z]+@[a-z]+\.com"),
        (Constraint(kind="regex", spec=r"[0-9]+"), r"[0-9]+"),
        (Constraint(kind="choice", spec='["red", "green", "blue"]'), r"red|green|blue"),
        (Constraint(kind="grammar", spec='root ::= "(" root ")" | "x"'), r"\(*x\)*"),
        (Constraint(kind="grammar", spec='root ::= "[" (root ("," root)*)? "]"'), r"[\[\],]+"),
    ],
)
async def test_regex_choice_and_grammar_hold_and_end(
    card: ModelCard, tokenizer: Tokenizer, constraint: Constraint, check: str
) -> None:
    async with running(card) as engine:
        for i, prompt in enumerate(prompts(tokenizer, 6)):
            outputs = await collect(engine, request(f"r{i}", prompt, constraint=constraint))
            text = text_of(tokenizer, outputs)
            assert outputs[-1].finish_reason is FinishReason.STOP, text
            assert re.fullmatch(check, text), text
            assert len(tokens_of(outputs)) < MAX_CONSTRAINED


async def test_json_object(card: ModelCard, tokenizer: Tokenizer) -> None:
    async with running(card) as engine:
        for i, prompt in enumerate(prompts(tokenizer, 6)):
            req = request(f"o{i}", prompt, constraint=Constraint(kind="json_object"))
            outputs = await collect(engine, req)
            text = text_of(tokenizer, outputs)
            assert outputs[-1].finish_reason is FinishReason.STOP
            assert isinstance(json.loads(text), dict), text


async def test_constrained_output_is_a_function_of_the_context(
    card: ModelCard, tokenizer: Tokenizer
) -> None:
    a, b = prompts(tokenizer, 2)
    async with running(card) as engine:
        first = tokens_of(await collect(engine, request("a1", a, constraint=schema(ORDER))))
        again = tokens_of(await collect(engine, request("a2", a, constraint=schema(ORDER))))
        other = tokens_of(await collect(engine, request("b", b, constraint=schema(ORDER))))
        # Resumed after any number of tokens, it carries on exactly as it would have.
        for k in (1, 5, len(first) // 2, len(first) - 1):
            req = request(f"resumed{k}", a, constraint=schema(ORDER), resumed=first[:k])
            rest = await collect(engine, req)
            assert first[:k] + tokens_of(rest) == first, k
            assert rest[-1].finish_reason is FinishReason.STOP
    assert first == again
    assert first != other


async def test_max_tokens_still_ends_with_length(card: ModelCard, tokenizer: Tokenizer) -> None:
    prompt = prompts(tokenizer, 1)[0]
    async with running(card) as engine:
        outputs = await collect(engine, request("short", prompt, 7, constraint=schema(ORDER)))
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert len(tokens_of(outputs)) == 7
    assert text_of(tokenizer, outputs).startswith('{"customer": "')


async def test_after_token_ids_play_a_reasoning_model(
    card: ModelCard, tokenizer: Tokenizer
) -> None:
    think_end = tuple(tokenizer.encode(" done thinking", add_special_tokens=False))
    regex = Constraint(kind="regex", spec=r"[0-9]{3}", after_token_ids=think_end)
    async with running(card) as engine:
        outputs = await collect(
            engine, request("think", prompts(tokenizer, 1)[0], constraint=regex)
        )
    tokens = tokens_of(outputs)
    at = next(i for i in range(len(tokens)) if tuple(tokens[i : i + len(think_end)]) == think_end)
    assert 4 <= at < 12, tokens  # a few free words first
    assert re.fullmatch("( [a-z]+[.,]?)+", tokenizer.decode(tokens[:at])), tokens
    assert re.fullmatch("[0-9]{3}", tokenizer.decode(tokens[at + len(think_end) :]))
    assert outputs[-1].finish_reason is FinishReason.STOP


async def test_logit_bias_bans_and_forces(card: ModelCard, tokenizer: Tokenizer) -> None:
    prompt = prompts(tokenizer, 1)[0]
    async with running(card) as engine:
        free = tokens_of(await collect(engine, request("free", prompt, 30)))
        banned = tuple((t, -100.0) for t in set(free[:10]))
        got = tokens_of(await collect(engine, request("ban", prompt, 30, logit_bias=banned)))
        forced = tokens_of(
            await collect(engine, request("force", prompt, 5, logit_bias=((free[0], 100.0),)))
        )
        # Biases between the extremes mean nothing to a mocker: the output is unchanged.
        mild = tuple((t, 5.0) for t in range(100, 120))
        same = tokens_of(await collect(engine, request("mild", prompt, 30, logit_bias=mild)))
        # With a grammar: the ban holds where the grammar leaves a choice.
        colors = Constraint(kind="choice", spec='["red", "green", "blue"]')
        picked = tokens_of(await collect(engine, request("c", prompt, constraint=colors)))
        bias = tuple((t, -100.0) for t in picked)
        other = tokens_of(
            await collect(engine, request("c2", prompt, constraint=colors, logit_bias=bias))
        )
    assert len(got) == 30 and not set(got) & {t for t, _ in banned}
    assert tokenizer.decode(got).strip(), got  # still words
    assert forced == [free[0]] * 5
    assert same == free
    assert tokenizer.decode(other) in ("red", "green", "blue")
    assert not set(other) & set(picked)


async def test_batch_of_32_mixed_requests(card: ModelCard, tokenizer: Tokenizer) -> None:
    """Constrained, biased and free requests in one batch; free ones get what they get
    alone, constrained ones too (greedy)."""
    kinds: list[dict[str, Any]] = [
        {"constraint": schema(ORDER)},
        {"constraint": Constraint(kind="regex", spec=r"[a-z]{3}-[0-9]{2}")},
        {},
        {"logit_bias": ((500, 100.0),)},
    ]
    reqs = [
        request(f"m{i}", p, 200, **kinds[i % 4], logprobs=1 if i % 8 == 2 else None)
        for i, p in enumerate(prompts(tokenizer, 32))
    ]
    async with running(card) as engine:
        together = await asyncio.gather(*(collect(engine, r) for r in reqs))
        alone = [await collect(engine, msgspec.structs.replace(r, request_id="x")) for r in reqs]
    for i, (a, b) in enumerate(zip(together, alone, strict=True)):
        assert tokens_of(a) == tokens_of(b), i
        if i % 4 == 0:
            jsonschema.validate(json.loads(text_of(tokenizer, a)), ORDER)
        elif i % 4 == 1:
            assert re.fullmatch(r"[a-z]{3}-[0-9]{2}", text_of(tokenizer, a))
        elif i % 4 == 2:
            assert a[-1].finish_reason is FinishReason.LENGTH and len(tokens_of(a)) == 200
        else:
            assert tokens_of(a) == [500] * 200


async def test_logprobs_name_the_constrained_token(card: ModelCard, tokenizer: Tokenizer) -> None:
    regex = Constraint(kind="regex", spec=r"[0-9]{4}")
    async with running(card) as engine:
        outputs = await collect(
            engine, request("lp", prompts(tokenizer, 1)[0], constraint=regex, logprobs=3)
        )
    for out in outputs:
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
        for token, lp in zip(out.token_ids, out.logprobs, strict=True):
            assert lp.token_id == token and lp.top[0][0] == token and len(lp.top) == 3


async def test_free_runs_are_bounded(card: ModelCard, tokenizer: Tokenizer) -> None:
    """A string the schema does not bound ends within a few tokens of FREE_RUN."""
    spec = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    async with running(card) as engine:
        for i, prompt in enumerate(prompts(tokenizer, 8)):
            outputs = await collect(engine, request(f"f{i}", prompt, constraint=schema(spec)))
            tokens = tokens_of(outputs)
            value = json.loads(text_of(tokenizer, outputs))["s"]
            forced = len(tokenizer.encode('{"s": "', add_special_tokens=False))
            assert len(tokens) <= forced + FREE_RUN + 2, value


class _NoStructuredOutput(MockerEngine):
    supports_structured_output: ClassVar[bool] = False
    supports_logit_bias: ClassVar[bool] = False


async def test_an_engine_that_cannot_enforce_refuses(card: ModelCard) -> None:
    async with running(card, _NoStructuredOutput) as engine:
        for sampling in (
            {"constraint": Constraint(kind="regex", spec="a+")},
            {"logit_bias": ((5, -100.0),)},
        ):
            with pytest.raises(InvalidRequestError, match="does not support") as info:
                await collect(engine, request("x", [5, 6, 7], 4, **sampling))
            assert info.value.param in ("guided_regex", "logit_bias")
        assert engine.load().active_requests == engine.load().waiting_requests == 0
        # Nothing else changed: plain requests are served.
        outputs = await collect(engine, request("plain", [5, 6, 7], 4))
        assert outputs[-1].finish_reason is FinishReason.LENGTH
