"""The ``dynamo_gateway`` entry point: hook implementations only.

Importing this module must stay cheap: it never imports TensorRT-LLM (or
torch), so ``dynamo-gateway plugins`` can list it on any machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamo_gateway import hookimpl
from dynamo_gateway_trtllm.factory import build_engine

if TYPE_CHECKING:
    from dynamo_gateway.registry import EngineRegister


@hookimpl
def dynamo_gateway_register_engines(register: EngineRegister) -> None:
    register(
        "trtllm",
        build_engine,
        description="TensorRT-LLM LLM API engine (needs tensorrt-llm and an NVIDIA GPU)",
    )
