"""The torch reference engine end to end on the demo model, checked against transformers."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from transformers import AutoModelForCausalLM

from dynamo_gateway.engines.base import Engine, EngineContext, EngineState
from dynamo_gateway.engines.reference.engine import ReferenceEngine
from dynamo_gateway.errors import EngineError
from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.protocol.engine import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    LoadMetrics,
)
from dynamo_gateway.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from dynamo_gateway.settings import load_settings
from dynamo_gateway.testing import collect, engine_request, tokens_of

VOCAB = 2048  # the demo model's
N = 24  # tokens per greedy comparison


@pytest.fixture(scope="module")
def card(demo_model: Path) -> ModelCard:
    return ModelCard.load(demo_model)


@pytest.fixture(scope="module")
def hf_model(demo_model: Path) -> Iterator[Any]:
    model: Any = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    yield model.eval()


@pytest.fixture(scope="module")
def greedy(hf_model: Any) -> Callable[[list[int], int], list[int]]:
    """transformers' greedy continuation of a prompt (EOS does not stop it), memoized."""
    memo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def run(prompt: list[int], n: int = N) -> list[int]:
        key = (tuple(prompt), n)
        if key not in memo:
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                # An explicit mask: without one, generate() masks every token equal to
                # pad_token_id as padding (the demo's BOS is id 0).
                out = hf_model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=n,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            memo[key] = [int(t) for t in out[0, len(prompt) :]]
            assert len(memo[key]) == n
        return memo[key]

    return run


@asynccontextmanager
async def running(
    card: ModelCard,
    *,
    publish: Callable[[KvEvent], None] | None = None,
    **sections: dict[str, Any],
) -> AsyncIterator[ReferenceEngine]:
    """A started engine on CPU, one torch thread (the tests share 2 cores).

    The KV cache gets 256 blocks unless the test says otherwise: the automatic size
    is a share of the host's memory, gigabytes of zeros to allocate.
    """
    sections["cache"] = {"num_kv_blocks": 256, **sections.get("cache", {})}
    reference = {"device": "cpu", "num_threads": 1, **sections.pop("reference", {})}
    settings = load_settings(None, reference=reference, **sections)
    engine = ReferenceEngine(
        EngineContext(settings=settings, model=card, worker_id="w0", publish_kv_event=publish)
    )
    await engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()


def make_request(
    rid: str, prompt: list[int], max_tokens: int = N, **sampling: Any
) -> EngineRequest:
    """Greedy and EOS-blind unless told otherwise (the transformers comparisons need it)."""
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("ignore_eos", True)
    return engine_request(rid, prompt, max_tokens, **sampling)


def stream(engine: Engine, req: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
    """`generate()` as the async generator it is (it has `aclose()`)."""
    return cast("AsyncGenerator[EngineOutput, None]", engine.generate(req))


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, VOCAB) for _ in range(n)]


PROMPTS = [
    prompt(1, 3),
    prompt(2, 9),
    [0, *prompt(3, 16)],
    prompt(4, 40),
]  # one starts with BOS (0)


# -- greedy equivalence ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block_size", "budget"),
    [(4, 8192), (16, 16)],
    ids=["block4", "block16-chunked-prefill"],
)
async def test_greedy_equals_transformers_alone_and_batched(
    card: ModelCard, greedy: Callable[[list[int], int], list[int]], block_size: int, budget: int
) -> None:
    expected = [greedy(p, N) for p in PROMPTS]
    async with running(
        card,
        cache={"block_size": block_size, "num_kv_blocks": 256},
        scheduler={"max_num_batched_tokens": budget},
    ) as engine:
        assert isinstance(engine, Engine)
        alone = [
            tokens_of(await collect(engine, make_request(f"a{i}", p)))
            for i, p in enumerate(PROMPTS)
        ]
        batched = await asyncio.gather(
            *(collect(engine, make_request(f"b{i}", p)) for i, p in enumerate(PROMPTS))
        )
        assert engine.load() == LoadMetrics(kv_blocks_total=256)
    assert alone == expected
    assert [tokens_of(outs) for outs in batched] == expected
    for outs in batched:
        assert outs[-1].finish_reason is FinishReason.LENGTH
        assert all(out.finish_reason is None for out in outs[:-1])


@pytest.mark.parametrize("fixture", ["qwen2_model", "mistral_window_model"])
async def test_other_architectures_through_the_engine(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    # Tiny random checkpoints from this folder's conftest: Qwen2 (biases, tied
    # embeddings) and Mistral with an 8-token sliding window, over 4-token blocks,
    # chunked prefill and concurrent requests.
    path: Path = request.getfixturevalue(fixture)
    hf: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # Their vocabulary has 512 tokens.
    prompts = [[t % 512 for t in prompt(300 + i, n)] for i, n in enumerate((30, 11, 21))]
    expected = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.eval().generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=12,
                eos_token_id=None,
            )
            expected.append([int(t) for t in out[0, len(p) :]])
    async with running(
        ModelCard.load(path),
        cache={"block_size": 4, "num_kv_blocks": 64},
        scheduler={"max_num_batched_tokens": 16},
    ) as engine:
        got = await asyncio.gather(
            *(collect(engine, make_request(f"r{i}", p, 12)) for i, p in enumerate(prompts))
        )
    assert [tokens_of(outs) for outs in got] == expected


async def test_prefix_cache_hit_reports_cached_tokens_and_keeps_the_output(
    card: ModelCard, greedy: Callable[[list[int], int], list[int]]
) -> None:
    events: list[KvEvent] = []
    long = prompt(5, 50)
    async with running(card, publish=events.append, cache={"num_kv_blocks": 64}) as engine:
        first = await collect(engine, make_request("first", long))
        n_first = len(events)
        second = await collect(engine, make_request("second", long))
        # A different continuation of the same first 32 tokens.
        forked = await collect(engine, make_request("forked", [*long[:32], 7, 8, 9], 4))
    assert first[0].cached_tokens == 0
    assert second[0].cached_tokens == 48  # (50 - 1) // 16 full blocks
    assert forked[0].cached_tokens == 32
    assert tokens_of(first) == tokens_of(second) == greedy(long, N)
    stored_first = [
        h for e in events[:n_first] if isinstance(e.data, BlockStored) for h in e.data.block_hashes
    ]
    stored_later = [
        h for e in events[n_first:] if isinstance(e.data, BlockStored) for h in e.data.block_hashes
    ]
    shared = sequence_hashes(long, 16)[:3]
    assert shared == stored_first[:3]
    assert not set(shared) & set(stored_later)  # no duplicate BlockStored for shared blocks
    assert [e.event_id for e in events] == list(range(1, len(events) + 1))
    assert events[-1].data == AllBlocksCleared()


async def test_filling_a_small_cache_evicts_and_reports_removals(card: ModelCard) -> None:
    events: list[KvEvent] = []
    async with running(
        card, publish=events.append, cache={"block_size": 4, "num_kv_blocks": 12}
    ) as engine:
        for i in range(4):
            await collect(engine, make_request(f"r{i}", prompt(10 + i, 20), 4))
        assert engine.load().kv_blocks_used == 0
    removed = [h for e in events if isinstance(e.data, BlockRemoved) for h in e.data.block_hashes]
    stored = [h for e in events if isinstance(e.data, BlockStored) for h in e.data.block_hashes]
    assert removed
    assert set(removed) <= set(stored)


# -- batching, preemption ------------------------------------------------------------------


async def test_many_concurrent_requests_of_mixed_lengths_complete(card: ModelCard) -> None:
    rng = random.Random(7)
    shapes = [(rng.randrange(1, 60), rng.randrange(1, 16)) for _ in range(16)]
    async with running(
        card,
        cache={"block_size": 8, "num_kv_blocks": 128},
        scheduler={"max_num_seqs": 6, "max_num_batched_tokens": 64},
    ) as engine:
        results = await asyncio.gather(
            *(
                collect(engine, make_request(f"r{i}", prompt(100 + i, n), m))
                for i, (n, m) in enumerate(shapes)
            )
        )
        load = engine.load()
    for (_, m), outs in zip(shapes, results, strict=True):
        assert len(tokens_of(outs)) == m
        assert outs[-1].finish_reason is FinishReason.LENGTH
    assert (load.active_requests, load.waiting_requests, load.kv_blocks_used) == (0, 0, 0)


async def test_preemption_under_a_tiny_cache_keeps_greedy_output(
    card: ModelCard, greedy: Callable[[list[int], int], list[int]]
) -> None:
    # Each request grows to 12 + 24 = 36 tokens = 9 blocks; the cache holds 10.
    prompts = [prompt(200 + i, 12) for i in range(4)]
    async with running(card, cache={"block_size": 4, "num_kv_blocks": 10}) as engine:
        results = await asyncio.gather(
            *(collect(engine, make_request(f"r{i}", p)) for i, p in enumerate(prompts))
        )
        assert engine.num_preemptions > 0
        assert engine.load().kv_blocks_used == 0
    for p, outs in zip(prompts, results, strict=True):
        assert outs[-1].finish_reason is FinishReason.LENGTH
        assert tokens_of(outs) == greedy(p, N)


# -- abort and close -----------------------------------------------------------------------


async def test_abort_and_early_close_free_blocks(card: ModelCard) -> None:
    async with running(card, cache={"num_kv_blocks": 64}) as engine:
        gen = stream(engine, make_request("a", prompt(20, 30), 1000))
        first = await anext(gen)
        assert first.finish_reason is None and first.cached_tokens == 0
        assert engine.load().active_requests == 1 and engine.load().kv_blocks_used > 0
        await engine.abort("a")
        await engine.abort("a")  # idempotent
        await engine.abort("unknown")
        rest = [out async for out in gen]
        assert rest[-1].finish_reason is FinishReason.ABORT
        assert engine.load() == LoadMetrics(kv_blocks_total=64)

        gen = stream(engine, make_request("b", prompt(21, 30), 1000))
        await anext(gen)
        await gen.aclose()  # the consumer went away
        assert engine.load() == LoadMetrics(kv_blocks_total=64)

        task = asyncio.ensure_future(collect(engine, make_request("c", prompt(22, 30), 1000)))
        while engine.load().active_requests == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.load() == LoadMetrics(kv_blocks_total=64)
        # The engine goes on serving.
        assert len(tokens_of(await collect(engine, make_request("d", prompt(23, 5), 3)))) == 3


async def test_aclose_aborts_in_flight_and_is_idempotent(card: ModelCard) -> None:
    settings = load_settings(reference={"device": "cpu", "num_threads": 1})
    engine = ReferenceEngine(EngineContext(settings=settings, model=card, worker_id="w"))
    assert engine.state is EngineState.CREATED
    with pytest.raises(EngineError):
        await anext(engine.generate(make_request("early", [5, 6], 2)))
    with pytest.raises(EngineError):
        await engine.check_health()
    engine = ReferenceEngine(
        EngineContext(
            settings=load_settings(
                reference={"device": "cpu", "num_threads": 1}, cache={"num_kv_blocks": 32}
            ),
            model=card,
            worker_id="w",
        )
    )
    await engine.start()
    await engine.check_health()
    gens = [engine.generate(make_request(f"r{i}", prompt(30 + i, 10), 1000)) for i in range(3)]
    for gen in gens:
        await anext(gen)
    await engine.aclose()
    await engine.aclose()
    assert engine.state is EngineState.STOPPED
    for gen in gens:
        outs = [out async for out in gen]
        assert outs[-1].finish_reason is FinishReason.ABORT
    with pytest.raises(EngineError):
        await anext(engine.generate(make_request("late", [5, 6], 2)))
    with pytest.raises(EngineError):
        await engine.check_health()


# -- sampling parameters -----------------------------------------------------------------


async def test_seeded_sampling_is_reproducible(card: ModelCard) -> None:
    p = prompt(40, 10)
    kw: dict[str, Any] = {"temperature": 1.0, "top_p": 0.95}
    async with running(card) as engine:
        a, b, c = await asyncio.gather(
            collect(engine, make_request("a", p, 16, seed=7, **kw)),
            collect(engine, make_request("b", p, 16, seed=7, **kw)),
            collect(engine, make_request("c", p, 16, seed=8, **kw)),
        )
        alone = await collect(engine, make_request("d", p, 16, seed=7, **kw))
    assert tokens_of(a) == tokens_of(b) == tokens_of(alone)
    assert tokens_of(a) != tokens_of(c)


async def test_stop_rules(card: ModelCard, greedy: Callable[[list[int], int], list[int]]) -> None:
    p = prompt(50, 8)
    g = greedy(p, N)
    stop = g[3]
    k = g.index(stop)  # its first occurrence
    # The card's EOS set to a token greedy emits: EOS stops unless ignore_eos.
    eos_card = dataclasses.replace(card, eos_token_ids=(stop,))
    async with running(eos_card) as engine:
        by_stop_id = await collect(
            engine, make_request("s", p, stop_token_ids=(stop,), ignore_eos=False)
        )
        by_eos = await collect(engine, make_request("e", p, ignore_eos=False))
        ignored = await collect(engine, make_request("i", p, ignore_eos=True))
        held = await collect(engine, make_request("m", p, ignore_eos=False, min_tokens=k + 2))
    assert tokens_of(by_stop_id) == g[: k + 1]  # the stop token is part of the output
    assert by_stop_id[-1].finish_reason is FinishReason.STOP
    assert tokens_of(by_eos) == g[: k + 1]
    assert by_eos[-1].finish_reason is FinishReason.STOP
    assert tokens_of(ignored) == g
    assert ignored[-1].finish_reason is FinishReason.LENGTH
    # min_tokens masks the stop token until k + 2 tokens exist.
    held_ids = tokens_of(held)
    assert len(held_ids) >= k + 2
    assert stop not in held_ids[: k + 2]
    assert held_ids[:k] == g[:k]


async def test_logprobs_and_resumed_tokens(
    card: ModelCard, greedy: Callable[[list[int], int], list[int]]
) -> None:
    p = prompt(60, 7)
    g = greedy(p, N)
    async with running(card) as engine:
        outs = await collect(engine, make_request("lp", p, 6, logprobs=3))
        resumed = await collect(engine, make_request("res", p, N, resumed=g[:5]))
        plain = await collect(engine, make_request("plain", p, 2))
    logprobs = [lp for out in outs for lp in out.logprobs or []]
    assert [lp.token_id for lp in logprobs] == tokens_of(outs) == g[:6]
    for lp in logprobs:
        assert len(lp.top) == 3
        assert lp.top[0][0] == lp.token_id  # greedy: the sampled token is the most likely
        assert lp.logprob == pytest.approx(lp.top[0][1]) and lp.logprob <= 0
    assert all(out.logprobs is None for out in plain)
    # Resumed tokens are prefilled and count toward max_tokens.
    assert tokens_of(resumed) == g[5:]


async def test_requests_that_cannot_run(card: ModelCard) -> None:
    small = dataclasses.replace(card, max_model_len=16)
    async with running(small, cache={"block_size": 4, "num_kv_blocks": 3}) as engine:
        full = await collect(engine, make_request("full", prompt(70, 16), 5))
        assert full == [
            EngineOutput(token_ids=[], finish_reason=FinishReason.LENGTH, cached_tokens=0)
        ]
        too_big = await collect(engine, make_request("big", prompt(71, 13), 1))
        assert too_big[-1].finish_reason is FinishReason.ERROR and too_big[-1].error
        capped = await collect(engine, make_request("cap", prompt(72, 10), 100))
        # 12 slots hold 10 prompt + 2 generated tokens, the 3rd is never fed.
        assert len(tokens_of(capped)) == 3 and capped[-1].finish_reason is FinishReason.LENGTH
        with pytest.raises(EngineError):
            await anext(engine.generate(make_request("oov", [1, VOCAB], 2)))
        with pytest.raises(EngineError):
            await anext(engine.generate(make_request("empty", [], 2)))
        gen = stream(engine, make_request("dup", prompt(73, 4), 1000))
        await anext(gen)
        with pytest.raises(EngineError):
            await anext(engine.generate(make_request("dup", prompt(73, 4), 2)))
        await gen.aclose()


# -- failures, responsiveness, registration --------------------------------------------------


async def test_a_failed_step_fails_requests_and_health(
    card: ModelCard, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(card) as engine:

        def broken(*args: object) -> torch.Tensor:
            raise RuntimeError("boom")

        monkeypatch.setattr(engine.model, "forward", broken)
        outs = await collect(engine, make_request("r", prompt(80, 5), 5))
        assert outs[-1].finish_reason is FinishReason.ERROR
        assert outs[-1].error is not None and "boom" in outs[-1].error
        assert engine.state is EngineState.FAILED
        with pytest.raises(EngineError, match="boom"):
            await engine.check_health()
        assert engine.load().kv_blocks_used == 0


async def test_event_loop_stays_responsive_during_a_long_prefill(card: ModelCard) -> None:
    async with running(card) as engine:
        await collect(engine, make_request("warm", prompt(90, 8), 1))
        ticks: list[float] = []
        done = asyncio.Event()

        async def tick() -> None:
            while not done.is_set():
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.005)

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        outs = await collect(engine, make_request("long", prompt(91, 1500), 1))
        elapsed = time.perf_counter() - t0
        done.set()
        await ticker
    assert len(tokens_of(outs)) == 1
    during = [t for t in ticks if t0 <= t <= t0 + elapsed]
    gaps = [b - a for a, b in itertools.pairwise(ticks) if a >= t0 - 0.01]
    # The prefill is one step in the worker thread; the loop keeps ticking meanwhile.
    assert len(during) >= 3, (elapsed, len(during))
    assert max(gaps) < max(0.05, elapsed / 2), (elapsed, max(gaps))


def test_registered_as_the_reference_engine(card: ModelCard) -> None:
    registry = load_plugins(entry_points=False).registry
    reg = registry.engines.registration("reference")
    assert "paged KV cache" in reg.description
    settings = load_settings(reference={"device": "cpu"})
    engine = registry.engines.get("reference")(EngineContext(settings, card, "w"))
    assert isinstance(engine, ReferenceEngine)
    assert engine.block_size == 16 and engine.load() == LoadMetrics()
