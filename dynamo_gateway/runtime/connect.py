"""Turning ``--discovery`` / ``--events`` URLs into started backends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.runtime.discovery import Discovery
from dynamo_gateway.runtime.events import EventPlane

if TYPE_CHECKING:
    from dynamo_gateway.registry import Family, Registry
    from dynamo_gateway.settings import Settings


def url_scheme(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ConfigError(f"not a URL: {url!r} (want scheme://...)")
    return scheme


async def connect_discovery(registry: Registry, url: str, settings: Settings) -> Discovery:
    """The discovery backend `url` names, connected."""
    backend = cast(Discovery, _build(registry.discovery, url, settings))
    await backend.start()
    return backend


async def connect_events(registry: Registry, url: str, settings: Settings) -> EventPlane:
    """The event plane `url` names, connected."""
    backend = cast(EventPlane, _build(registry.event_planes, url, settings))
    await backend.start()
    return backend


def _build(family: Family[Any], url: str, settings: Settings) -> Any:
    return family.get(url_scheme(url))(url, settings)
