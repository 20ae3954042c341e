"""The ``dynamo_gateway`` entry point: hook implementations only.

Importing this module must stay cheap: it never imports NIXL (or torch), so
``dynamo-gateway plugins`` can list it on any machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynamo_gateway import hookimpl
from dynamo_gateway_nixl.factory import build_transport

if TYPE_CHECKING:
    from dynamo_gateway.registry import KvTransportRegister


@hookimpl
def dynamo_gateway_register_kv_transports(register: KvTransportRegister) -> None:
    register(
        "nixl",
        build_transport,
        description="NIXL KV-block transport over RDMA / NVLink (needs nixl)",
    )
