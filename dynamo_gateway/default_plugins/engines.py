"""Built-in engines: the simulated `mocker` and the torch `reference` engine."""

from __future__ import annotations

from dynamo_gateway.engines.base import Engine, EngineContext
from dynamo_gateway.hookspecs import hookimpl
from dynamo_gateway.registry import EngineRegister


def _mocker(context: EngineContext) -> Engine:
    from dynamo_gateway.engines.mocker import MockerEngine

    return MockerEngine(context)


def _reference(context: EngineContext) -> Engine:
    # Imported on use: it pulls in torch, which the mocker and the frontend don't need.
    from dynamo_gateway.engines.reference.engine import ReferenceEngine

    return ReferenceEngine(context)


@hookimpl
def dynamo_gateway_register_engines(register: EngineRegister) -> None:
    register(
        "mocker",
        _mocker,
        description="simulated engine: timing model, real block manager and KV events, no compute",
    )
    register(
        "reference",
        _reference,
        description=(
            "torch reference engine: Llama/Qwen2/Mistral, paged KV cache, continuous batching, "
            "prefix caching"
        ),
    )
