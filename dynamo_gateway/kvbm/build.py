"""Build a worker's `TieredCache` from ``[kvbm]`` settings and the registered tiers."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlparse

from dynamo_gateway.disagg.layout import KvLayout
from dynamo_gateway.errors import ConfigError
from dynamo_gateway.kvbm.manager import TieredCache
from dynamo_gateway.kvbm.policy import parse_offload_policy
from dynamo_gateway.kvbm.record import namespace_of
from dynamo_gateway.kvbm.tier import CacheTier, TierContext
from dynamo_gateway.registry import Registry
from dynamo_gateway.settings import Settings

__all__ = ["build_tiered_cache", "tier_names"]


def tier_names(settings: Settings) -> list[str]:
    """The tiers ``[kvbm]`` asks for, in lookup order: host, disk, then the remote
    store's URL scheme (a tier plugin registers under the scheme it serves)."""
    kvbm = settings.kvbm
    names = []
    if kvbm.host_cache_gb:
        names.append("host")
    if kvbm.disk_cache_dir is not None:
        names.append("disk")
    if kvbm.remote_url:
        scheme = urlparse(kvbm.remote_url).scheme
        if not scheme:
            raise ConfigError(f"--kv-remote-url {kvbm.remote_url!r} has no scheme (redis://...)")
        names.append(scheme)
    return names


def build_tiered_cache(
    settings: Settings,
    registry: Registry,
    *,
    worker_id: str,
    model: str,
    layout: KvLayout,
    notify: Callable[[], None] | None = None,
) -> TieredCache | None:
    """The worker's tiers (None when ``[kvbm]`` configures none)."""
    names = tier_names(settings)
    if not names:
        return None
    kvbm = settings.kvbm
    context = TierContext(
        settings=settings,
        worker_id=worker_id,
        model=model,
        layout=layout,
        namespace=namespace_of(model, layout),
        url=kvbm.remote_url,
    )
    tiers: list[CacheTier] = []
    try:
        for name in names:
            tiers.append(registry.cache_tiers.get(name)(context))
        if tiers[-1].shared is False and kvbm.remote_url:
            raise ConfigError(f"cache tier {names[-1]!r} is not a shared store")
        return TieredCache(
            tiers,
            parse_offload_policy(kvbm.offload_policy),
            block_size=layout.block_size,
            max_pending_writes=kvbm.max_pending_writes,
            notify=notify,
        )
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
