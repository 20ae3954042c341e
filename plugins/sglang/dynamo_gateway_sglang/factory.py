"""The ``sglang`` engine factory; SGLang is imported here, only when an engine is built."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from dynamo_gateway.errors import ConfigError
from dynamo_gateway_sglang import __version__

if TYPE_CHECKING:
    from dynamo_gateway.engines.base import Engine, EngineContext

INSTALL_HINT = "pip install 'dynamo-gateway-sglang[engine]' on a machine with an NVIDIA GPU"


def import_sglang() -> ModuleType:
    """Import SGLang, or raise `ConfigError` saying how to install it."""
    try:
        return importlib.import_module("sglang")
    except ModuleNotFoundError as exc:
        if exc.name not in ("sglang", None):
            raise ConfigError(
                f"SGLang is installed but cannot be imported ({exc}); reinstall it: {INSTALL_HINT}"
            ) from exc
        raise ConfigError(
            f"the sglang engine needs SGLang, which needs an NVIDIA GPU: {INSTALL_HINT}"
        ) from None
    except ImportError as exc:
        raise ConfigError(
            f"SGLang is installed but cannot be imported ({exc}); reinstall it: {INSTALL_HINT}"
        ) from exc


def build_engine(context: EngineContext) -> Engine:
    """Build one worker's SGLang engine (registered as ``sglang``)."""
    import_sglang()
    raise ConfigError(
        f"the sglang engine integration is not implemented yet in dynamo-gateway-sglang "
        f"{__version__}; serve with --engine mocker for now"
    )
