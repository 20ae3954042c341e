"""The ``sglang`` engine factory; SGLang is imported here, only when an engine is built."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from dynamo_gateway.plugins import import_optional

if TYPE_CHECKING:
    from dynamo_gateway.engines.base import Engine, EngineContext

INSTALL_HINT = "pip install 'dynamo-gateway-sglang[engine]' on a machine with an NVIDIA GPU"


def import_sglang() -> ModuleType:
    """Import sglang, or raise `ConfigError` saying how to install it.

    The module is typed as a plain `ModuleType`: everything reached through it
    (``sglang.Engine``, its tokenizer manager) is `Any` to mypy, so SGLang needs
    no stubs and no untyped import.
    """
    return import_optional(
        "sglang", needed_by="the sglang engine (NVIDIA GPU only)", hint=INSTALL_HINT
    )


def build_engine(context: EngineContext) -> Engine:
    """Build one worker's SGLang engine (registered as ``sglang``); SGLang loads in start().

    Raises `ConfigError` when SGLang is missing or ``[plugin_config.sglang]`` is wrong.
    """
    sglang = import_sglang()
    from dynamo_gateway_sglang.engine import SglangEngine

    return SglangEngine(context, sglang)
