"""A paged KV block pool with prefix caching, shared by the engines.

Pure bookkeeping (no asyncio, no I/O, no tensors) so that it can be tested on
plain data; the mocker simulates a cache with it and the reference engine maps
its block ids onto the rows of a real KV tensor. The pool has ``num_blocks`` blocks of
``block_size`` token slots. A sequence is a `KvSequence`; the caller owns its
token list and tells the pool how far it got.

Rules, which the tests pin down exactly:

* **Prefix cache.** A block that becomes full of *computed* tokens is registered
  under its sequence hash (`dynamo_gateway.kv.hashing`) and reported in a
  `BlockStored`. A new sequence reuses the longest run of cached blocks that
  starts its token list (shared, ref-counted). If another block already holds
  the same hash, the new block is not registered and nothing is reported.
* **Cached-token rule.** At least one token of every sequence must be computed
  (its logits are needed), so prefix hits are capped at
  ``(len(tokens) - 1) // block_size`` blocks: a fully cached, block-aligned
  prompt gets one block less. ``cached tokens = hit blocks * block_size``.
* **Free lists and eviction order.** A block whose ref count drops to 0 goes to
  the free *uncached* stack (LIFO) if it holds no registered hash, or else to the
  tail of the *evictable* LRU list, where it stays cached and reusable. Freeing a
  sequence walks its blocks from last to first, so its last block sits nearest
  the LRU head and is evicted first, and prefixes survive longest. A fresh block
  comes from the uncached stack first, then from the never-used blocks in
  ascending id order, then from the LRU head, which emits `BlockRemoved`.
  Reusing a cached free block (a prefix hit) takes it out of the LRU list.
* **Events** are queued in order and handed out by `drain_events()`; removals
  that follow each other are merged into one `BlockRemoved`, and consecutive new
  blocks of one sequence in one `commit()` into one `BlockStored`.
* **Offload hooks.** ``on_commit(block_id, hash)`` is called for each block
  newly registered by `commit()`, and ``on_evict(block_id, hash)`` for a cached
  block just before an allocation takes it over (its bytes still intact, its
  `stored()` record still there): where a tiered cache copies blocks down.
* **Snapshots.** With ``record_events`` the pool also remembers, per cached
  hash, its parent hash and its tokens (dropped when the hash leaves the cache),
  so that `snapshot()` can describe the whole prefix cache as `BlockStored`
  events: replayed into an empty consumer they give exactly the cached hashes,
  as if it had seen every event since the pool was created.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence

from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventData,
)

__all__ = ["BlockManager", "KvSequence"]

# Token ids are u32 (they are hashed as such), so 4 bytes each in a snapshot record.
_TOKEN_TYPECODE = "I"


class KvSequence:
    """One sequence's share of the pool.

    `hashes` are the sequence hashes of the full blocks of the tokens seen so far.
    They outlive `free()` (tokens only ever grow), so a preempted sequence does
    not rehash its prefix when it is allocated again.
    """

    __slots__ = ("block_ids", "hashes", "num_cached_tokens", "num_registered")

    def __init__(self) -> None:
        self.block_ids: list[int] = []
        self.hashes: list[int] = []
        # Leading blocks already offered to the prefix cache (hits count as offered).
        self.num_registered = 0
        # Prompt tokens served from the cache by the latest allocate().
        self.num_cached_tokens = 0


class BlockManager:
    """The block pool; see the module docstring for the caching rules."""

    def __init__(self, num_blocks: int, block_size: int, *, record_events: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._record = record_events
        # Memory stays O(blocks in use) and out of the GC's sight (an `array` is not
        # tracked): a process may hold hundreds of pools of tens of thousands of blocks.
        self._ref = array("i", [0]) * num_blocks
        self._next_unused = 0  # blocks >= this were never handed out
        self._uncached: list[int] = []  # freed blocks that hold no cached hash (LIFO)
        self._hash: dict[int, int] = {}  # block id -> sequence hash, for cached blocks
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, int] = {}  # sequence hash -> block id
        self._events: list[KvEventData] = []
        self._removed: list[int] = []  # hashes of a BlockRemoved still being merged
        # For snapshot(), only with record_events: cached hash -> (parent hash, tokens).
        # An `array` of u32 keeps a block's tokens compact and out of the GC's sight.
        self._stored: dict[int, tuple[int | None, array[int]]] = {}
        # Offload hooks (see the module docstring): (block id, sequence hash).
        self.on_commit: Callable[[int, int], None] | None = None
        self.on_evict: Callable[[int, int], None] | None = None

    # -- capacity -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free(self) -> int:
        """Blocks that an allocation can take: uncached ones plus evictable cached ones."""
        return self._num_blocks - self._next_unused + len(self._uncached) + len(self._lru)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one live sequence."""
        return self._next_unused - len(self._uncached) - len(self._lru)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache, referenced or not."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` token slots."""
        return -(-num_tokens // self._block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """The sequence hash a block is cached under, or None."""
        return self._hash.get(block_id)

    def stored(self, block_hash: int) -> tuple[int | None, array[int]] | None:
        """A cached block's parent hash and tokens (with ``record_events``), else None."""
        return self._stored.get(block_hash)

    def cached_run(self, hashes: Sequence[int]) -> int:
        """How many leading `hashes` the prefix cache holds."""
        n = 0
        for h in hashes:
            if h not in self._cached:
                break
            n += 1
        return n

    def eviction_order(self) -> list[int]:
        """Evictable cached blocks, the next one to be evicted first."""
        return list(self._lru)

    # -- prefix lookup ----------------------------------------------------------------------

    def cached_prefix_tokens(self, tokens: Sequence[int]) -> int:
        """How many tokens of a new sequence `tokens` would be prefix-cache hits."""
        limit = (len(tokens) - 1) // self._block_size
        hashes = sequence_hashes(tokens[: limit * self._block_size], self._block_size)
        hits = 0
        for h in hashes:
            if h not in self._cached:
                break
            hits += 1
        return hits * self._block_size

    def _extend_hashes(self, seq: KvSequence, tokens: Sequence[int], n_full: int) -> None:
        have = len(seq.hashes)
        if have < n_full:
            bs = self._block_size
            parent = seq.hashes[-1] if have else None
            seq.hashes.extend(sequence_hashes(tokens[have * bs : n_full * bs], bs, parent))

    # -- allocation -----------------------------------------------------------------------

    def allocate(
        self,
        seq: KvSequence,
        tokens: Sequence[int],
        num_slots: int | None = None,
        *,
        reserve: int = 0,
    ) -> bool:
        """Give a sequence without blocks room for `num_slots` tokens (default: all of `tokens`).

        Reuses the cached prefix of `tokens` (see the cached-token rule) and sets
        `seq.num_cached_tokens`. All or nothing: returns False, changing nothing, if
        fewer than `reserve` free blocks would be left.
        """
        if seq.block_ids:
            raise ValueError("sequence already holds blocks; free() it first")
        bs = self._block_size
        n_tokens = len(tokens)
        slots = n_tokens if num_slots is None else max(num_slots, n_tokens)
        needed = self.blocks_for(slots)
        limit = min((n_tokens - 1) // bs, needed) if n_tokens else 0
        self._extend_hashes(seq, tokens, n_tokens // bs)

        hits: list[int] = []
        revived = 0  # hits that currently sit in the evictable list
        cached = self._cached
        for h in seq.hashes[:limit]:
            bid = cached.get(h)
            if bid is None:
                break
            hits.append(bid)
            if self._ref[bid] == 0:
                revived += 1
        if needed - len(hits) + revived + reserve > self.num_free:
            return False

        # Hits first: fresh allocations below may evict from the LRU list.
        for bid in hits:
            if self._ref[bid] == 0:
                del self._lru[bid]
            self._ref[bid] += 1
        n_hits = len(hits)
        for _ in range(needed - n_hits):
            hits.append(self._take_fresh())
        seq.block_ids = hits
        seq.num_registered = n_hits
        seq.num_cached_tokens = n_hits * bs
        return True

    def append_slots(self, seq: KvSequence, num_slots: int) -> bool:
        """Grow a sequence's blocks to hold `num_slots` tokens; False if no block is free."""
        missing = self.blocks_for(num_slots) - len(seq.block_ids)
        if missing <= 0:
            return True
        if missing > self.num_free:
            return False
        for _ in range(missing):
            seq.block_ids.append(self._take_fresh())
        return True

    def _take_fresh(self) -> int:
        if self._uncached:
            bid = self._uncached.pop()
        elif self._next_unused < self._num_blocks:
            bid = self._next_unused
            self._next_unused += 1
        else:
            bid, _ = self._lru.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(bid, self._hash[bid])
            h = self._hash.pop(bid)
            del self._cached[h]
            if self._record:
                self._removed.append(h)
                del self._stored[h]
        self._ref[bid] = 1
        return bid

    # -- caching --------------------------------------------------------------------------

    def commit(self, seq: KvSequence, tokens: Sequence[int], num_computed: int) -> None:
        """Register the blocks that the first `num_computed` tokens of `tokens` filled."""
        bs = self._block_size
        n_full = min(num_computed // bs, len(seq.block_ids))
        start = seq.num_registered
        if n_full <= start:
            return
        self._extend_hashes(seq, tokens, n_full)
        hashes = seq.hashes
        cached = self._cached
        stored = self._stored if self._record else None
        run_start = -1  # first block of the BlockStored being built
        for i in range(start, n_full):
            h = hashes[i]
            if h in cached:
                # Same content in another block: keep one copy in the cache.
                if run_start >= 0:
                    self._emit_stored(seq, tokens, run_start, i)
                    run_start = -1
                continue
            bid = seq.block_ids[i]
            cached[h] = bid
            self._hash[bid] = h
            if stored is not None:
                stored[h] = (
                    hashes[i - 1] if i else None,
                    array(_TOKEN_TYPECODE, tokens[i * bs : (i + 1) * bs]),
                )
            if run_start < 0:
                run_start = i
            if self.on_commit is not None:
                self.on_commit(bid, h)
        if run_start >= 0:
            self._emit_stored(seq, tokens, run_start, n_full)
        seq.num_registered = n_full

    def _emit_stored(self, seq: KvSequence, tokens: Sequence[int], first: int, end: int) -> None:
        if not self._record:
            return
        self._flush_removed()
        bs = self._block_size
        self._events.append(
            BlockStored(
                block_hashes=seq.hashes[first:end],
                parent_block_hash=seq.hashes[first - 1] if first else None,
                token_ids=list(tokens[first * bs : end * bs]),
                block_size=bs,
            )
        )

    def share(self, seq: KvSequence, num_blocks: int | None = None) -> KvSequence:
        """A second reference to a sequence's first `num_blocks` blocks (default: all).

        The blocks stay allocated (and their cached hashes stay in the cache)
        until both are freed: how a finished prefill keeps its KV for a transfer.
        """
        ids = seq.block_ids if num_blocks is None else seq.block_ids[:num_blocks]
        other = KvSequence()
        other.block_ids = list(ids)
        for bid in ids:
            self._ref[bid] += 1
        return other

    def free(self, seq: KvSequence) -> None:
        """Release a sequence's blocks, last block first (see the eviction order)."""
        ref = self._ref
        for bid in reversed(seq.block_ids):
            ref[bid] -= 1
            if ref[bid] == 0:
                if bid in self._hash:
                    self._lru[bid] = None
                else:
                    self._uncached.append(bid)
        seq.block_ids = []
        seq.num_registered = 0

    def clear(self) -> None:
        """Forget the whole prefix cache and emit `AllBlocksCleared`.

        Legal at any time: evictable blocks become uncached free blocks; blocks that
        live sequences still reference stay theirs but are no longer cached (so a
        later eviction never reports a hash the consumer was told is gone).
        """
        self._uncached.extend(self._lru)
        self._lru.clear()
        self._hash.clear()
        self._cached.clear()
        self._stored.clear()
        if self._record:
            self._removed.clear()  # subsumed by the clear
            self._events.append(AllBlocksCleared())

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> list[BlockStored]:
        """The whole prefix cache now, as `BlockStored` events (needs ``record_events``).

        Replayed into an empty consumer they store exactly the cached hashes, each
        with its parent hash and tokens. A block comes after its parent when the
        parent is still cached (an evicted parent is named but not stored, as in
        the live stream); a block's first cached child continues its event (a
        chain becomes one event, as in `commit()`), the other children start
        their own events, so a tree of prefixes gives one event per branch. Events
        queued but not drained yet are already reflected (the pool's state is the
        truth), so a caller that numbers events must drain before it snapshots.
        Cost: O(cached blocks).
        """
        if not self._record:
            raise RuntimeError("snapshot() needs a BlockManager with record_events=True")
        stored = self._stored
        children: dict[int, list[int]] = {}
        roots: list[int] = []
        for h, (parent, _) in stored.items():
            if parent is not None and parent in stored:
                children.setdefault(parent, []).append(h)
            else:
                roots.append(h)
        bs = self._block_size
        out: list[BlockStored] = []
        emitted = 0
        # Depth-first from the roots, without recursion: chains can be thousands long.
        stack = roots[::-1]
        while stack:
            h = stack.pop()
            parent = stored[h][0]
            run: list[int] = []
            tokens: list[int] = []
            while True:
                run.append(h)
                tokens.extend(stored[h][1])
                kids = children.get(h)
                if not kids:
                    break
                # The first child continues the run, the others start their own.
                stack.extend(reversed(kids[1:]))
                h = kids[0]
            out.append(
                BlockStored(
                    block_hashes=run, parent_block_hash=parent, token_ids=tokens, block_size=bs
                )
            )
            emitted += len(run)
        if emitted != len(stored):  # pragma: no cover - only a hash cycle (a collision)
            seen = {h for ev in out for h in ev.block_hashes}
            for h, (parent, toks) in stored.items():
                if h not in seen:
                    out.append(
                        BlockStored(
                            block_hashes=[h],
                            parent_block_hash=parent,
                            token_ids=list(toks),
                            block_size=bs,
                        )
                    )
        return out

    # -- events ---------------------------------------------------------------------------

    def _flush_removed(self) -> None:
        if self._removed:
            self._events.append(BlockRemoved(block_hashes=self._removed))
            self._removed = []

    def drain_events(self) -> list[KvEventData]:
        """Events since the last drain, oldest first."""
        self._flush_removed()
        events = self._events
        self._events = []
        return events
