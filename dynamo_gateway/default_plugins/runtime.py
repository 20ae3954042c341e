"""Built-in runtime backends: `memory://` discovery and event plane for one process,
`file://` and `etcd://` discovery for several."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dynamo_gateway.hookspecs import hookimpl
from dynamo_gateway.registry import DiscoveryRegister, EventPlaneRegister
from dynamo_gateway.runtime.discovery import MemoryDiscovery
from dynamo_gateway.runtime.events import EventPlane, MemoryEventPlane

if TYPE_CHECKING:
    from dynamo_gateway.runtime.etcd_discovery import EtcdDiscovery
    from dynamo_gateway.runtime.file_discovery import FileDiscovery


def _memory_discovery(url: str, settings: Any) -> MemoryDiscovery:
    return MemoryDiscovery()


def _file_discovery(url: str, settings: Any) -> FileDiscovery:
    from dynamo_gateway.runtime.file_discovery import FileDiscovery

    return FileDiscovery.from_url(url, settings.runtime.lease_ttl_s)


def _etcd_discovery(url: str, settings: Any) -> EtcdDiscovery:
    # The module imports aetcd (grpc) only when the backend starts.
    from dynamo_gateway.runtime.etcd_discovery import EtcdDiscovery

    return EtcdDiscovery.from_url(url, settings.runtime.lease_ttl_s)


def _memory_events(url: str, settings: Any) -> MemoryEventPlane:
    return MemoryEventPlane()


# Event planes across processes; their modules import pyzmq / nats-py, so lazily.


def _zmq_events(url: str, settings: Any) -> EventPlane:
    from dynamo_gateway.runtime.zmq_events import ZmqEventPlane

    return ZmqEventPlane.from_url(url)


def _nats_events(url: str, settings: Any) -> EventPlane:
    from dynamo_gateway.runtime.nats_events import NatsEventPlane

    return NatsEventPlane.from_url(url)


@hookimpl
def dynamo_gateway_register_discovery(register: DiscoveryRegister) -> None:
    register("memory", _memory_discovery, description="in-process discovery (embedded serve)")
    register(
        "file",
        _file_discovery,
        description="file:///abs/dir: one JSON file per worker, mtime heartbeats (one host)",
    )
    register(
        "etcd",
        _etcd_discovery,
        description="etcd://host:port[/namespace]: etcd v3 keys under a lease (many hosts)",
    )


@hookimpl
def dynamo_gateway_register_event_planes(register: EventPlaneRegister) -> None:
    register("memory", _memory_events, description="in-process event plane (embedded serve)")
    register(
        "zmq",
        _zmq_events,
        description="zmq:///abs/dir: ipc PUB/SUB sockets in a directory, no server (one host)",
    )
    register(
        "nats",
        _nats_events,
        description="nats://host:port[/namespace]: core NATS subjects (many hosts)",
    )
