"""The ``trtllm`` engine factory; TensorRT-LLM is imported here, only when an engine is built."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.plugins import import_optional
from dynamo_gateway_trtllm import __version__

if TYPE_CHECKING:
    from dynamo_gateway.engines.base import Engine, EngineContext

INSTALL_HINT = "pip install 'dynamo-gateway-trtllm[engine]' on a machine with an NVIDIA GPU"


def import_tensorrt_llm() -> ModuleType:
    """Import tensorrt_llm, or raise `ConfigError` saying how to install it."""
    return import_optional(
        "tensorrt_llm", needed_by="the trtllm engine (NVIDIA GPU only)", hint=INSTALL_HINT
    )


def build_engine(context: EngineContext) -> Engine:
    """Build one worker's TensorRT-LLM engine (registered as ``trtllm``)."""
    import_tensorrt_llm()
    raise ConfigError(
        f"the trtllm engine integration is not implemented yet in dynamo-gateway-trtllm "
        f"{__version__}; serve with --engine mocker for now"
    )
