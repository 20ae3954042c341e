"""The ``trtllm`` engine factory; TensorRT-LLM is imported here, only when an engine is built."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from dynamo_gateway.errors import ConfigError
from dynamo_gateway_trtllm import __version__

if TYPE_CHECKING:
    from dynamo_gateway.engines.base import Engine, EngineContext

INSTALL_HINT = "pip install 'dynamo-gateway-trtllm[engine]' on a machine with an NVIDIA GPU"


def import_tensorrt_llm() -> ModuleType:
    """Import TensorRT-LLM, or raise `ConfigError` saying how to install it."""
    try:
        return importlib.import_module("tensorrt_llm")
    except ModuleNotFoundError as exc:
        if exc.name not in ("tensorrt_llm", None):
            raise ConfigError(
                f"TensorRT-LLM is installed but cannot be imported ({exc}); reinstall it: "
                f"{INSTALL_HINT}"
            ) from exc
        raise ConfigError(
            f"the trtllm engine needs TensorRT-LLM, which needs an NVIDIA GPU: {INSTALL_HINT}"
        ) from None
    except ImportError as exc:
        raise ConfigError(
            f"TensorRT-LLM is installed but cannot be imported ({exc}); reinstall it: "
            f"{INSTALL_HINT}"
        ) from exc


def build_engine(context: EngineContext) -> Engine:
    """Build one worker's TensorRT-LLM engine (registered as ``trtllm``)."""
    import_tensorrt_llm()
    raise ConfigError(
        f"the trtllm engine integration is not implemented yet in dynamo-gateway-trtllm "
        f"{__version__}; serve with --engine mocker for now"
    )
