"""The ``trtllm`` engine factory; TensorRT-LLM is imported here, only when an engine is built."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dynamo_gateway.plugins import import_optional

if TYPE_CHECKING:
    from dynamo_gateway.engines.base import Engine, EngineContext

INSTALL_HINT = "pip install 'dynamo-gateway-trtllm[engine]' on a machine with an NVIDIA GPU"


def import_tensorrt_llm() -> Any:
    """Import tensorrt_llm, or raise `ConfigError` saying how to install it.

    Typed `Any` on purpose: TensorRT-LLM ships no type information we could check
    against, and mypy never follows it (the CI machines cannot install it).
    """
    module: Any = import_optional(
        "tensorrt_llm", needed_by="the trtllm engine (NVIDIA GPU only)", hint=INSTALL_HINT
    )
    return module


def build_engine(context: EngineContext) -> Engine:
    """Build one worker's TensorRT-LLM engine (registered as ``trtllm``).

    Cheap: settings are validated and the library imported; the model is loaded
    by ``start()``.
    """
    from dynamo_gateway_trtllm.engine import TrtllmEngine
    from dynamo_gateway_trtllm.settings import trtllm_settings

    opts = trtllm_settings(context.settings)
    return TrtllmEngine(context, import_tensorrt_llm(), opts)
