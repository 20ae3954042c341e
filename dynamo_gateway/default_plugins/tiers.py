"""Built-in cache tiers: `host` (RAM), `disk` (block files), `redis` (shared by every worker)."""

from __future__ import annotations

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.hookspecs import hookimpl
from dynamo_gateway.kvbm.tier import CacheTier, TierContext
from dynamo_gateway.registry import CacheTierRegister

GIB = 1 << 30


def _blocks(gb: float, block_bytes: int, what: str) -> int:
    n = int(gb * GIB) // block_bytes
    if n < 1:
        raise ConfigError(f"{what} of {gb} GiB holds no {block_bytes}-byte KV block")
    return n


def _host(context: TierContext) -> CacheTier:
    from dynamo_gateway.kvbm.tiers.host import HostTier

    gb = context.settings.kvbm.host_cache_gb
    return HostTier(context, _blocks(gb, context.block_bytes, "--kv-host-cache-gb"))


def _disk(context: TierContext) -> CacheTier:
    from dynamo_gateway.kvbm.record import HEADER
    from dynamo_gateway.kvbm.tiers.disk import DiskTier

    kvbm = context.settings.kvbm
    if kvbm.disk_cache_dir is None:
        raise ConfigError("the disk tier needs --kv-disk-cache-dir")
    size = context.block_bytes + HEADER.size
    return DiskTier(context, kvbm.disk_cache_dir, _blocks(kvbm.disk_cache_gb, size, "disk tier"))


def _redis(context: TierContext) -> CacheTier:
    from dynamo_gateway.kvbm.tiers.redis import RedisTier

    if not context.url:
        raise ConfigError("the redis tier needs --kv-remote-url redis://host:port")
    return RedisTier(context, context.url, ttl_s=context.settings.kvbm.remote_ttl_s)


@hookimpl
def dynamo_gateway_register_cache_tiers(register: CacheTierRegister) -> None:
    register("host", _host, description="host RAM (G2), LRU within --kv-host-cache-gb")
    register("disk", _disk, description="block files under --kv-disk-cache-dir (G3), checksummed")
    register("redis", _redis, description="a Redis server shared by every worker (G4)")
