"""A prefill engine hands its KV to a decode engine: output equals aggregated serving.

Reference engines (fp32 demo model) in one process, over each built-in
transport; the mocker with its simulated transfer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dynamo_gateway.disagg.params import decode_leg, prefill_leg
from dynamo_gateway.engines.base import EngineContext
from dynamo_gateway.engines.mocker import MockerEngine
from dynamo_gateway.engines.reference.engine import ReferenceEngine
from dynamo_gateway.engines.scheduled import ScheduledEngine
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.protocol.engine import EngineRequest, FinishReason, WorkerRole
from dynamo_gateway.settings import Settings, load_settings
from dynamo_gateway.testing import collect, engine_request, tokens_of

BS = 16
PROMPT = [(7 * i + 3) % 400 + 5 for i in range(150)]  # 10 blocks: 9 full and a partial one
N = 12


def greedy(request_id: str, prompt: list[int], max_tokens: int) -> EngineRequest:
    return engine_request(request_id, prompt, max_tokens, temperature=0.0)


def settings_for(transport: str | None, **extra: Any) -> Settings:
    return load_settings(
        cache={"block_size": BS, "num_kv_blocks": 128},
        disagg={"kv_transport": transport, "kv_transfer_timeout_s": 5.0},
        **extra,
    )


@pytest.fixture(scope="module")
def card(demo_model: Path) -> ModelCard:
    return ModelCard.load(demo_model)


async def started(
    cls: type[ScheduledEngine], settings: Settings, card: ModelCard, wid: str, role: WorkerRole
) -> ScheduledEngine:
    registry = load_plugins(only=[]).registry
    engine = cls(EngineContext(settings, card, wid, role=role, registry=registry))
    await engine.start()
    return engine


async def handoff(
    prefill: ScheduledEngine, decode: ScheduledEngine, request: EngineRequest
) -> tuple[list[int], dict[str, Any]]:
    """The frontend's two legs, by hand: returns all tokens and the prefill's params."""
    first = prefill_leg(request)
    outs = await collect(prefill, first)
    assert outs[-1].finish_reason is FinishReason.LENGTH
    params = outs[-1].kv_transfer_params
    assert params is not None and params["do_remote_prefill"]
    t0 = tokens_of(outs)
    second = decode_leg(request, t0, params)
    rest = await collect(decode, second)
    return t0 + tokens_of(rest), params


async def wait_unpinned(engine: ScheduledEngine, timeout: float = 5.0) -> None:
    agent = engine.kv_transfer_agent
    assert agent is not None
    for _ in range(int(timeout / 0.01)):
        if agent.pinned_blocks == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{agent.pinned_blocks} blocks still pinned")


@pytest.fixture
async def reference_pair(
    request: pytest.FixtureRequest, card: ModelCard
) -> AsyncIterator[tuple[ScheduledEngine, ScheduledEngine, ScheduledEngine]]:
    settings = settings_for(request.param)
    agg = await started(ReferenceEngine, settings, card, "agg", WorkerRole.AGGREGATED)
    pre = await started(ReferenceEngine, settings, card, "pre", WorkerRole.PREFILL)
    dec = await started(ReferenceEngine, settings, card, "dec", WorkerRole.DECODE)
    yield agg, pre, dec
    for engine in (agg, pre, dec):
        await engine.aclose()


@pytest.mark.parametrize("reference_pair", ["inprocess", "shm", "tcp"], indirect=True)
async def test_reference_handoff_equals_aggregated(
    reference_pair: tuple[ScheduledEngine, ScheduledEngine, ScheduledEngine],
) -> None:
    agg, pre, dec = reference_pair
    request = greedy("r1", PROMPT, N)
    expected = tokens_of(await collect(agg, request))
    got, params = await handoff(pre, dec, request)
    assert got == expected
    assert len(params["remote_block_ids"]) == 10
    agent = dec.kv_transfer_agent
    assert agent is not None
    transport = next(iter(agent.stats.bytes_by_transport))
    assert transport == agent.transports[0]
    # All 10 blocks moved, in as many runs as the source's ids make.
    assert agent.stats.bytes_by_transport[transport] == 10 * agent.layout.block_bytes
    await wait_unpinned(pre)
    assert pre.load().kv_blocks_used == 0 and dec.load().kv_blocks_used == 0
    # The pulled blocks are the decode worker's prefix cache now: a second request hits.
    again = await collect(dec, greedy("r2", PROMPT, N))
    assert again[0].cached_tokens == 9 * BS
    assert tokens_of(again) == expected


@pytest.mark.parametrize("reference_pair", ["inprocess"], indirect=True)
async def test_prefix_cached_on_either_side(
    reference_pair: tuple[ScheduledEngine, ScheduledEngine, ScheduledEngine],
) -> None:
    agg, pre, dec = reference_pair
    shared = PROMPT[:96]  # 6 full blocks
    long = [*shared, *[(11 * i) % 300 + 9 for i in range(70)]]
    expected = tokens_of(await collect(agg, greedy("a", long, N)))
    # The prefill side has the prefix cached; the decode side has part of it.
    await collect(pre, greedy("warm-p", [*shared, 1, 2, 3], 1))
    await collect(dec, greedy("warm-d", [*PROMPT[:48], 4, 5], 1))
    agent = dec.kv_transfer_agent
    assert agent is not None
    got, _ = await handoff(pre, dec, greedy("b", long, N))
    assert got == expected
    # 11 blocks in the prompt (166 tokens), 3 already on the decode worker: 8 pulled.
    assert sum(agent.stats.bytes_by_transport.values()) == 8 * agent.layout.block_bytes
    await wait_unpinned(pre)


@pytest.mark.parametrize("reference_pair", ["tcp"], indirect=True)
async def test_expired_export_falls_back_to_local_prefill(
    reference_pair: tuple[ScheduledEngine, ScheduledEngine, ScheduledEngine],
) -> None:
    agg, pre, dec = reference_pair
    request = greedy("x", PROMPT, N)
    expected = tokens_of(await collect(agg, request))
    first = prefill_leg(request)
    outs = await collect(pre, first)
    params = outs[-1].kv_transfer_params
    assert params is not None
    agent = pre.kv_transfer_agent
    assert agent is not None
    assert agent.pinned_blocks == 10
    agent.exports.release(params["transfer_id"], "test")  # as if it had expired
    assert agent.pinned_blocks == 0
    rest = await collect(
        dec,
        decode_leg(request, tokens_of(outs), params),
    )
    assert tokens_of(outs) + tokens_of(rest) == expected
    assert dec.local_fallbacks == 1
    assert dec.load().kv_blocks_used == 0


async def test_layout_mismatch_is_refused_and_falls_back(card: ModelCard) -> None:
    pre_settings = settings_for("inprocess")
    dec_settings = settings_for("inprocess", mocker={"kv_heads": 4})
    pre = await started(MockerEngine, pre_settings, card, "mp", WorkerRole.PREFILL)
    dec = await started(MockerEngine, dec_settings, card, "md", WorkerRole.DECODE)
    try:
        got, _ = await handoff(pre, dec, greedy("m", PROMPT, N))
        assert len(got) == N
        assert dec.local_fallbacks == 1
        agent = dec.kv_transfer_agent
        assert agent is not None and agent.stats.refused_pulls == 1
        await wait_unpinned(pre)  # the refusal released the export at once
    finally:
        await pre.aclose()
        await dec.aclose()


async def test_mocker_handoff_equals_aggregated(card: ModelCard) -> None:
    settings = settings_for(None, mocker={"speedup": 100.0})
    agg = await started(MockerEngine, settings, card, "ma", WorkerRole.AGGREGATED)
    pre = await started(MockerEngine, settings, card, "mp", WorkerRole.PREFILL)
    dec = await started(MockerEngine, settings, card, "md", WorkerRole.DECODE)
    try:
        request = greedy("m", PROMPT, N)
        expected = tokens_of(await collect(agg, request))
        got, _ = await handoff(pre, dec, request)
        assert got == expected
        agent = dec.kv_transfer_agent
        assert agent is not None
        # Simulated: the bytes of 10 blocks of the mocker's 70B-shaped KV, accounted.
        assert agent.stats.bytes_by_transport == {"inprocess": 10 * agent.layout.block_bytes}
        await wait_unpinned(pre)
    finally:
        for engine in (agg, pre, dec):
            await engine.aclose()


async def test_unpulled_export_is_freed_after_the_timeout(card: ModelCard) -> None:
    settings = load_settings(
        cache={"block_size": BS, "num_kv_blocks": 128},
        disagg={"kv_transport": "tcp", "kv_transfer_timeout_s": 0.3},
    )
    pre = await started(ReferenceEngine, settings, card, "pre", WorkerRole.PREFILL)
    try:
        outs = await collect(pre, prefill_leg(greedy("t", PROMPT, 1)))
        assert outs[-1].kv_transfer_params is not None
        agent = pre.kv_transfer_agent
        assert agent is not None
        assert agent.pinned_blocks == 10 and pre.load().kv_blocks_used == 10
        await wait_unpinned(pre, timeout=3.0)  # nobody pulled: the reaper frees them
        assert pre.load().kv_blocks_used == 0
        assert agent.stats.released == {"expired": 1}
        # The full blocks stay in its prefix cache: the same prompt hits.
        again = await collect(pre, greedy("t2", PROMPT, 1))
        assert again[0].cached_tokens == 9 * BS
    finally:
        await pre.aclose()


@pytest.mark.parametrize("reference_pair", ["tcp"], indirect=True)
async def test_prefill_worker_gone_before_the_pull(
    reference_pair: tuple[ScheduledEngine, ScheduledEngine, ScheduledEngine],
) -> None:
    agg, pre, dec = reference_pair
    request = greedy("g", PROMPT, N)
    expected = tokens_of(await collect(agg, request))
    first = prefill_leg(request)
    outs = await collect(pre, first)
    await pre.aclose()  # its listener is gone, as if the process died
    rest = await collect(
        dec,
        decode_leg(request, tokens_of(outs), outs[-1].kv_transfer_params),
    )
    assert tokens_of(outs) + tokens_of(rest) == expected
    agent = dec.kv_transfer_agent
    assert agent is not None and agent.stats.failed_pulls == 1 and dec.local_fallbacks == 1
    assert dec.load().kv_blocks_used == 0


@pytest.mark.parametrize("reference_pair", ["inprocess"], indirect=True)
async def test_abort_while_receiving_frees_blocks(
    reference_pair: tuple[ScheduledEngine, ScheduledEngine, ScheduledEngine],
) -> None:
    _, pre, dec = reference_pair
    request = greedy("ab", PROMPT, N)
    first = prefill_leg(request)
    outs = await collect(pre, first)
    second = decode_leg(request, tokens_of(outs), outs[-1].kv_transfer_params)
    stream = dec.generate(second)
    task = asyncio.create_task(anext(stream))
    await asyncio.sleep(0)  # admitted, its pull started
    await dec.abort("ab")
    out = await task
    assert out.finish_reason is FinishReason.ABORT
    await stream.aclose()
    for _ in range(100):
        if dec.load().kv_blocks_used == 0:
            break
        await asyncio.sleep(0.01)
    assert dec.load().kv_blocks_used == 0
    await wait_unpinned(pre)
