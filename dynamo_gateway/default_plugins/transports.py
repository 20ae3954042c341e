"""Built-in KV transports: `inprocess` (one process), `shm` (one host), `tcp` (any host)."""

from __future__ import annotations

from dynamo_gateway.disagg.transport import KvTransport, TransportContext
from dynamo_gateway.hookspecs import hookimpl
from dynamo_gateway.registry import KvTransportRegister


def _inprocess(context: TransportContext) -> KvTransport:
    from dynamo_gateway.disagg.transports.inprocess import InprocessTransport

    return InprocessTransport(context)


def _shm(context: TransportContext) -> KvTransport:
    from dynamo_gateway.disagg.transports.shm import ShmTransport

    return ShmTransport(context)


def _tcp(context: TransportContext) -> KvTransport:
    from dynamo_gateway.disagg.transports.tcp import TcpTransport

    return TcpTransport(context)


@hookimpl
def dynamo_gateway_register_kv_transports(register: KvTransportRegister) -> None:
    register("inprocess", _inprocess, description="workers in one process: a direct copy")
    register("shm", _shm, description="one host: the KV pool in shared memory, one-sided reads")
    register("tcp", _tcp, description="any host: a listener per worker, reads into the pool")
