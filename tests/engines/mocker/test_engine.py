"""The mocker engine end to end, with a real (tiny, trained here) byte-level BPE tokenizer."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dynamo_gateway.engines.base import Engine, EngineContext, EngineState
from dynamo_gateway.engines.mocker import MockerEngine, WordSource, load_word_source
from dynamo_gateway.errors import ConfigError, EngineError
from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.protocol.engine import (
    EngineOutput,
    FinishReason,
    LoadMetrics,
)
from dynamo_gateway.protocol.kv_events import AllBlocksCleared, BlockStored, KvEvent
from dynamo_gateway.settings import CacheSettings, MockerSettings, SchedulerSettings, Settings
from dynamo_gateway.testing import collect, engine_request, tokens_of

EOS = 1


def _sentences(n: int) -> list[str]:
    rng = random.Random(1234)
    subjects = ["the cat", "a dog", "the model", "my friend", "the server", "our team", "a bird"]
    verbs = ["reads", "writes", "sends", "finds", "likes", "builds", "moves", "answers"]
    objects = ["the paper", "a letter", "some tokens", "the answer", "every request", "the house"]
    tails = ["quickly", "today", "again", "with care", "in the morning", "at night", "for us"]
    return [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_sentences(400), trainer)
    tok.save(str(root / "tokenizer.json"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 2048,
    }
    (root / "config.json").write_text(json.dumps(config))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    return root


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def card(model_dir: Path) -> ModelCard:
    return ModelCard.load(model_dir)


def make_engine(
    card: ModelCard,
    *,
    worker_id: str = "w0",
    publish: Callable[[KvEvent], None] | None = None,
    **mocker: Any,
) -> MockerEngine:
    mocker.setdefault("speedup", 1e6)
    cache = {k: mocker.pop(k) for k in ("block_size", "num_kv_blocks") if k in mocker}
    sched = {k: mocker.pop(k) for k in ("max_num_seqs", "max_num_batched_tokens") if k in mocker}
    settings = Settings(
        mocker=MockerSettings(**mocker),
        cache=CacheSettings(**cache),
        scheduler=SchedulerSettings(**sched),
    )
    ctx = EngineContext(
        settings=settings, model=card, worker_id=worker_id, publish_kv_event=publish
    )
    return MockerEngine(ctx)


make_request = engine_request


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 300) for _ in range(n)]


# -- output text and determinism ---------------------------------------------------------


async def test_output_decodes_to_words(card: ModelCard, tokenizer: Tokenizer) -> None:
    async with make_engine(card) as engine:
        assert isinstance(engine, Engine)
        outs = await collect(engine, make_request("r", prompt(1, 20), 40, temperature=0.7))
    ids = tokens_of(outs)
    assert len(ids) == 40
    text = tokenizer.decode(ids)
    assert re.fullmatch(r"( [a-z]{2,}[.,]?)+", text), text
    assert len(set(text.split())) > 3
    special = {0, EOS}  # <s>, </s>
    assert not special & set(ids)


async def test_temperature_zero_is_a_function_of_the_prompt(card: ModelCard) -> None:
    async with make_engine(card) as engine:
        a, b, c = await asyncio.gather(
            collect(engine, make_request("a", prompt(1, 30), 30, temperature=0)),
            collect(engine, make_request("b", prompt(1, 30), 30, temperature=0, seed=5)),
            collect(engine, make_request("c", prompt(2, 30), 30, temperature=0)),
        )
    assert tokens_of(a) == tokens_of(b)
    assert tokens_of(a) != tokens_of(c)


async def test_seed_is_deterministic_and_seeds_differ(card: ModelCard) -> None:
    p = prompt(3, 12)
    async with make_engine(card) as engine:
        s1, s1_again, s2, r1, r2 = await asyncio.gather(
            collect(engine, make_request("s1", p, 30, seed=11)),
            collect(engine, make_request("s1b", p, 30, seed=11)),
            collect(engine, make_request("s2", p, 30, seed=12)),
            collect(engine, make_request("r1", p, 30)),
            collect(engine, make_request("r2", p, 30)),
        )
    assert tokens_of(s1) == tokens_of(s1_again)
    assert tokens_of(s1) != tokens_of(s2)
    assert tokens_of(r1) != tokens_of(r2)  # unseeded sampling is random


async def test_greedy_output_is_a_function_of_the_whole_context(card: ModelCard) -> None:
    # A resumed request (migrated, or decoded after a prefill worker) carries on exactly
    # as the uninterrupted one; resumed with one token changed, or one duplicated, it
    # carries on differently, as a real model would: a corrupted stream shows.
    p = prompt(4, 20)
    async with make_engine(card) as engine:
        whole = tokens_of(await collect(engine, make_request("w", p, 24, temperature=0)))
        head, tail = whole[:8], whole[8:]
        changed = [*head[:-1], head[-1] + 1 if head[-1] != 299 else 298]
        resumed, altered, doubled = await asyncio.gather(
            collect(engine, make_request("r", p, 24, temperature=0, resumed=head)),
            collect(engine, make_request("a", p, 24, temperature=0, resumed=changed)),
            collect(engine, make_request("d", p, 25, temperature=0, resumed=[*head, head[-1]])),
        )
    assert tokens_of(resumed) == tail
    assert tokens_of(altered) != tail
    assert tokens_of(doubled) != tail


async def test_logprobs_are_synthetic_uniform(card: ModelCard, model_dir: Path) -> None:
    n_words = len(load_word_source(model_dir, eos_token_ids=(EOS,)).words)
    async with make_engine(card) as engine:
        outs = await collect(engine, make_request("r", prompt(4, 8), 10, logprobs=3))
        plain = await collect(engine, make_request("p", prompt(4, 8), 3))
    logprobs = [lp for out in outs for lp in (out.logprobs or [])]
    assert [lp.token_id for lp in logprobs] == tokens_of(outs)
    for lp in logprobs:
        assert lp.logprob == pytest.approx(-math.log(n_words))
        assert len(lp.top) == 3
        assert lp.top[0] == (lp.token_id, lp.logprob)
        assert len({t for t, _ in lp.top}) == 3
    assert all(out.logprobs is None for out in plain)


def test_word_source_falls_back_when_there_are_no_word_tokens() -> None:
    # No merges: every token is one byte, so no token is a whole word.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + 1, special_tokens=["</s>"], initial_alphabet=alphabet
    )
    tok.train_from_iterator(["ab"], trainer)
    source = WordSource.from_tokenizer(tok, exclude=[5])
    assert 0 not in source.words  # the special token
    assert 5 not in source.words  # excluded (EOS)
    assert all(tok.decode([i]).strip() for i in source.words)
    assert len(source.words) > 50


def test_word_source_without_a_tokenizer_uses_the_vocabulary(tmp_path: Path) -> None:
    source = load_word_source(tmp_path, vocab_size=10, eos_token_ids=(2, 7))
    assert source.words == (0, 1, 3, 4, 5, 6, 8, 9)
    with pytest.raises(ConfigError):
        load_word_source(tmp_path)


# -- lengths -----------------------------------------------------------------------------


async def test_max_tokens_is_exact_and_only_the_last_output_finishes(card: ModelCard) -> None:
    async with make_engine(card) as engine:
        for n in (1, 7, 33):
            outs = await collect(engine, make_request(f"r{n}", prompt(n, 10), n))
            assert len(tokens_of(outs)) == n
            assert outs[-1].finish_reason is FinishReason.LENGTH
            assert all(out.finish_reason is None for out in outs[:-1])
            assert outs[0].cached_tokens == 0
            assert all(out.cached_tokens is None for out in outs[1:])


async def test_context_window_ends_generation(model_dir: Path) -> None:
    small = ModelCard.load(model_dir, max_model_len=16)
    async with make_engine(small) as engine:
        outs = await collect(engine, make_request("r", prompt(5, 10), 100))
        assert len(tokens_of(outs)) == 6
        assert outs[-1].finish_reason is FinishReason.LENGTH
        full = await collect(engine, make_request("full", prompt(5, 16), 10))
        assert full == [
            EngineOutput(token_ids=[], finish_reason=FinishReason.LENGTH, cached_tokens=0)
        ]


async def test_resumed_tokens_are_prefilled_and_count_toward_max_tokens(card: ModelCard) -> None:
    events: list[KvEvent] = []
    async with make_engine(card, publish=events.append, block_size=4) as engine:
        p, resumed = prompt(6, 6), [10, 11, 12, 13, 14]
        outs = await collect(engine, make_request("r", p, 12, resumed=resumed))
    assert len(tokens_of(outs)) == 7
    stored = [h for e in events if isinstance(e.data, BlockStored) for h in e.data.block_hashes]
    assert stored[:2] == sequence_hashes(p + resumed, 4)[:2]


# -- prefix cache and KV events -------------------------------------------------------------


async def test_second_request_reports_cached_prefix(card: ModelCard) -> None:
    shared = prompt(7, 40)
    async with make_engine(card, block_size=16) as engine:
        first = await collect(engine, make_request("a", [*shared, 1000, 1001], 5))
        second = await collect(engine, make_request("b", [*shared, 2000], 5))
        aligned = await collect(engine, make_request("c", shared[:32], 5))
    assert first[0].cached_tokens == 0
    assert second[0].cached_tokens == 32  # two full 16-token blocks of the shared 40
    assert aligned[0].cached_tokens == 16  # fully cached prompt: its last block is recomputed


async def test_kv_events_are_ordered_and_match_hashing(card: ModelCard) -> None:
    events: list[KvEvent] = []
    async with make_engine(card, publish=events.append, block_size=4, worker_id="w7") as engine:
        p = prompt(8, 10)
        outs = await collect(engine, make_request("r", p, 12))
        n_before_close = len(events)
    assert [e.event_id for e in events] == list(range(1, len(events) + 1))
    assert {e.worker_id for e in events} == {"w7"}
    stored = [e.data for e in events[:n_before_close] if isinstance(e.data, BlockStored)]
    assert len(stored) == n_before_close
    full = p + tokens_of(outs)
    # The last sampled token is never computed: 10 + 12 - 1 = 21 tokens -> 5 full blocks.
    expected = sequence_hashes(full, 4)[:5]
    assert [h for d in stored for h in d.block_hashes] == expected
    parent = None
    for d in stored:
        assert d.parent_block_hash == parent
        i = expected.index(d.block_hashes[0])
        assert d.token_ids == full[i * 4 : (i + len(d.block_hashes)) * 4]
        parent = d.block_hashes[-1]
    # aclose() drops the cache and says so.
    assert events[-1].data == AllBlocksCleared()


async def test_identical_prompts_store_each_block_once(card: ModelCard) -> None:
    events: list[KvEvent] = []
    async with make_engine(card, publish=events.append, block_size=4) as engine:
        p = prompt(9, 12)
        await asyncio.gather(*(collect(engine, make_request(f"r{i}", p, 1)) for i in range(3)))
    stored = [h for e in events if isinstance(e.data, BlockStored) for h in e.data.block_hashes]
    assert len(stored) == len(set(stored))
    assert set(sequence_hashes(p, 4)) <= set(stored)


# -- abort, cancellation, close ---------------------------------------------------------------


async def test_abort_frees_blocks(card: ModelCard) -> None:
    async with make_engine(card, speedup=100.0) as engine:
        gen = engine.generate(make_request("r", prompt(10, 50), 10_000))
        first = await anext(gen)
        assert first.finish_reason is None
        assert engine.load().active_requests == 1
        assert engine.load().kv_blocks_used > 0
        await engine.abort("r")
        await engine.abort("r")  # idempotent
        await engine.abort("nope")  # unknown ids are ignored
        rest = [out async for out in gen]
        assert rest[-1].finish_reason is FinishReason.ABORT
        load = engine.load()
        assert (load.active_requests, load.waiting_requests, load.kv_blocks_used) == (0, 0, 0)
        assert load.kv_blocks_total == 16384


async def test_closing_the_generator_early_frees_the_slot(card: ModelCard) -> None:
    async with make_engine(card, speedup=100.0, max_num_seqs=1) as engine:
        gen = engine.generate(make_request("r", prompt(11, 20), 10_000))
        await anext(gen)
        waiting = asyncio.ensure_future(collect(engine, make_request("next", prompt(12, 5), 3)))
        await asyncio.sleep(0.01)
        assert engine.load().waiting_requests == 1  # only one slot
        await gen.aclose()
        outs = await asyncio.wait_for(waiting, 5)
        assert len(tokens_of(outs)) == 3
        assert engine.load().kv_blocks_used == 0


async def test_cancelled_consumer_aborts_its_request(card: ModelCard) -> None:
    async with make_engine(card, speedup=100.0) as engine:
        task = asyncio.ensure_future(collect(engine, make_request("r", prompt(13, 20), 10_000)))
        while engine.load().active_requests == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.load() == LoadMetrics(kv_blocks_total=16384)


async def test_aclose_aborts_in_flight_and_is_idempotent(card: ModelCard) -> None:
    engine = make_engine(card, speedup=100.0)
    await engine.start()
    await engine.check_health()
    gens = [engine.generate(make_request(f"r{i}", prompt(i, 10), 10_000)) for i in range(3)]
    for gen in gens:
        await anext(gen)
    waiting = engine.generate(make_request("w", prompt(99, 10), 5))
    await engine.aclose()
    await engine.aclose()
    assert engine.state is EngineState.STOPPED
    for gen in gens:
        outs = [out async for out in gen]
        assert outs[-1].finish_reason is FinishReason.ABORT
    with pytest.raises(EngineError):
        await anext(waiting)  # submitted after close: refused
    with pytest.raises(EngineError):
        await engine.check_health()


async def test_generate_before_start_raises(card: ModelCard) -> None:
    engine = make_engine(card)
    assert engine.state is EngineState.CREATED
    with pytest.raises(EngineError):
        await anext(engine.generate(make_request("r", [5, 6], 2)))
    with pytest.raises(EngineError):
        await engine.check_health()
    await engine.aclose()


async def test_duplicate_request_id_is_refused(card: ModelCard) -> None:
    async with make_engine(card, speedup=100.0) as engine:
        gen = engine.generate(make_request("r", prompt(14, 5), 1000))
        await anext(gen)
        with pytest.raises(EngineError):
            await anext(engine.generate(make_request("r", prompt(14, 5), 5)))
        await gen.aclose()


async def test_step_loop_failure_fails_requests_and_health(card: ModelCard) -> None:
    class Broken:
        def step_seconds(self, prefill_tokens: int, decode_kv_blocks: int) -> float:
            raise RuntimeError("boom")

    async with make_engine(card) as engine:
        engine._timing = Broken()  # type: ignore[assignment]
        outs = await collect(engine, make_request("r", prompt(15, 5), 5))
        assert outs[-1].finish_reason is FinishReason.ERROR
        assert outs[-1].error is not None and "boom" in outs[-1].error
        assert engine.state is EngineState.FAILED
        with pytest.raises(EngineError, match="boom"):
            await engine.check_health()


# -- scheduling ----------------------------------------------------------------------------------


async def test_preemption_under_a_tiny_cache_still_completes_everything(card: ModelCard) -> None:
    # 6 requests that each grow to 8 + 24 = 32 tokens = 8 blocks, in a 12-block cache.
    prompts = [prompt(100 + i, 8) for i in range(6)]
    async with make_engine(card, block_size=4, num_kv_blocks=12) as engine:
        outs = await asyncio.gather(
            *(
                collect(engine, make_request(f"r{i}", p, 24, temperature=0))
                for i, p in enumerate(prompts)
            )
        )
        assert engine.num_preemptions > 0
        assert engine.load().kv_blocks_used == 0
    async with make_engine(card) as roomy:
        reference = await asyncio.gather(
            *(
                collect(roomy, make_request(f"r{i}", p, 24, temperature=0))
                for i, p in enumerate(prompts)
            )
        )
    for got, want in zip(outs, reference, strict=True):
        assert got[-1].finish_reason is FinishReason.LENGTH
        # Preemption recomputes KV but never changes what was generated.
        assert tokens_of(got) == tokens_of(want)


async def test_request_alone_in_a_full_cache_stops_at_capacity(card: ModelCard) -> None:
    async with make_engine(card, block_size=4, num_kv_blocks=3) as engine:
        outs = await collect(engine, make_request("r", prompt(16, 5), 100))
        too_big = await collect(engine, make_request("big", prompt(17, 13), 5))
    # 12 slots hold 5 prompt + 7 generated tokens; feeding the 8th would need a 4th block.
    assert len(tokens_of(outs)) == 8
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert too_big[-1].finish_reason is FinishReason.ERROR
    assert too_big[-1].error


async def test_waiting_request_runs_after_the_only_running_one_hits_capacity(
    card: ModelCard,
) -> None:
    async with make_engine(card, block_size=4, num_kv_blocks=3) as engine:
        big = asyncio.ensure_future(collect(engine, make_request("a", prompt(22, 5), 100)))
        await asyncio.sleep(0)
        # b needs 1 block plus the spare one while a runs: it waits until a stops.
        small = await asyncio.wait_for(collect(engine, make_request("b", prompt(23, 4), 3)), 5)
        assert len(tokens_of(await big)) == 8
        assert len(tokens_of(small)) == 3


async def test_chunked_prefill_and_max_num_seqs(card: ModelCard) -> None:
    # speedup 20: 0.4 ms decode steps, slow enough that the loop below sees each step.
    async with make_engine(card, max_num_batched_tokens=16, max_num_seqs=2, speedup=20.0) as engine:
        tasks = [
            asyncio.ensure_future(collect(engine, make_request(f"r{i}", prompt(i, 100), 20)))
            for i in range(5)
        ]
        await asyncio.sleep(0)
        peak_running = 0
        while not all(t.done() for t in tasks):
            load = engine.load()
            peak_running = max(peak_running, load.active_requests)
            assert load.active_requests <= 2
            await asyncio.sleep(0)
        assert peak_running == 2
        for t in tasks:
            assert len(tokens_of(t.result())) == 20


async def test_slow_consumer_gets_coalesced_outputs(card: ModelCard) -> None:
    # speedup 10: 0.8 ms decode steps; the consumer dawdles 20 ms between reads.
    async with make_engine(card, speedup=10.0, decode_base_ms=8.0) as engine:
        gen = engine.generate(make_request("r", prompt(18, 10), 50))
        first = await anext(gen)
        await asyncio.sleep(0.02)
        second = await anext(gen)
        rest = [out async for out in gen]
    assert len(first.token_ids) == 1
    assert len(second.token_ids) > 5
    assert len(first.token_ids) + len(second.token_ids) + len(tokens_of(rest)) == 50


async def test_engine_keeps_its_pace_while_the_loop_is_busy(card: ModelCard) -> None:
    # The mocker stands in for an engine running beside the frontend: a consumer
    # hogging the event loop must not slow token production down. 1 ms steps,
    # 40 tokens; the consumer blocks the loop for 5 ms after every output.
    async with make_engine(card, speedup=8.0, prefill_base_ms=0, prefill_ms_per_token=0) as engine:
        t0 = time.perf_counter()
        outputs = []
        async for out in engine.generate(make_request("r", prompt(25, 4), 40)):
            outputs.append(out)
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
    assert len(tokens_of(outputs)) == 40
    # Lock-step delivery would take 40 x 5 ms; the engine ran ahead meanwhile.
    assert len(outputs) < 20
    assert elapsed < 0.15


async def test_speedup_makes_it_fast(card: ModelCard) -> None:
    # 5 tokens: one ~5 ms prefill step, then 4 decode steps of ~8 ms.
    timings = {}
    for speedup in (1.0, 1e4):
        async with make_engine(card, speedup=speedup) as engine:
            t0 = time.perf_counter()
            outs = await collect(engine, make_request("r", prompt(19, 10), 5))
            timings[speedup] = time.perf_counter() - t0
            assert len(tokens_of(outs)) == 5
    assert timings[1.0] >= 0.035
    assert timings[1e4] < timings[1.0] / 2


async def test_sub_millisecond_steps_keep_their_simulated_rate(card: ModelCard) -> None:
    # 0.1 ms decode steps: 200 tokens take ~20 ms, not 200 timer ticks of 1 ms.
    async with make_engine(
        card, speedup=80.0, prefill_base_ms=0, prefill_ms_per_token=0, decode_base_ms=8.0
    ) as engine:
        t0 = time.perf_counter()
        outs = await collect(engine, make_request("r", prompt(24, 4), 200))
        elapsed = time.perf_counter() - t0
    assert len(tokens_of(outs)) == 200
    assert 0.019 <= elapsed < 0.1


async def test_idle_engine_does_not_spin(card: ModelCard) -> None:
    async with make_engine(card, speedup=1e9) as engine:
        await collect(engine, make_request("r", prompt(20, 4), 3))
        steps = engine.num_steps
        await asyncio.sleep(0.02)
        assert engine.num_steps == steps
        await collect(engine, make_request("r2", prompt(21, 4), 3))
        assert engine.num_steps > steps


async def test_many_engines_share_one_loop(card: ModelCard) -> None:
    events: list[KvEvent] = []
    engines = [
        make_engine(card, worker_id=f"w{i}", publish=events.append, block_size=4)
        for i in range(100)
    ]
    await asyncio.gather(*(e.start() for e in engines))
    try:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(
                collect(e, make_request(f"r{j}", prompt(i * 10 + j, 12), 20))
                for i, e in enumerate(engines)
                for j in range(2)
            )
        )
        elapsed = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(e.aclose() for e in engines))
    assert all(len(tokens_of(r)) == 20 for r in results)
    assert elapsed < 5
    by_worker: dict[str, list[int]] = {}
    for e in events:
        by_worker.setdefault(e.worker_id, []).append(e.event_id)
    assert len(by_worker) == 100
    assert all(ids == list(range(1, len(ids) + 1)) for ids in by_worker.values())
