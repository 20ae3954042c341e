"""Simulated tiers for the mocker: capacities and eviction of the real ones, no bytes.

A `SimTier` keeps only which blocks it holds (an `LruIndex`) and answers
``get`` with an empty payload: the mocker's KV has no bytes, only timing. The
time a block takes to come up is the mocker's business (`onboard_seconds`:
``latency_s`` per block read plus bytes over ``gbps``). A shared tier is shared
in-process: every mocker worker given the same URL and namespace sees one
store (a trace replay's fleet runs in one process), capped at
``capacity_blocks`` like the local ones; no server is contacted.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from dynamo_gateway.kvbm.policy import LruIndex
from dynamo_gateway.kvbm.tier import Evicted

__all__ = ["SimTier"]

_EMPTY = memoryview(b"")
_SHARED: dict[tuple[str, int], tuple[LruIndex, threading.Lock]] = {}
_SHARED_LOCK = threading.Lock()


class SimTier:
    """One simulated tier (see the module docstring)."""

    inline = True  # nothing to wait for: written on the caller's thread

    def __init__(
        self,
        name: str,
        medium: str,
        capacity_blocks: int,
        *,
        gbps: float,
        latency_s: float = 0.0,
        shared_key: tuple[str, int] | None = None,
    ) -> None:
        self.name = name
        self.medium = medium
        self.shared = shared_key is not None
        self.gbps = gbps
        self.latency_s = latency_s
        if shared_key is None:
            self._index, self._lock = LruIndex(capacity_blocks), threading.Lock()
        else:
            with _SHARED_LOCK:
                if shared_key not in _SHARED:
                    _SHARED[shared_key] = (LruIndex(capacity_blocks), threading.Lock())
                self._index, self._lock = _SHARED[shared_key]

    @property
    def capacity_blocks(self) -> int:
        return self._index.capacity

    def __len__(self) -> int:
        return len(self._index)

    def put(
        self, block_hash: int, payload: memoryview, *, want_evicted: bool = False
    ) -> list[Evicted]:
        with self._lock:
            return [(h, _EMPTY if want_evicted else None) for h in self._index.add(block_hash)]

    def get(self, block_hash: int) -> memoryview | None:
        with self._lock:
            return _EMPTY if self._index.touch(block_hash) else None

    def contains(self, block_hashes: Sequence[int]) -> int:
        with self._lock:
            return self._index.leading_run(block_hashes)

    def discard(self, block_hash: int) -> None:
        with self._lock:
            self._index.discard(block_hash)

    def held(self) -> list[int]:
        if self.shared:
            return []
        with self._lock:
            return self._index.order()

    def close(self) -> None:
        pass

    def onboard_seconds(self, blocks: int, block_bytes: int) -> float:
        """Simulated time to read `blocks` blocks of `block_bytes` from this tier."""
        return blocks * (self.latency_s + block_bytes / (self.gbps * 1e9))

    @staticmethod
    def forget_shared() -> None:
        """Drop every in-process shared store (tests)."""
        with _SHARED_LOCK:
            _SHARED.clear()
