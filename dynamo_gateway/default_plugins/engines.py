"""Built-in engines: the simulated `mocker` (the reference engine lands with issue 2/8)."""

from __future__ import annotations

from dynamo_gateway.engines.base import Engine, EngineContext
from dynamo_gateway.hookspecs import hookimpl
from dynamo_gateway.registry import EngineRegister


def _mocker(context: EngineContext) -> Engine:
    from dynamo_gateway.engines.mocker import MockerEngine

    return MockerEngine(context)


@hookimpl
def dynamo_gateway_register_engines(register: EngineRegister) -> None:
    register(
        "mocker",
        _mocker,
        description="simulated engine: timing model, real block manager and KV events, no compute",
    )
