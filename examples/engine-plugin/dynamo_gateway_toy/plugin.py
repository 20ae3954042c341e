"""The entry point: hook implementations only, nothing heavy imported here."""

from __future__ import annotations

from dynamo_gateway import hookimpl
from dynamo_gateway.engines.base import Engine, EngineContext
from dynamo_gateway.registry import EngineRegister


def build_toy_engine(context: EngineContext) -> Engine:
    """The factory: called once per worker, when the worker starts."""
    # A real plugin imports its engine library here (dynamo_gateway.plugins.import_optional),
    # so that listing plugins never loads it.
    from dynamo_gateway_toy.engine import ToyEngine

    return ToyEngine(context)


@hookimpl
def dynamo_gateway_register_engines(register: EngineRegister) -> None:
    register("toy", build_toy_engine, description="deterministic toy engine (example plugin)")
