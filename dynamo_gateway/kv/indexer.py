"""Which worker holds which KV block: the router's index, built from `KvEvent`s.

Pure bookkeeping (no I/O, no asyncio, not thread-safe): the router feeds it the
events of every worker in order (`apply`) and asks it, per request, how many
leading blocks of the prompt each worker already holds (`find_matches`).

NOTE on the layout. Conceptually this is a radix tree of blocks: a node per
cached block, children per continuation, each node knowing its workers. But our
keys are *sequence* hashes, and a sequence hash names the whole root-to-node path
(`dynamo_gateway.kv.hashing`), so a lookup never has to walk the tree: the node
for the i-th block of a request is found directly by its hash. The tree therefore
collapses into flat maps, which is what makes Python fast enough here:

* ``holders[medium]: dict[seq_hash, int]``: a bit mask of the workers that hold
  the block on that medium (each worker owns one bit, `_slot`);
* ``owned[medium][slot]: set[seq_hash]``: the blocks a worker holds there, so that
  `remove_worker` / `AllBlocksCleared` cost O(that worker's blocks).

Per stored hash that is one dict update with an int OR, plus one set insert
(done in C for the whole event by `set.update`); per matched block, one dict
lookup and one int AND, whatever the number of workers. Both are bound by the
dict lookups themselves: random 64-bit keys in a table of millions of entries
miss the CPU caches (``benchmarks/indexer.py`` compares with a bare dict loop).
Parent links are not kept: no query needs them, and without them a block that
no worker holds is simply deleted at once, so memory is O(worker-block pairs) at
all times (no garbage nodes, no sweeps).

Matching is prefix-exact: a worker that lost a middle block of a prefix matches
only up to that block, even if it still holds later ones (an engine cannot use a
block whose prefix it lacks).

Media (tiers). Every event carries a ``medium`` ("GPU", "CPU", "DISK", ...; vLLM
says "STORAGE"). Each medium has its own maps, so a CPU-tier `BlockStored` or
`BlockRemoved` never touches the GPU view; `find_matches` looks at one medium
(GPU by default), and a tier-aware router can query each and weigh them.
`AllBlocksCleared` and `remove_worker` drop a worker from every medium.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Mapping, Sequence

from dynamo_gateway.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
)

__all__ = ["DEFAULT_MEDIUM", "RadixIndexer"]

DEFAULT_MEDIUM = "GPU"

_EMPTY: frozenset[int] = frozenset()


class _Tier:
    """The index of one medium."""

    __slots__ = ("holders", "owned")

    def __init__(self) -> None:
        self.holders: dict[int, int] = {}  # seq hash -> bit mask of worker slots
        self.owned: dict[int, set[int]] = {}  # worker slot -> its seq hashes

    def drop_slot(self, slot: int) -> None:
        hashes = self.owned.pop(slot, None)
        if not hashes:
            return
        bit = 1 << slot
        holders = self.holders
        for h in hashes:
            mask = holders[h] ^ bit
            if mask:
                holders[h] = mask
            else:
                del holders[h]


class RadixIndexer:
    """Blocks held per worker and per medium; see the module docstring."""

    def __init__(self) -> None:
        self._tiers: dict[str, _Tier] = {}
        self._slot: dict[str, int] = {}  # worker id -> bit position
        self._worker: dict[int, str] = {}  # bit position -> worker id
        self._free_slots: list[int] = []  # released positions, reused first (small masks)

    # -- events ---------------------------------------------------------------------------

    def apply(self, event: KvEvent) -> None:
        """Apply one worker event (events of one worker must come in their order).

        `BlockStored` adds the worker to each block (idempotent); `BlockRemoved`
        takes it off (hashes it does not hold are ignored) and deletes blocks no
        worker holds any more; `AllBlocksCleared` is `remove_worker`.
        """
        data = event.data
        if isinstance(data, BlockStored):
            self._store(event.worker_id, data.block_hashes, data.medium)
        elif isinstance(data, BlockRemoved):
            self._remove(event.worker_id, data.block_hashes, data.medium)
        elif isinstance(data, AllBlocksCleared):
            self.remove_worker(event.worker_id)
        else:  # pragma: no cover - the union is closed
            raise TypeError(f"unknown KV event {data!r}")

    def _store(self, worker_id: str, hashes: Sequence[int], medium: str) -> None:
        slot = self._slot.get(worker_id)
        if slot is None:
            slot = self._new_slot(worker_id)
        tier = self._tiers.get(medium)
        if tier is None:
            tier = self._tiers[medium] = _Tier()
        owned = tier.owned.get(slot)
        if owned is None:
            owned = tier.owned[slot] = set()
        owned.update(hashes)
        bit = 1 << slot
        holders = tier.holders
        get = holders.get
        for h in hashes:
            holders[h] = get(h, 0) | bit

    def _remove(self, worker_id: str, hashes: Iterable[int], medium: str) -> None:
        slot = self._slot.get(worker_id)
        tier = self._tiers.get(medium)
        if slot is None or tier is None:
            return
        owned = tier.owned.get(slot)
        if not owned:
            return
        bit = 1 << slot
        holders = tier.holders
        for h in hashes:
            if h in owned:
                owned.remove(h)
                mask = holders[h] ^ bit
                if mask:
                    holders[h] = mask
                else:
                    del holders[h]
        if not owned:
            del tier.owned[slot]

    def _new_slot(self, worker_id: str) -> int:
        slot = self._free_slots.pop() if self._free_slots else len(self._slot)
        self._slot[worker_id] = slot
        self._worker[slot] = worker_id
        return slot

    def remove_worker(self, worker_id: str) -> None:
        """Forget every block of a worker on every medium; O(its blocks)."""
        slot = self._slot.pop(worker_id, None)
        if slot is None:
            return
        del self._worker[slot]
        for tier in self._tiers.values():
            tier.drop_slot(slot)
        self._free_slots.append(slot)
        # Smallest slots first, so masks stay as short as the live worker count.
        self._free_slots.sort(reverse=True)

    def clear(self) -> None:
        """Forget everything."""
        self._tiers.clear()
        self._slot.clear()
        self._worker.clear()
        self._free_slots.clear()

    # -- queries --------------------------------------------------------------------------

    def find_matches(
        self, hashes: Sequence[int], *, early_exit: bool = True, medium: str = DEFAULT_MEDIUM
    ) -> dict[str, int]:
        """Per worker, how many leading blocks of `hashes` it holds on `medium`.

        `hashes` are the request's sequence hashes, in order. A worker's count is
        the length of the run of blocks it holds from the first one on; workers
        that do not hold the first block are absent from the result.

        NOTE on the walk: the candidates (a bit mask) start as the holders of the
        first block and are AND-ed with each next block's holders; a worker whose
        bit drops out at block ``i`` matched ``i`` blocks. With `early_exit` (the
        default) the walk stops as soon as no candidate is left, so a request
        costs O(longest match), not O(prompt). ``early_exit=False`` walks every
        block anyway (same result); it exists to measure the full-walk cost.
        """
        tier = self._tiers.get(medium)
        if tier is None or not hashes:
            return {}
        get = tier.holders.get
        cand = get(hashes[0], 0)
        if not cand:
            return {}
        out: dict[str, int] = {}
        worker = self._worker
        n = len(hashes)
        for i in range(1, n):
            nxt = cand & get(hashes[i], 0)
            if nxt != cand:
                self._credit(cand ^ nxt, i, out, worker)
                cand = nxt
                if not cand and early_exit:
                    return out
        if cand:
            self._credit(cand, n, out, worker)
        return out

    @staticmethod
    def _credit(mask: int, depth: int, out: dict[str, int], worker: dict[int, str]) -> None:
        while mask:
            low = mask & -mask
            out[worker[low.bit_length() - 1]] = depth
            mask ^= low

    def find_tiered_matches(
        self,
        hashes: Sequence[int],
        weights: Mapping[str, float],
        shared: Collection[str] = (),
    ) -> tuple[dict[str, float], float]:
        """Per worker, the credited length of the leading run of `hashes` it can get
        from any medium; and what a worker the index does not know gets.

        A worker can get block ``i`` if it holds it on some medium of `weights`, or
        if any worker holds it on a `shared` medium (a store every worker reads,
        so it is reachable from workers that never stored it). Block ``i`` is
        credited the best weight among the ways the worker can get it (a device
        hit 1.0, a host hit 0.75, ...); a worker's run ends at the first block it
        cannot get. Returns ``(credits, shared_only)``: ``credits`` for workers
        the index knows (absent: nothing from block 0 on, except `shared_only`),
        ``shared_only`` the credit of the leading run on shared media alone.
        O(blocks matched * (media + workers holding them)).
        """
        ranked = sorted(
            (
                (w, self._tiers[m])
                for m, w in weights.items()
                if m not in shared and w > 0 and m in self._tiers
            ),
            key=lambda item: -item[0],
        )
        shared_tiers = [(weights.get(m, 0.0), self._tiers[m]) for m in shared if m in self._tiers]
        credit: dict[int, float] = {}
        alive = 0
        for slot in self._worker:
            alive |= 1 << slot
        shared_only = 0.0
        shared_alive = True
        for h in hashes:
            best_shared = max((w for w, tier in shared_tiers if h in tier.holders), default=0.0)
            remaining = alive
            for w, tier in ranked:
                got = tier.holders.get(h, 0) & remaining
                if got:
                    _add_credit(credit, got, max(w, best_shared))
                    remaining ^= got
            if best_shared > 0:
                if remaining:
                    _add_credit(credit, remaining, best_shared)
                if shared_alive:
                    shared_only += best_shared
            else:
                alive ^= remaining
                shared_alive = False
            if not alive and not shared_alive:
                break
        worker = self._worker
        return {worker[s]: c for s, c in credit.items()}, shared_only

    @property
    def num_blocks(self) -> int:
        """Index nodes: distinct (medium, block) pairs held by at least one worker."""
        return sum(len(t.holders) for t in self._tiers.values())

    @property
    def num_entries(self) -> int:
        """(worker, medium, block) triples: what the workers hold, all added up."""
        return sum(len(s) for t in self._tiers.values() for s in t.owned.values())

    def blocks_of(self, worker_id: str, medium: str | None = None) -> int:
        """Blocks a worker holds on `medium` (None: on every medium, added up)."""
        slot = self._slot.get(worker_id)
        if slot is None:
            return 0
        tiers = self._tiers.values() if medium is None else [self._tiers.get(medium)]
        return sum(len(t.owned.get(slot, _EMPTY)) for t in tiers if t is not None)

    def workers(self) -> list[str]:
        """Workers known to the index (seen storing since their last clear/removal), sorted."""
        return sorted(self._slot)

    def media(self) -> list[str]:
        """Media that currently hold at least one block, sorted."""
        return sorted(m for m, t in self._tiers.items() if t.holders)

    def approx_bytes(self) -> int:
        """A rough estimate of the index's memory, in bytes.

        Counts the hash tables themselves (`sys.getsizeof` of each dict and set,
        which includes their slot arrays) plus one int object per node key and per
        mask (28 bytes + 4 per 30 bits of mask). Hash ints shared with the events'
        lists are counted once per node, which is what they cost once the events
        are gone. Ignores allocator overhead: expect the real figure within ~20%.
        """
        total = sys.getsizeof(self) + sys.getsizeof(self._slot) + sys.getsizeof(self._worker)
        mask_bytes = 28 + 4 * ((max(self._worker, default=0) + 30) // 30)
        for tier in self._tiers.values():
            total += sys.getsizeof(tier.holders) + len(tier.holders) * (32 + mask_bytes)
            total += sys.getsizeof(tier.owned)
            total += sum(sys.getsizeof(s) for s in tier.owned.values())
        return total


def _add_credit(credit: dict[int, float], mask: int, weight: float) -> None:
    while mask:
        low = mask & -mask
        slot = low.bit_length() - 1
        credit[slot] = credit.get(slot, 0.0) + weight
        mask ^= low
