"""What a KV cache tier plugin implements (`dynamo_gateway_register_cache_tiers`).

A tier stores whole blocks by sequence hash. The `TieredCache` calls it from
its own I/O threads, never from the event loop, possibly from two threads at
once (one offloading, one onboarding), so a tier guards its own state. Payloads
are a block's bytes exactly as the device cache holds them (`KvLayout`); a tier
that can tear or rot (disk, a remote store) frames them with
`dynamo_gateway.kvbm.record` and answers ``get`` with None rather than a block
it cannot vouch for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from dynamo_gateway.disagg.layout import KvLayout
from dynamo_gateway.settings import Settings

__all__ = [
    "CacheTier",
    "CacheTierFactory",
    "Evicted",
    "TierContext",
    "TierError",
    "TierStats",
]


# A block a tier let go to make room: its hash and, if asked for and still readable, its bytes.
Evicted = tuple[int, memoryview | None]


class TierError(RuntimeError):
    """A tier cannot serve now (a remote store is down): the caller goes on without it."""


@dataclass(frozen=True)
class TierContext:
    """What a tier factory gets."""

    settings: Settings
    worker_id: str
    model: str  # the served model name: a shared tier keeps models apart by it
    layout: KvLayout
    namespace: int  # `record.namespace_of(model, layout)`
    url: str | None = None  # remote tiers: the store's URL (``--kv-remote-url``)

    @property
    def block_bytes(self) -> int:
        return self.layout.block_bytes


@runtime_checkable
class CacheTier(Protocol):
    """One storage tier below the device cache."""

    name: str  # "host", "disk", "redis", ...
    medium: str  # what its KV events say: "CPU", "DISK", "REMOTE"
    shared: bool  # every worker of the model reads what any worker wrote
    # Optional ``inline = True``: written on the caller's thread (RAM), not queued.
    # Optional ``rejected: int``: blocks it found unusable so far (for the stats).

    @property
    def capacity_blocks(self) -> int | None:
        """Blocks it holds at most (None: the store manages its own capacity)."""

    def __len__(self) -> int:
        """Blocks it holds now (as far as this worker knows)."""

    def put(
        self, block_hash: int, payload: memoryview, *, want_evicted: bool = False
    ) -> list[Evicted]:
        """Store a block (only touch it if held: dedup by hash); returns what it evicted
        to make room, each with its payload if `want_evicted` (a write-on-evict tier
        below takes them) and the tier can still read it, else None. Raises
        `TierError` if the store is unreachable."""

    def get(self, block_hash: int) -> memoryview | None:
        """The block's payload, or None if absent or unusable (then it is also dropped)."""

    def contains(self, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of `block_hashes` it holds (one round trip at most)."""

    def discard(self, block_hash: int) -> None:
        """Forget a block (the caller found it unusable)."""

    def held(self) -> list[int]:
        """The blocks it holds, least recently used first; a shared tier returns []
        (what this worker wrote there is tracked by the `TieredCache`)."""

    def close(self) -> None: ...


CacheTierFactory = Callable[[TierContext], CacheTier]


@dataclass
class TierStats:
    """One tier's counters, read by the worker's /metrics."""

    offloaded_blocks: int = 0
    offloaded_bytes: int = 0
    onboarded_blocks: int = 0
    onboarded_bytes: int = 0
    lookups: int = 0  # prefix lookups that reached this tier
    hit_blocks: int = 0  # blocks those lookups found here
    miss_blocks: int = 0  # blocks they looked for here and did not find
    rejected_blocks: int = 0  # found but unusable (checksum, truncation, stale): recomputed
    errors: int = 0  # operations that failed (the tier was skipped)
    dropped_writes: int = 0  # offloads dropped because the write queue was full
    write_seconds: float = 0.0
    read_seconds: float = 0.0
    writes: int = 0
    reads: int = 0

    @property
    def hit_rate(self) -> float:
        looked = self.hit_blocks + self.miss_blocks
        return self.hit_blocks / looked if looked else 0.0
