"""TrtllmEngine's wiring, on a stand-in ``tensorrt_llm`` module.

The stand-in has the real names the engine touches (``LLM``, ``SamplingParams``,
``llmapi.KvCacheConfig``, ``llmapi.CacheTransceiverConfig``,
``disaggregated_params.DisaggregatedParams``; ``LLM.generate_async`` returning a
``RequestOutput`` that streams cumulative outputs and has ``abort()``;
``get_kv_cache_events_async`` / ``get_stats_async`` returning async iterables of
dicts). The real thing is checked by ``plugins/trtllm/gpu_check.py``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from dynamo_gateway_trtllm.engine import TrtllmEngine
from dynamo_gateway_trtllm.settings import TrtllmSettings
from trtllm_recorded import (
    ITERATION_STATS,
    CompletionOutput,
    DisaggregatedParams,
    RequestOutput,
    stored,
)

from dynamo_gateway.disagg.params import decode_leg, prefill_leg
from dynamo_gateway.engines.base import Engine, EngineContext, EngineState
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.protocol.engine import (
    EngineRequest,
    FinishReason,
    SamplingParams,
    WorkerRole,
)
from dynamo_gateway.protocol.kv_events import KvEvent
from dynamo_gateway.settings import load_settings


class _Kwargs:
    def __init__(self, **kw: Any) -> None:
        self.kw = kw


class FakeResult:
    """A streaming RequestOutput: one new token per step, then finish."""

    def __init__(self, prompt: list[int], sp: _Kwargs, disagg: Any) -> None:
        self.prompt = prompt
        self.sp = sp.kw
        self.disagg = disagg
        self.aborted = False
        self.out = CompletionOutput()
        self.ro = RequestOutput(request_id=1, outputs=[self.out], cached_tokens=2)

    def abort(self) -> None:
        self.aborted = True

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        n = self.sp["max_tokens"]
        gen_only = self.disagg is not None and self.disagg.request_type == "generation_only"
        if gen_only:
            self.out.token_ids.extend(self.disagg.first_gen_tokens)
        while True:
            await asyncio.sleep(0)
            if self.aborted:
                self.out.finish_reason = "cancelled"
                yield self.ro
                return
            self.out.token_ids.append(100 + len(self.out.token_ids))
            if len(self.out.token_ids) >= n:
                ctx = self.disagg is not None and self.disagg.request_type == "context_only"
                self.out.finish_reason = "not_finished" if ctx else "length"
                if ctx:
                    self.out.disaggregated_params = DisaggregatedParams(
                        request_type="context_only",
                        first_gen_tokens=list(self.out.token_ids),
                        ctx_request_id=77,
                        opaque_state=b"\x01",
                    )
            yield self.ro
            if self.out.finish_reason:
                return


class _Once:
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def mark_undone(self) -> None:
        pass

    async def __aiter__(self) -> AsyncIterator[Any]:
        items, self.items = self.items, []
        for item in items:
            yield item


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(self, **kw: Any) -> None:
        self.kw = kw
        self.results: list[FakeResult] = []
        self.events = _Once([stored(0, None, [(111, [1, 2, 3, 4])])])
        self.stats = _Once([ITERATION_STATS])
        self.shut = False
        FakeLLM.instances.append(self)

    def generate_async(
        self,
        inputs: list[int],
        sampling_params: _Kwargs,
        streaming: bool,
        disaggregated_params: Any,
    ) -> FakeResult:
        assert streaming
        result = FakeResult(inputs, sampling_params, disaggregated_params)
        self.results.append(result)
        return result

    def get_kv_cache_events_async(self, timeout: float) -> _Once:
        return self.events

    def get_stats_async(self, timeout: float) -> _Once:
        return self.stats

    def shutdown(self) -> None:
        self.shut = True


@pytest.fixture
def fake_trtllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    root = ModuleType("tensorrt_llm")
    root.LLM = FakeLLM  # type: ignore[attr-defined]
    root.SamplingParams = _Kwargs  # type: ignore[attr-defined]
    llmapi = ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = _Kwargs  # type: ignore[attr-defined]
    llmapi.CacheTransceiverConfig = _Kwargs  # type: ignore[attr-defined]
    dp = ModuleType("tensorrt_llm.disaggregated_params")
    dp.DisaggregatedParams = DisaggregatedParams  # type: ignore[attr-defined]
    for mod in (root, llmapi, dp):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    FakeLLM.instances.clear()
    yield root


def _engine(
    trt: ModuleType, tmp_path: Path, role: WorkerRole = WorkerRole.AGGREGATED
) -> tuple[TrtllmEngine, list[KvEvent]]:
    card = ModelCard(
        path=tmp_path, served_name="m", max_model_len=128, vocab_size=1000, eos_token_ids=(2,)
    )
    events: list[KvEvent] = []
    ctx = EngineContext(
        settings=load_settings(cache={"block_size": 4}),
        model=card,
        worker_id="w0",
        role=role,
        publish_kv_event=events.append,
    )
    return TrtllmEngine(ctx, trt, TrtllmSettings(poll_timeout_s=0.01)), events


def _req(max_tokens: int = 3, **kw: Any) -> EngineRequest:
    return EngineRequest(
        request_id="r1",
        prompt_token_ids=[1, 2, 3, 4, 5],
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        **kw,
    )


async def test_generate_streams_deltas_and_publishes(
    fake_trtllm: ModuleType, tmp_path: Path
) -> None:
    engine, events = _engine(fake_trtllm, tmp_path)
    assert isinstance(engine, Engine) and engine.state is EngineState.CREATED
    async with engine:
        llm = FakeLLM.instances[0]
        assert llm.kw["kv_cache_config"].kw["tokens_per_block"] == 4
        assert llm.kw["kv_cache_config"].kw["event_buffer_max_size"] == 1024
        assert llm.kw["enable_iter_perf_stats"] is True
        outs = [o async for o in engine.generate(_req())]
        assert [o.token_ids for o in outs] == [[100], [101], [102]]
        assert outs[0].cached_tokens == 2 and outs[1].cached_tokens is None
        assert outs[-1].finish_reason is FinishReason.LENGTH
        assert llm.results[0].sp["top_k"] == 1 and llm.results[0].sp["end_id"] == 2
        for _ in range(50):
            if events and engine.load().kv_blocks_total:
                break
            await asyncio.sleep(0.01)
        assert events and events[0].worker_id == "w0"
        assert engine.load().kv_blocks_used == 600
        await engine.check_health()
    assert engine.state is EngineState.STOPPED and llm.shut


async def test_abort_and_early_close(fake_trtllm: ModuleType, tmp_path: Path) -> None:
    engine, _ = _engine(fake_trtllm, tmp_path)
    async with engine:
        stream = engine.generate(_req(max_tokens=100))
        first = await stream.__anext__()
        assert first.token_ids == [100]
        await engine.abort("r1")
        rest = [o async for o in stream]
        assert rest[-1].finish_reason is FinishReason.ABORT
        await engine.abort("unknown")  # ignored
        stream = engine.generate(_req(max_tokens=100))
        await stream.__anext__()
        await stream.aclose()  # type: ignore[attr-defined]
        assert FakeLLM.instances[0].results[-1].aborted


async def test_disaggregated_legs(fake_trtllm: ModuleType, tmp_path: Path) -> None:
    request = _req(max_tokens=4)
    prefill, _ = _engine(fake_trtllm, tmp_path, WorkerRole.PREFILL)
    decode, _ = _engine(fake_trtllm, tmp_path, WorkerRole.DECODE)
    async with prefill, decode:
        assert FakeLLM.instances[0].kw["cache_transceiver_config"].kw == {"backend": "DEFAULT"}
        ctx_outs = [o async for o in prefill.generate(prefill_leg(request))]
        last = ctx_outs[-1]
        assert last.finish_reason is FinishReason.LENGTH and last.token_ids == [100]
        params = last.kv_transfer_params
        assert params is not None and params["trtllm"]["ctx_request_id"] == 77
        gen_outs = [o async for o in decode.generate(decode_leg(request, [100], params))]
        gen = FakeLLM.instances[1].results[0]
        assert gen.prompt == [1, 2, 3, 4, 5] and gen.sp["max_tokens"] == 4
        assert gen.disagg.opaque_state == b"\x01"
        assert [t for o in gen_outs for t in o.token_ids] == [101, 102, 103]


async def test_not_running_refuses(fake_trtllm: ModuleType, tmp_path: Path) -> None:
    engine, _ = _engine(fake_trtllm, tmp_path)
    from dynamo_gateway.errors import EngineError

    with pytest.raises(EngineError):
        await engine.check_health()
    with pytest.raises(EngineError):
        await engine.generate(_req()).__anext__()
    await engine.aclose()
    assert engine.state is EngineState.STOPPED
