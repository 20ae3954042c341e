"""The `host` tier (G2): blocks in host RAM, LRU within a capacity.

Each block is one bytes object of exactly the payload (no framing: RAM does
not tear). With CUDA present the device cache copies through pinned buffers
(`dynamo_gateway.kvbm.manager`); the blocks at rest here are plain memory.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from dynamo_gateway.kvbm.policy import LruIndex
from dynamo_gateway.kvbm.tier import Evicted, TierContext

__all__ = ["HostTier"]


class HostTier:
    name = "host"
    medium = "CPU"
    shared = False
    inline = True  # written on the engine's loop, not queued: RAM is fast enough

    def __init__(self, context: TierContext, capacity_blocks: int) -> None:
        self._block_bytes = context.block_bytes
        self._index = LruIndex(capacity_blocks)
        self._data: dict[int, bytes] = {}
        self._lock = threading.Lock()

    @property
    def capacity_blocks(self) -> int:
        return self._index.capacity

    def __len__(self) -> int:
        return len(self._data)

    def put(
        self, block_hash: int, payload: memoryview, *, want_evicted: bool = False
    ) -> list[Evicted]:
        if payload.nbytes != self._block_bytes:
            raise ValueError(f"a block here is {self._block_bytes} bytes, got {payload.nbytes}")
        with self._lock:
            if self._index.touch(block_hash):
                return []
            out: list[Evicted] = []
            for h in self._index.add(block_hash):
                data = self._data.pop(h)
                out.append((h, memoryview(data) if want_evicted else None))
            self._data[block_hash] = bytes(payload)
            return out

    def get(self, block_hash: int) -> memoryview | None:
        with self._lock:
            data = self._data.get(block_hash)
            if data is None:
                return None
            self._index.touch(block_hash)
            return memoryview(data)

    def contains(self, block_hashes: Sequence[int]) -> int:
        with self._lock:
            return self._index.leading_run(block_hashes)

    def discard(self, block_hash: int) -> None:
        with self._lock:
            self._index.discard(block_hash)
            self._data.pop(block_hash, None)

    def held(self) -> list[int]:
        """Held blocks, least recently used first."""
        with self._lock:
            return self._index.order()

    def close(self) -> None:
        with self._lock:
            self._index.clear()
            self._data.clear()
