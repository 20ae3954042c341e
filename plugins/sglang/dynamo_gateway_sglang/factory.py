"""The ``sglang`` engine factory; SGLang is imported here, only when an engine is built."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.plugins import import_optional
from dynamo_gateway_sglang import __version__

if TYPE_CHECKING:
    from dynamo_gateway.engines.base import Engine, EngineContext

INSTALL_HINT = "pip install 'dynamo-gateway-sglang[engine]' on a machine with an NVIDIA GPU"


def import_sglang() -> ModuleType:
    """Import sglang, or raise `ConfigError` saying how to install it."""
    return import_optional(
        "sglang", needed_by="the sglang engine (NVIDIA GPU only)", hint=INSTALL_HINT
    )


def build_engine(context: EngineContext) -> Engine:
    """Build one worker's SGLang engine (registered as ``sglang``)."""
    import_sglang()
    raise ConfigError(
        f"the sglang engine integration is not implemented yet in dynamo-gateway-sglang "
        f"{__version__}; serve with --engine mocker for now"
    )
