"""The `disk` tier (G3): one framed file per block under a directory, LRU within a capacity.

Files live in ``DIR/<namespace>/<worker>/<hh>/<hash>.kv`` (`record` framing:
checksummed, namespaced). A write goes to a temporary name and is renamed into
place, so a reader never sees half a file under a block's name; a crash can
still leave a torn or rotten file behind (no fsync), which `record.decode`
rejects on read: the block is dropped and recomputed, never used. At start the
tier indexes the files its directory already holds (oldest first), so a
restarted worker keeps its disk cache; leftovers of interrupted writes go.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from dynamo_gateway.kvbm import record
from dynamo_gateway.kvbm.policy import LruIndex
from dynamo_gateway.kvbm.tier import Evicted, TierContext

__all__ = ["DiskTier"]

_SUFFIX = ".kv"


class DiskTier:
    name = "disk"
    medium = "DISK"
    shared = False

    def __init__(self, context: TierContext, root: Path, capacity_blocks: int) -> None:
        self._namespace = context.namespace
        self._payload_bytes = context.block_bytes
        self._dir = Path(root) / f"{context.namespace:016x}" / _safe(context.worker_id)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._index = LruIndex(capacity_blocks)
        self._lock = threading.Lock()
        self.rejected = 0  # files found unusable (counted for the manager's stats)
        self._adopt()

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def capacity_blocks(self) -> int:
        return self._index.capacity

    def __len__(self) -> int:
        return len(self._index)

    def path_of(self, block_hash: int) -> Path:
        name = f"{block_hash:016x}"
        return self._dir / name[:2] / f"{name}{_SUFFIX}"

    def _adopt(self) -> None:
        found: list[tuple[float, int, Path]] = []
        for path in self._dir.glob("*/*"):
            if path.suffix != _SUFFIX:
                path.unlink(missing_ok=True)  # an interrupted write
                continue
            try:
                found.append((path.stat().st_mtime, int(path.stem, 16), path))
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
        found.sort()
        for _, h, _ in found:
            for gone in self._index.add(h):
                self.path_of(gone).unlink(missing_ok=True)

    def put(
        self, block_hash: int, payload: memoryview, *, want_evicted: bool = False
    ) -> list[Evicted]:
        with self._lock:
            if self._index.touch(block_hash):
                return []
            # Reserve the slot first, so two writers of one block do not both write.
            evicted = self._index.add(block_hash)
        out: list[Evicted] = []
        for h in evicted:
            path = self.path_of(h)
            data = self._read_payload(h, path) if want_evicted else None
            path.unlink(missing_ok=True)
            out.append((h, data))
        path = self.path_of(block_hash)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(record.encode(self._namespace, block_hash, payload))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._index.discard(block_hash)
            raise
        return out

    def get(self, block_hash: int) -> memoryview | None:
        with self._lock:
            if not self._index.touch(block_hash):
                return None
        return self._read_payload(block_hash, self.path_of(block_hash))

    def _read_payload(self, block_hash: int, path: Path) -> memoryview | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._forget(block_hash)
            return None
        try:
            return record.decode(data, self._namespace, block_hash, self._payload_bytes)
        except record.BadRecord:
            self.rejected += 1
            self.discard(block_hash)
            return None

    def contains(self, block_hashes: Sequence[int]) -> int:
        with self._lock:
            return self._index.leading_run(block_hashes)

    def _forget(self, block_hash: int) -> None:
        with self._lock:
            self._index.discard(block_hash)

    def discard(self, block_hash: int) -> None:
        self._forget(block_hash)
        self.path_of(block_hash).unlink(missing_ok=True)

    def held(self) -> list[int]:
        with self._lock:
            return self._index.order()

    def close(self) -> None:
        pass  # the files stay: a restarted worker adopts them


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "worker"
