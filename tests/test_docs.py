"""docs/plugins.md stays true: every hook is documented, and its examples run."""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dynamo_gateway import hookspecs
from dynamo_gateway.engines.base import Engine, EngineContext, EngineState
from dynamo_gateway.errors import EngineError
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.protocol.engine import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    SamplingParams,
)
from dynamo_gateway.router.base import Router, RouterContext, RouteRequest, WorkerView
from dynamo_gateway.settings import load_settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _hookspecs() -> dict[str, Callable[..., Any]]:
    return {
        name: func
        for name, func in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("dynamo_gateway_") and hasattr(func, "dynamo_gateway_spec")
    }


def _render_signature(name: str, func: Callable[..., Any]) -> str:
    """`def name(params) -> ret` with annotations as written in the source.

    hookspecs.py uses `from __future__ import annotations`, so every annotation
    is the source text itself and `inspect.signature` would quote it.
    """
    sig = inspect.signature(func)
    params = []
    for p in sig.parameters.values():
        text = p.name
        if p.annotation is not inspect.Parameter.empty:
            text += f": {p.annotation}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {p.default!r}"
        params.append(text)
    ret = "" if sig.return_annotation is inspect.Signature.empty else f" -> {sig.return_annotation}"
    return f"def {name}({', '.join(params)}){ret}"


def _example(doc: str, marker: str) -> str:
    match = re.search(
        rf"<!-- example: {re.escape(marker)} -->\s*```python\n(.*?)\n```", doc, re.DOTALL
    )
    assert match, f"docs/plugins.md has no python block after <!-- example: {marker} -->"
    return match.group(1)


def _exec_example(doc: str, marker: str) -> ModuleType:
    module = ModuleType(f"docs_example_{marker.replace('-', '_')}")
    module.__file__ = f"{DOC}#{marker}"
    exec(compile(_example(doc, marker), module.__file__, "exec"), module.__dict__)
    return module


# (a) the hook reference


def test_hookspecs_are_found() -> None:
    specs = _hookspecs()
    assert "dynamo_gateway_register_engines" in specs
    assert len(specs) >= 7


@pytest.mark.parametrize("name", sorted(_hookspecs()))
def test_every_hook_is_documented_with_its_signature(doc: str, name: str) -> None:
    signature = _render_signature(name, _hookspecs()[name])
    assert signature.endswith(") -> None")
    assert signature in doc, f"docs/plugins.md lacks the signature line {signature!r}"
    assert f"### {name}\n" in doc, f"docs/plugins.md has no section for {name}"


def test_signature_rendering_matches_the_source() -> None:
    for name, func in _hookspecs().items():
        source = inspect.getsource(func)
        assert f"{_render_signature(name, func)}:" in source


def test_doc_names_no_hook_that_does_not_exist(doc: str) -> None:
    mentioned = set(re.findall(r"\bdynamo_gateway_register_\w+", doc))
    assert mentioned <= set(_hookspecs()), mentioned - set(_hookspecs())


# (b) the examples run


@pytest.fixture
def echo_factory(doc: str) -> Callable[[EngineContext], Engine]:
    plugins = load_plugins(
        extra=[(_exec_example(doc, "echo-engine"), "echo-example")], entry_points=False
    )
    registration = plugins.registry.engines.registration("echo")
    assert registration.plugin == "echo-example"
    assert registration.description
    return registration.factory


@pytest.fixture
def context(tmp_path: Path) -> EngineContext:
    card = ModelCard(
        path=tmp_path, served_name="echo", max_model_len=128, vocab_size=100, eos_token_ids=()
    )
    return EngineContext(settings=load_settings(), model=card, worker_id="w0")


def _request(request_id: str, prompt: list[int], max_tokens: int) -> EngineRequest:
    return EngineRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens),
    )


async def _collect(engine: Engine, request: EngineRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(request)]


async def test_echo_example_generates(
    echo_factory: Callable[[EngineContext], Engine], context: EngineContext
) -> None:
    engine = echo_factory(context)
    assert isinstance(engine, Engine)
    states = [engine.state]
    await engine.start()
    states.append(engine.state)
    try:
        assert states == [EngineState.CREATED, EngineState.RUNNING]
        assert engine.block_size > 0
        await engine.check_health()

        outs = await _collect(engine, _request("r1", [11, 12, 13, 14], max_tokens=3))
        assert [t for o in outs for t in o.token_ids] == [11, 12, 13]
        assert outs[0].cached_tokens == 0
        assert [o.finish_reason for o in outs] == [None, None, FinishReason.LENGTH]

        outs = await _collect(engine, _request("r2", [7, 8], max_tokens=16))
        assert [t for o in outs for t in o.token_ids] == [7, 8]
        assert outs[-1].finish_reason is FinishReason.STOP
        assert engine.load().active_requests == 0
    finally:
        await engine.aclose()
    assert engine.state is EngineState.STOPPED
    await engine.aclose()  # idempotent
    with pytest.raises(EngineError):
        await engine.check_health()


async def test_echo_example_abort_and_early_close(
    echo_factory: Callable[[EngineContext], Engine], context: EngineContext
) -> None:
    engine = echo_factory(context)
    await engine.start()
    try:
        stream = engine.generate(_request("r1", list(range(50)), max_tokens=50))
        first = await anext(stream)
        assert first.token_ids == [0]
        assert engine.load().active_requests == 1
        await engine.abort("r1")
        await engine.abort("r1")  # idempotent
        await engine.abort("unknown")  # ignored
        rest = [out async for out in stream]
        assert rest[-1].finish_reason is FinishReason.ABORT
        assert engine.load().active_requests == 0

        stream = engine.generate(_request("r2", list(range(50)), max_tokens=50))
        await anext(stream)
        assert isinstance(stream, AsyncGenerator)
        await stream.aclose()  # the consumer went away
        assert engine.load().active_requests == 0
    finally:
        await engine.aclose()


def test_router_example_selects(doc: str) -> None:
    module = _exec_example(doc, "shortest-queue-router")
    plugins = load_plugins(extra=[(module, "router-example")], entry_points=False)
    registration = plugins.registry.routers.registration("shortest_queue")
    assert registration.plugin == "router-example"
    router = registration.factory(RouterContext(load_settings(), "m", 16))
    assert isinstance(router, Router)
    workers = [WorkerView("a", inflight=3), WorkerView("b", inflight=1), WorkerView("c")]
    request = RouteRequest(request_id="r1", token_ids=[1, 2, 3])
    assert router.select(request, workers).worker_id == "c"
    router.on_routed(request, workers[2])
    router.on_finished("r1")


# (c) every family is covered


@pytest.mark.parametrize(
    "family",
    [
        "engines",
        "routers",
        "KV transports",
        "cache tiers",
        "discovery",
        "event plane",
        "planner connectors",
        "planner policies",
    ],
)
def test_doc_mentions_every_family(doc: str, family: str) -> None:
    assert family in doc
