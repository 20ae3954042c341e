"""The ``dynamo_gateway`` entry point: hook implementations only.

Importing this module must stay cheap: it never imports vLLM (or torch), so
``dynamo-gateway plugins`` can list it on any machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamo_gateway import hookimpl
from dynamo_gateway_vllm.factory import build_engine

if TYPE_CHECKING:
    from dynamo_gateway.registry import EngineRegister


@hookimpl
def dynamo_gateway_register_engines(register: EngineRegister) -> None:
    register("vllm", build_engine, description="vLLM AsyncLLM engine (needs vllm)")
