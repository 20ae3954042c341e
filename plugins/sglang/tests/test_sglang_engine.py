"""`SglangEngine`'s wiring, against a stand-in for `sglang.Engine` that streams the
recorded output shapes (`sglang_recorded.py`). The real engine is the GPU check's job."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest
import sglang_recorded as recorded
from dynamo_gateway_sglang.engine import SglangEngine

from dynamo_gateway.disagg.params import decode_leg, prefill_leg
from dynamo_gateway.engines.base import EngineContext, EngineState
from dynamo_gateway.errors import ConfigError
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.protocol.engine import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    SamplingParams,
    WorkerRole,
)
from dynamo_gateway.settings import load_settings

LoadSnapshot = msgspec.defstruct("LoadSnapshot", [(k, Any) for k in recorded.LOAD_SNAPSHOT])


class _Reader:
    def read_all(self) -> list[Any]:
        return [LoadSnapshot(**recorded.LOAD_SNAPSHOT)]


class _TokenizerManager:
    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.load_snapshot_reader = _Reader()
        self.abort_events: dict[str, asyncio.Event] = {}

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.aborted.append(rid)
        if rid in self.abort_events:
            self.abort_events[rid].set()


class _ServerArgs:
    def __init__(self, resolved: dict[str, Any]) -> None:
        self._resolved = resolved

    def resolved_dict(self) -> dict[str, Any]:
        return self._resolved


class _FakeEngine:
    """`sglang.Engine(**kwargs)`: rids starting with "hang" wait for an abort."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[dict[str, Any]] = []
        self.tokenizer_manager = _TokenizerManager()
        self.server_args = _ServerArgs(
            {
                **recorded.RESOLVED,
                "page_size": kwargs["page_size"],
                "disaggregation_mode": kwargs["disaggregation_mode"],
            }
        )
        self.shut_down = False
        FAKES.append(self)

    async def async_generate(self, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(kwargs)
        return self._stream(kwargs["rid"])

    async def _stream(self, rid: str) -> AsyncIterator[dict[str, Any]]:
        if rid.startswith("hang"):
            event = self.tokenizer_manager.abort_events.setdefault(rid, asyncio.Event())
            yield recorded.CUMULATIVE[0]
            await event.wait()
            yield {**recorded.ABORT_ECHO_CUMULATIVE, "output_ids": recorded.IDS[:1]}
            return
        for out in recorded.CUMULATIVE:
            yield out

    def get_all_child_pids(self) -> list[int]:
        return [os.getpid()]

    def shutdown(self) -> None:
        self.shut_down = True


FAKES: list[_FakeEngine] = []


@pytest.fixture
def fake_sglang() -> Iterator[ModuleType]:
    module = ModuleType("sglang")
    module.Engine = _FakeEngine  # type: ignore[attr-defined]
    module.__version__ = "0.5.23"  # type: ignore[attr-defined]
    FAKES.clear()
    yield module
    FAKES.clear()


def _engine(
    tmp_path: Path, sglang: ModuleType, role: WorkerRole = WorkerRole.AGGREGATED
) -> SglangEngine:
    card = ModelCard(
        path=tmp_path, served_name="m", max_model_len=128, vocab_size=1000, eos_token_ids=(2,)
    )
    context = EngineContext(settings=load_settings(), model=card, worker_id="w0", role=role)
    return SglangEngine(context, sglang)


def _request(rid: str = "req-1", **sampling: Any) -> EngineRequest:
    return EngineRequest(
        request_id=rid,
        prompt_token_ids=[5, 6, 7, 8, 9, 10],
        sampling=SamplingParams(max_tokens=8, temperature=0.0, **sampling),
    )


async def _collect(engine: SglangEngine, request: EngineRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(request)]


async def test_generate_streams_deltas(tmp_path: Path, fake_sglang: ModuleType) -> None:
    async with _engine(tmp_path, fake_sglang) as engine:
        assert engine.state is EngineState.RUNNING and engine.block_size == 16
        outs = await _collect(engine, _request(logprobs=2))
        fake = FAKES[0]
        assert fake.kwargs["skip_tokenizer_init"] is True
        assert fake.kwargs["model_path"] == str(tmp_path)
        assert fake.kwargs["context_length"] == 128
        call = fake.calls[0]
        assert call["input_ids"] == [5, 6, 7, 8, 9, 10] and call["stream"] is True
        assert call["return_logprob"] is True and call["top_logprobs_num"] == 2
        assert call["sampling_params"]["max_new_tokens"] == 8
        assert "bootstrap_room" not in call
    assert [t for o in outs for t in o.token_ids] == recorded.IDS
    assert outs[0].cached_tokens == 4 and outs[-1].finish_reason is FinishReason.STOP
    assert fake.shut_down and engine.state is EngineState.STOPPED


async def test_abort_ends_the_stream(tmp_path: Path, fake_sglang: ModuleType) -> None:
    async with _engine(tmp_path, fake_sglang) as engine:
        stream = engine.generate(_request("hang-1"))
        first = await stream.__anext__()
        assert first.token_ids == recorded.IDS[:1]
        await engine.abort("hang-1")
        last = await stream.__anext__()
        assert last.finish_reason is FinishReason.ABORT and last.token_ids == []
        await engine.abort("unknown")  # ignored
        assert FAKES[0].tokenizer_manager.aborted == ["hang-1"]


async def test_leaving_early_aborts(tmp_path: Path, fake_sglang: ModuleType) -> None:
    async with _engine(tmp_path, fake_sglang) as engine:
        stream = engine.generate(_request("hang-2"))
        await stream.__anext__()
        await stream.aclose()  # type: ignore[attr-defined]
        assert FAKES[0].tokenizer_manager.aborted == ["hang-2"]


async def test_load_and_health(tmp_path: Path, fake_sglang: ModuleType) -> None:
    async with _engine(tmp_path, fake_sglang) as engine:
        await engine.check_health()
        load = engine.load()
        assert (load.active_requests, load.waiting_requests) == (3, 2)
        assert (load.kv_blocks_used, load.kv_blocks_total) == (63, 10000)


async def test_one_engine_per_process(tmp_path: Path, fake_sglang: ModuleType) -> None:
    async with _engine(tmp_path, fake_sglang):
        second = _engine(tmp_path, fake_sglang)
        with pytest.raises(ConfigError, match="one per process"):
            await second.start()
    # The first one gave the process back.
    async with _engine(tmp_path, fake_sglang) as third:
        assert third.state is EngineState.RUNNING


async def test_prefill_leg_hands_over_a_room(tmp_path: Path, fake_sglang: ModuleType) -> None:
    request = _request()
    async with _engine(tmp_path, fake_sglang, WorkerRole.PREFILL) as engine:
        outs = await _collect(engine, prefill_leg(request))
        assert len(outs) == 1 and outs[0].token_ids == []
        assert outs[0].finish_reason is FinishReason.LENGTH
        params = outs[0].kv_transfer_params
        assert params is not None
        assert params["bootstrap_host"] == "127.0.0.1" and params["bootstrap_port"] == 8998
        await asyncio.sleep(0.01)  # the detached prefill runs on
        call = FAKES[0].calls[0]
        assert FAKES[0].kwargs["disaggregation_mode"] == "prefill"
        assert call["bootstrap_room"] == params["bootstrap_room"]
        assert call["bootstrap_host"] == "127.0.0.1" and call["bootstrap_port"] == 8998
    async with _engine(tmp_path, fake_sglang, WorkerRole.DECODE) as decode:
        outs = await _collect(decode, decode_leg(request, [], params))
        assert [t for o in outs for t in o.token_ids] == recorded.IDS
        call = FAKES[1].calls[0]
        assert call["bootstrap_room"] == params["bootstrap_room"]
        assert call["input_ids"] == request.prompt_token_ids


async def test_decode_worker_cannot_prefill(tmp_path: Path, fake_sglang: ModuleType) -> None:
    async with _engine(tmp_path, fake_sglang, WorkerRole.DECODE) as engine:
        (out,) = await _collect(engine, _request())
        assert out.finish_reason is FinishReason.ERROR
        assert out.error is not None and "prefill handoff" in out.error
        bad = decode_leg(_request(), [], {"bootstrap_room": 1, "bootstrap_port": 8998})
        (out,) = await _collect(engine, bad)
        assert out.error is not None and "bootstrap_host" in out.error
        assert FAKES[0].calls == []
