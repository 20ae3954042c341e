"""Built-in runtime backends for one process: `memory://` discovery and event plane."""

from __future__ import annotations

from typing import Any

from dynamo_gateway.hookspecs import hookimpl
from dynamo_gateway.registry import DiscoveryRegister, EventPlaneRegister
from dynamo_gateway.runtime.discovery import MemoryDiscovery
from dynamo_gateway.runtime.events import MemoryEventPlane


def _memory_discovery(url: str, settings: Any) -> MemoryDiscovery:
    return MemoryDiscovery()


def _memory_events(url: str, settings: Any) -> MemoryEventPlane:
    return MemoryEventPlane()


@hookimpl
def dynamo_gateway_register_discovery(register: DiscoveryRegister) -> None:
    register("memory", _memory_discovery, description="in-process discovery (embedded serve)")


@hookimpl
def dynamo_gateway_register_event_planes(register: EventPlaneRegister) -> None:
    register("memory", _memory_events, description="in-process event plane (embedded serve)")
