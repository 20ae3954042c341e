"""`TieredCache`: the tiers below one worker's device cache, driven by its engine.

What the engine calls, on its event loop:

* `device_targets` / `offload`: a device block was computed (``on_commit``) or
  is being evicted (``on_evict``, its bytes still intact); if the policy sends
  it anywhere (`TierChain.offload_targets`), the engine copies its bytes out
  and hands them over. The host tier is written at once (RAM, on the loop: the
  block must be findable by the next request); disk and remote writes go to a
  bounded queue that one writer thread drains (a full queue drops the write
  and counts it: offloading never stalls serving).
* `lookup` (on the reader thread, `run_in_executor(cache.reader, ...)`): which
  tier holds each block that follows a prompt's device-cached prefix, nearest
  tier first, the remote store asked once for the rest (an `OnboardPlan`).
* `onboard` (reader thread): fetch the planned blocks and hand each to the
  engine's ``write(block index, payload)``; a block gone from its planned tier
  since the lookup is looked for in the others. It stops at the first block no
  tier can give intact (missing, checksum, truncation, another model's block):
  the request recomputes from there, so a bad block is never used.
* `drain_events`: `BlockStored`/`BlockRemoved` with each tier's medium, for the
  engine's KV event stream (`notify` tells the engine there are some, from any
  thread). `snapshot` lists every block the tiers hold, for a full dump.

A tier that fails (`TierError`: a remote store down) is skipped: lookups find
nothing there, writes are dropped, both counted in `stats`; the tiers that
remain keep serving. Thread safety: the tiers guard their own state; this
object's own maps are guarded by one lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dynamo_gateway.kvbm.policy import DEVICE, LruIndex, TierChain, TierPolicy, UseCounter
from dynamo_gateway.kvbm.tier import CacheTier, TierError, TierStats
from dynamo_gateway.protocol.kv_events import BlockRemoved, BlockStored, KvEventData

__all__ = ["BlockMeta", "OnboardPlan", "TieredCache"]

log = logging.getLogger(__name__)

# What a BlockStored needs besides the hash: the parent hash and the block's tokens.
BlockMeta = tuple[int | None, Sequence[int]]
_NO_META: BlockMeta = (None, ())


@dataclass(frozen=True, slots=True)
class OnboardPlan:
    """Where the blocks after a device-cached prefix are: ``tiers[j]`` holds block
    ``start + j`` of the request (hash ``hashes[start + j]``)."""

    hashes: tuple[int, ...]  # the request's full-block hashes, all of them
    start: int
    tiers: tuple[str, ...]
    # Blocks of RAM tiers, taken at lookup (a reference, not a copy): the request's
    # own admission evicts device blocks into RAM, which could push these out.
    held: tuple[memoryview | None, ...] = ()

    @property
    def end(self) -> int:
        """One past the last block the plan covers."""
        return self.start + len(self.tiers)


@dataclass(slots=True)
class _Write:
    tier: str
    block_hash: int
    payload: memoryview


class TieredCache:
    """One worker's lower tiers; see the module docstring."""

    def __init__(
        self,
        tiers: Sequence[CacheTier],
        policies: Mapping[str, TierPolicy],
        *,
        block_size: int,
        max_pending_writes: int = 256,
        max_shared_tracked: int = 1 << 18,
        notify: Callable[[], None] | None = None,
    ) -> None:
        shared = [t for t in tiers if t.shared]
        if len(shared) > 1:
            raise ValueError(f"at most one shared tier, got {[t.name for t in shared]}")
        local = [t for t in tiers if not t.shared]
        self.chain = TierChain(
            tuple(t.name for t in local), shared[0].name if shared else None, policies
        )
        self._tiers: dict[str, CacheTier] = {t.name: t for t in tiers}
        self.block_size = block_size
        self.stats: dict[str, TierStats] = {t.name: TierStats() for t in tiers}
        self.notify = notify
        # The engine's thread (the one that builds this) publishes after every step
        # anyway: only events from the I/O threads need a wake-up.
        self._owner = threading.get_ident()
        self._wake_pending = False
        self._uses = UseCounter()
        self._count_uses = any(p.min_uses > 1 for p in policies.values())
        self._lock = threading.Lock()
        self._meta: OrderedDict[int, BlockMeta] = OrderedDict()
        self._max_meta = sum(t.capacity_blocks or 0 for t in local) + max_shared_tracked
        # What this worker wrote to the shared tier (its events say so), bounded.
        self._shared_held = LruIndex(max_shared_tracked)
        self._events: deque[KvEventData] = deque()
        # Whether a tier's evictions feed a write-on-evict tier below it.
        self._feeds = {
            name: bool(self.chain.offload_targets(name, evicted=True, uses=1 << 30))
            for name in self._tiers
        }
        self._queue: queue.Queue[_Write | None] = queue.Queue(max_pending_writes)
        self._writer = threading.Thread(target=self._write_loop, name="kvbm-writer", daemon=True)
        self._writer.start()
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvbm-reader")
        self._closed = False

    # -- introspection ----------------------------------------------------------------

    @property
    def tiers(self) -> list[CacheTier]:
        """The tiers in lookup order."""
        return [self._tiers[name] for name in self.chain.tiers()]

    def tier(self, name: str) -> CacheTier:
        return self._tiers[name]

    @property
    def pending_writes(self) -> int:
        return self._queue.qsize()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued write is done (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # -- offload (event loop) ---------------------------------------------------------

    def record_uses(self, hashes: Sequence[int]) -> None:
        """The blocks of a new prompt (for the frequency filter)."""
        if self._count_uses:
            with self._lock:
                self._uses.use(hashes)

    def _uses_of(self, block_hash: int) -> int:
        if not self._count_uses:
            return 1
        with self._lock:
            return max(self._uses.count(block_hash), 1)  # computed once at least

    def device_targets(self, block_hash: int, *, evicted: bool) -> list[str]:
        """Tiers a device block that was just computed or is being evicted goes to."""
        return self.chain.offload_targets(DEVICE, evicted=evicted, uses=self._uses_of(block_hash))

    def offload(
        self, block_hash: int, meta: BlockMeta, payload: memoryview, targets: Sequence[str]
    ) -> None:
        """Write a block's bytes (a private copy) to `targets` (`device_targets`)."""
        if self._closed:
            return
        self._remember(block_hash, meta)
        for name in targets:
            self._submit(name, block_hash, payload)

    def _remember(self, block_hash: int, meta: BlockMeta) -> None:
        with self._lock:
            self._meta[block_hash] = meta
            self._meta.move_to_end(block_hash)
            while len(self._meta) > self._max_meta:
                self._meta.popitem(last=False)

    def _submit(self, name: str, block_hash: int, payload: memoryview) -> None:
        if getattr(self._tiers[name], "inline", False):
            self._store(name, block_hash, payload)  # RAM: now, on the caller's thread
            return
        try:
            self._queue.put_nowait(_Write(name, block_hash, payload))
        except queue.Full:
            self.stats[name].dropped_writes += 1

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._store(job.tier, job.block_hash, job.payload)
            except Exception:
                log.exception("kvbm: offloading a block to %s failed", job.tier if job else "?")
            finally:
                self._queue.task_done()

    def _store(self, name: str, block_hash: int, payload: memoryview) -> None:
        tier = self._tiers[name]
        stats = self.stats[name]
        t0 = time.perf_counter()
        try:
            evicted = tier.put(block_hash, payload, want_evicted=self._feeds[name])
        except TierError as exc:
            stats.errors += 1
            log.debug("kvbm: %s", exc)
            return
        stats.write_seconds += time.perf_counter() - t0
        stats.writes += 1
        stats.offloaded_blocks += 1
        stats.offloaded_bytes += payload.nbytes
        self._emit(self._stored_event(block_hash, tier.medium))
        if tier.shared:
            with self._lock:
                forgotten = self._shared_held.add(block_hash)
            if forgotten:
                self._emit(BlockRemoved(block_hashes=forgotten, medium=tier.medium))
        if evicted:
            self._emit(BlockRemoved(block_hashes=[h for h, _ in evicted], medium=tier.medium))
            for h, data in evicted:
                if data is None:
                    continue
                for target in self.chain.offload_targets(name, evicted=True, uses=self._uses_of(h)):
                    self._submit(target, h, data)
        for target in self.chain.offload_targets(
            name, evicted=False, uses=self._uses_of(block_hash)
        ):
            self._submit(target, block_hash, payload)

    def _stored_event(self, block_hash: int, medium: str) -> BlockStored:
        parent, tokens = self._meta_of(block_hash)
        return BlockStored(
            block_hashes=[block_hash],
            parent_block_hash=parent,
            token_ids=list(tokens),
            block_size=self.block_size,
            medium=medium,
        )

    def _meta_of(self, block_hash: int) -> BlockMeta:
        with self._lock:
            return self._meta.get(block_hash, _NO_META)

    # -- lookup and onboarding (reader thread) ----------------------------------------

    def lookup(self, hashes: Sequence[int], start: int) -> OnboardPlan | None:
        """Which tier holds each block of ``hashes[start:]``, as far as they run."""
        found: list[str] = []
        held: list[memoryview | None] = []
        local = [self._tiers[name] for name in self.chain.local]
        for h in hashes[start:]:
            for tier in local:
                stats = self.stats[tier.name]
                stats.lookups += 1
                payload = tier.get(h) if getattr(tier, "inline", False) else None
                if payload is not None or tier.contains((h,)):
                    stats.hit_blocks += 1
                    found.append(tier.name)
                    held.append(payload)
                    break
                stats.miss_blocks += 1
            else:
                break
        remote_name = self.chain.remote
        rest = len(hashes) - start - len(found)
        if remote_name is not None and rest > 0:
            stats = self.stats[remote_name]
            stats.lookups += 1
            try:
                n = self._tiers[remote_name].contains(hashes[start + len(found) :])
            except TierError as exc:
                stats.errors += 1
                log.debug("kvbm: %s", exc)
                n = 0
            stats.hit_blocks += n
            stats.miss_blocks += rest - n
            found.extend([remote_name] * n)
        if not found:
            return None
        return OnboardPlan(tuple(hashes), start, tuple(found), tuple(held))

    def onboard(
        self, plan: OnboardPlan, first: int, end: int, write: Callable[[int, memoryview], None]
    ) -> int:
        """Fetch blocks ``first..end-1`` and `write` each; returns how many in a row landed.

        A block the plan does not cover (the device lost it since the lookup) is
        looked for in the local tiers. Stops at the first block that is missing,
        unusable or whose tier fails.
        """
        n = 0
        for i in range(first, min(end, len(plan.hashes))):
            h = plan.hashes[i]
            j = i - plan.start
            name = plan.tiers[j] if 0 <= j < len(plan.tiers) else self._local_holder(h)
            if name is None:
                break
            payload = plan.held[j] if 0 <= j < len(plan.held) else None
            if payload is not None:
                self._count_onboard(name, payload)
            else:
                payload = self.fetch(name, h)
            if payload is None:
                # Gone since the lookup (this request's own admission pushes blocks
                # down and out of small tiers): another tier may still have it.
                payload = self._fetch_elsewhere(h, name)
            if payload is None:
                break
            write(i, payload)
            n += 1
        return n

    def _fetch_elsewhere(self, block_hash: int, tried: str) -> memoryview | None:
        for tier in self.tiers:
            if tier.name == tried:
                continue
            if tier.shared or tier.contains((block_hash,)):
                payload = self.fetch(tier.name, block_hash)
                if payload is not None:
                    return payload
        return None

    def _local_holder(self, block_hash: int) -> str | None:
        for name in self.chain.local:
            if self._tiers[name].contains((block_hash,)):
                return name
        return None

    def fetch(self, name: str, block_hash: int) -> memoryview | None:
        """One block's verified bytes from tier `name`, or None (then it is forgotten)."""
        tier = self._tiers[name]
        stats = self.stats[name]
        rejected = getattr(tier, "rejected", 0)
        t0 = time.perf_counter()
        try:
            payload = tier.get(block_hash)
        except TierError as exc:
            stats.errors += 1
            log.debug("kvbm: %s", exc)
            return None
        stats.read_seconds += time.perf_counter() - t0
        stats.reads += 1
        stats.rejected_blocks += getattr(tier, "rejected", 0) - rejected
        if payload is None:
            if tier.shared:
                with self._lock:
                    self._shared_held.discard(block_hash)
            self._emit(BlockRemoved(block_hashes=[block_hash], medium=tier.medium))
            return None
        self._count_onboard(name, payload)
        return payload

    def _count_onboard(self, name: str, payload: memoryview) -> None:
        stats = self.stats[name]
        stats.onboarded_blocks += 1
        stats.onboarded_bytes += payload.nbytes

    # -- events -----------------------------------------------------------------------

    def _emit(self, event: KvEventData) -> None:
        self._events.append(event)  # before the flag test: see drain_events
        notify = self.notify
        if notify is None or threading.get_ident() == self._owner:
            return  # the engine's own thread publishes after each step anyway
        if not self._wake_pending:  # one wake-up per batch: a drain takes them all
            self._wake_pending = True
            notify()

    def drain_events(self) -> list[KvEventData]:
        """Tier events since the last drain, oldest first (any thread); removals of
        one medium that follow each other come as one `BlockRemoved`."""
        self._wake_pending = False  # before popping: a later event wakes the engine again
        out: list[KvEventData] = []
        events = self._events
        while events:
            event = events.popleft()
            last = out[-1] if out else None
            if (
                isinstance(event, BlockRemoved)
                and isinstance(last, BlockRemoved)
                and last.medium == event.medium
            ):
                out[-1] = BlockRemoved(
                    block_hashes=[*last.block_hashes, *event.block_hashes], medium=event.medium
                )
            else:
                out.append(event)
        return out

    def snapshot(self) -> list[BlockStored]:
        """Every block the tiers hold now (the shared tier: what this worker wrote)."""
        out: list[BlockStored] = []
        for tier in self.tiers:
            if tier.shared:
                with self._lock:
                    held = self._shared_held.order()
            else:
                held = tier.held()
            out.extend(self._stored_event(h, tier.medium) for h in held)
        return out

    # -- shutdown ---------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued writes (within `timeout`), stop the threads, close the tiers."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout)
        self._queue.put(None)
        self._writer.join(timeout)
        self.reader.shutdown(wait=True)
        for tier in self._tiers.values():
            try:
                tier.close()
            except Exception:
                log.exception("kvbm: closing tier %s failed", tier.name)
