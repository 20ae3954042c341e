"""The `redis` tier (G4): blocks in a Redis server that every worker of a model shares.

``--kv-remote-url redis://host:port/db``. A block is one key,
``dgw:kv:<namespace>:<hash>``, holding its `record` (checksummed and
namespaced, so another model's or layout's block under the same hash is
stale, never used). Writes are ``SET NX`` (the first writer wins; the same hash
is the same content) with an optional TTL; capacity and eviction are the
server's (``maxmemory`` with an LRU ``maxmemory-policy``), so this tier
reports no capacity of its own. A failed call raises `TierError`; the tier
then stays away for ``retry_s`` so that requests do not each wait out a
connect timeout while the server is down.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

from dynamo_gateway.kvbm import record
from dynamo_gateway.kvbm.tier import Evicted, TierContext, TierError

__all__ = ["RedisTier"]

P = ParamSpec("P")
R = TypeVar("R")


class RedisTier:
    name = "redis"
    medium = "REMOTE"
    shared = True

    def __init__(
        self,
        context: TierContext,
        url: str,
        *,
        ttl_s: float | None = None,
        connect_timeout_s: float = 1.0,
        timeout_s: float = 10.0,
        retry_s: float = 2.0,
    ) -> None:
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - redis is a core dependency
            raise TierError("the redis tier needs the redis package: pip install redis") from exc
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        # A refused connection fails at once; the connect timeout bounds a host that
        # does not answer; the socket timeout is generous, as a large GET of many
        # blocks on a loaded machine can take a while and is not an outage.
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s
        )
        self._prefix = f"dgw:kv:{context.namespace:016x}:"
        self._namespace = context.namespace
        self._payload_bytes = context.block_bytes
        self._ttl_ms = int(ttl_s * 1000) if ttl_s else None
        self._retry_s = retry_s
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.rejected = 0
        self.url = url

    @property
    def capacity_blocks(self) -> None:
        return None

    def __len__(self) -> int:
        try:
            return sum(1 for _ in self._call(self._client.scan_iter, match=self._prefix + "*"))
        except TierError:
            return 0

    def key(self, block_hash: int) -> str:
        return f"{self._prefix}{block_hash:016x}"

    def _call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        if time.monotonic() < self._down_until:
            raise TierError(f"redis at {self.url} is unreachable; retrying later")
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            with self._lock:
                self._down_until = time.monotonic() + self._retry_s
            raise TierError(f"redis at {self.url}: {exc}") from exc

    def put(
        self, block_hash: int, payload: memoryview, *, want_evicted: bool = False
    ) -> list[Evicted]:
        data = record.encode(self._namespace, block_hash, payload)
        self._call(self._client.set, self.key(block_hash), data, nx=True, px=self._ttl_ms)
        return []

    def get(self, block_hash: int) -> memoryview | None:
        data = self._call(self._client.get, self.key(block_hash))
        if not isinstance(data, bytes):
            return None  # absent (a client built without decode_responses gives bytes)
        try:
            return record.decode(data, self._namespace, block_hash, self._payload_bytes)
        except record.BadRecord:
            self.rejected += 1
            self.discard(block_hash)
            return None

    def contains(self, block_hashes: Sequence[int]) -> int:
        if not block_hashes:
            return 0
        pipe = self._client.pipeline(transaction=False)
        for h in block_hashes:
            pipe.exists(self.key(h))
        found = self._call(pipe.execute)
        n = 0
        for hit in found:
            if not hit:
                break
            n += 1
        return n

    def discard(self, block_hash: int) -> None:
        with contextlib.suppress(TierError):
            self._call(self._client.delete, self.key(block_hash))

    def held(self) -> list[int]:
        return []

    def close(self) -> None:
        self._client.close()
