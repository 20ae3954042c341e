"""Pure decisions of the tiered KV cache: which tier a block moves to, and when; eviction.

The tiers form a chain below the device cache: the local ones in order (host,
then disk) and at most one shared remote store. Each tier has a *source*, the
tier its blocks come from, and a *mode* (`TierPolicy`):

* the first local tier's source is the device, each next local tier's the one
  above it;
* the remote tier's source is the device in ``write-through`` mode (every block
  the device computes is shared at once, for cross-worker reuse) and the last
  local tier in ``write-on-evict`` mode (a block is shared when the worker lets
  it go);
* ``write-through``: a block is written when it enters the source (the device:
  when it is computed); ``write-on-evict``: when the source evicts it;
* ``min_uses``: the frequency filter; a block is written only if it was used
  (computed or hit) at least that often (`UseCounter`), so one-off prompts do
  not churn the disk.

`offload_targets` answers "block entered/left this tier: where does it go",
`LruIndex` is the capacity and eviction order inside one tier.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_POLICY",
    "DEVICE",
    "LruIndex",
    "Mode",
    "TierChain",
    "TierPolicy",
    "UseCounter",
    "parse_offload_policy",
]

DEVICE = "device"
TIER_NAMES = ("host", "disk", "remote")
DEFAULT_POLICY = "host=write-on-evict,disk=write-on-evict,remote=write-through"


class Mode(enum.Enum):
    WRITE_THROUGH = "write-through"
    WRITE_ON_EVICT = "write-on-evict"


@dataclass(frozen=True, slots=True)
class TierPolicy:
    mode: Mode = Mode.WRITE_ON_EVICT
    min_uses: int = 1


def parse_offload_policy(text: str) -> dict[str, TierPolicy]:
    """``--kv-offload-policy``: one mode for every tier, or ``tier=mode[:min-uses=N],...``.

    >>> parse_offload_policy("write-through")["disk"]
    TierPolicy(mode=<Mode.WRITE_THROUGH: 'write-through'>, min_uses=1)
    >>> parse_offload_policy("disk=write-on-evict:min-uses=2")["disk"].min_uses
    2

    Tiers not named keep the default (`DEFAULT_POLICY`). Raises ValueError with
    the offending part.
    """
    out = {name: _parse_one(spec) for name, spec in _pairs(DEFAULT_POLICY)}
    text = text.strip()
    if not text:
        return out
    if "=" not in text.split(":", 1)[0]:
        every = _parse_one(text)
        return dict.fromkeys(TIER_NAMES, every)
    for name, spec in _pairs(text):
        if name not in TIER_NAMES:
            raise ValueError(
                f"unknown tier {name!r} in the offload policy (tiers: host, disk, remote)"
            )
        out[name] = _parse_one(spec)
    return out


def _pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for part in text.split(","):
        name, sep, spec = part.strip().partition("=")
        if not sep or not spec:
            raise ValueError(f"offload policy part {part.strip()!r} is not tier=mode")
        pairs.append((name.strip(), spec.strip()))
    return pairs


def _parse_one(spec: str) -> TierPolicy:
    mode_text, *options = spec.split(":")
    try:
        mode = Mode(mode_text.strip())
    except ValueError:
        modes = ", ".join(m.value for m in Mode)
        raise ValueError(f"unknown offload mode {mode_text!r} (modes: {modes})") from None
    min_uses = 1
    for option in options:
        key, _, value = option.partition("=")
        if key.strip() != "min-uses" or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"offload option {option!r}: expected min-uses=N with N >= 1")
        min_uses = int(value)
    return TierPolicy(mode, min_uses)


@dataclass(frozen=True)
class TierChain:
    """The configured tiers: ``local`` in order (a subset of host, disk), ``remote`` or None."""

    local: tuple[str, ...]
    remote: str | None
    policies: Mapping[str, TierPolicy]

    def source(self, tier: str) -> str:
        """The tier `tier`'s blocks come from (`DEVICE` or a local tier)."""
        if tier == self.remote:
            if self._policy(tier).mode is Mode.WRITE_THROUGH or not self.local:
                return DEVICE
            return self.local[-1]
        i = self.local.index(tier)
        return self.local[i - 1] if i else DEVICE

    def tiers(self) -> tuple[str, ...]:
        """Every tier, in lookup order (local first, nearest first, then remote)."""
        return self.local + ((self.remote,) if self.remote else ())

    def offload_targets(self, source: str, *, evicted: bool, uses: int) -> list[str]:
        """Tiers that a block entering (``evicted`` False) or leaving `source` goes to."""
        want = Mode.WRITE_ON_EVICT if evicted else Mode.WRITE_THROUGH
        out = []
        for tier in self.tiers():
            policy = self._policy(tier)
            if self.source(tier) == source and policy.mode is want and uses >= policy.min_uses:
                out.append(tier)
        return out

    def _policy(self, tier: str) -> TierPolicy:
        kind = "remote" if tier == self.remote else tier
        return self.policies.get(kind, TierPolicy())


class LruIndex:
    """The blocks one tier holds, least recently used first, within ``capacity`` blocks."""

    __slots__ = ("_capacity", "_order")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a tier holds at least one block")
        self._capacity = capacity
        self._order: OrderedDict[int, None] = OrderedDict()

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._order

    def order(self) -> list[int]:
        """Held blocks, the next to be evicted first."""
        return list(self._order)

    def leading_run(self, block_hashes: Sequence[int]) -> int:
        """How many leading `block_hashes` are held."""
        n = 0
        for h in block_hashes:
            if h not in self._order:
                break
            n += 1
        return n

    def touch(self, block_hash: int) -> bool:
        """Mark a held block as just used; False if it is not held."""
        if block_hash not in self._order:
            return False
        self._order.move_to_end(block_hash)
        return True

    def add(self, block_hash: int) -> list[int]:
        """Hold a block (or touch it if held); returns the blocks evicted to make room."""
        if self.touch(block_hash):
            return []
        evicted = []
        while len(self._order) >= self._capacity:
            evicted.append(self._order.popitem(last=False)[0])
        self._order[block_hash] = None
        return evicted

    def discard(self, block_hash: int) -> bool:
        return self._order.pop(block_hash, 0) is None

    def clear(self) -> None:
        self._order.clear()


class UseCounter:
    """How often each recent block was used, for the frequency filter; bounded LRU."""

    __slots__ = ("_counts", "_max")

    def __init__(self, max_entries: int = 1 << 20) -> None:
        self._max = max_entries
        self._counts: OrderedDict[int, int] = OrderedDict()

    def use(self, block_hashes: Sequence[int]) -> None:
        counts = self._counts
        for h in block_hashes:
            counts[h] = counts.get(h, 0) + 1
            counts.move_to_end(h)
        while len(counts) > self._max:
            counts.popitem(last=False)

    def count(self, block_hash: int) -> int:
        return self._counts.get(block_hash, 0)

    def __len__(self) -> int:
        return len(self._counts)
