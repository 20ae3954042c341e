"""Per-worker load as one frontend's router sees it: prefill tokens and KV blocks.

The `kv` router prices a worker by the prefill work queued on it and the KV
blocks its running requests hold. Engines report their load only now and then
(and a remote worker's report is a network hop old), so the router also counts
what it routed itself, updated on the request's lifecycle:

* routed: the request's *new* tokens (its prompt minus the prefix cached on
  that worker) are in-flight prefill work, and its blocks become active there.
  A request's KV is allocated when its prefill is scheduled, so its blocks count
  from now on, as in Dynamo's ``ActiveSequences``.
* first token: prefill done; its new tokens leave the prefill count, its blocks
  stay (they are the decode working set now).
* finished (or moved to another worker by migration): everything of it goes.
  Finishing twice, or a request never seen, is a no-op.

Requests on one worker that share a prefix share its KV blocks, so full blocks
are refcounted by sequence hash per worker and counted once; a prompt's
trailing partial block is private to its request. Output tokens are not seen
here, so a long generation's growing KV is underestimated; the engine's own
report (`LoadMetrics.kv_blocks_used`) covers that when the router blends both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["LoadTracker"]


@dataclass(slots=True)
class _Request:
    worker_id: str
    hashes: tuple[int, ...]
    partial: bool  # has a trailing partial block of its own
    prefill_tokens: int  # 0 once its first token came back


@dataclass(slots=True)
class _Worker:
    prefill_tokens: int = 0
    blocks: dict[int, int] = field(default_factory=dict)  # sequence hash -> refcount
    partial_blocks: int = 0
    requests: set[str] = field(default_factory=set)


class LoadTracker:
    """Prefill tokens and active blocks per worker, from routing decisions only.

    Pure bookkeeping: no clock, no I/O. Not thread-safe (one event loop).
    """

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self._requests: dict[str, _Request] = {}
        self._workers: dict[str, _Worker] = {}

    # -- lifecycle --------------------------------------------------------------------

    def add(
        self,
        request_id: str,
        worker_id: str,
        hashes: Sequence[int],
        num_tokens: int,
        prefill_tokens: int,
    ) -> None:
        """`request_id` (with `num_tokens` prompt tokens whose full blocks hash to
        `hashes`) was routed to `worker_id`, which must compute `prefill_tokens` of them."""
        if request_id in self._requests:  # re-routed without a finish: move it
            self.remove(request_id)
        partial = num_tokens % self.block_size != 0
        req = _Request(worker_id, tuple(hashes), partial, max(prefill_tokens, 0))
        self._requests[request_id] = req
        w = self._workers.get(worker_id)
        if w is None:
            w = self._workers[worker_id] = _Worker()
        w.requests.add(request_id)
        w.prefill_tokens += req.prefill_tokens
        w.partial_blocks += partial
        blocks = w.blocks
        for h in req.hashes:
            blocks[h] = blocks.get(h, 0) + 1

    def prefill_done(self, request_id: str) -> None:
        """The request's first token came back."""
        req = self._requests.get(request_id)
        if req is None or not req.prefill_tokens:
            return
        w = self._workers[req.worker_id]
        w.prefill_tokens -= req.prefill_tokens
        req.prefill_tokens = 0

    def remove(self, request_id: str) -> None:
        """The request ended or left its worker; idempotent."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        w = self._workers[req.worker_id]
        w.requests.discard(request_id)
        w.prefill_tokens -= req.prefill_tokens
        w.partial_blocks -= req.partial
        blocks = w.blocks
        for h in req.hashes:
            n = blocks[h] - 1
            if n:
                blocks[h] = n
            else:
                del blocks[h]
        if not w.requests:
            del self._workers[req.worker_id]

    def remove_worker(self, worker_id: str) -> None:
        """Forget the worker and every request tracked on it."""
        w = self._workers.pop(worker_id, None)
        if w is not None:
            for rid in w.requests:
                self._requests.pop(rid, None)

    # -- queries ----------------------------------------------------------------------

    def prefill_tokens(self, worker_id: str) -> int:
        """Prompt tokens routed to the worker whose prefill has not finished."""
        w = self._workers.get(worker_id)
        return w.prefill_tokens if w is not None else 0

    def active_blocks(self, worker_id: str) -> int:
        """KV blocks the worker's tracked requests hold, shared prefixes counted once."""
        w = self._workers.get(worker_id)
        return len(w.blocks) + w.partial_blocks if w is not None else 0

    def new_blocks(self, worker_id: str, hashes: Sequence[int], num_tokens: int) -> int:
        """Blocks a request would add to the worker's active ones (those not shared).

        The active blocks are prefix-closed (every tracked request holds its whole
        chain of sequence hashes from the root), so the shared part of `hashes` is
        a leading run, found by binary search: O(log n) lookups, not n.
        """
        partial = int(num_tokens % self.block_size != 0)
        n = len(hashes)
        w = self._workers.get(worker_id)
        if w is None or not w.blocks:
            return n + partial
        blocks = w.blocks
        lo, hi = 0, n  # lo leading hashes are known shared; more than hi are not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in blocks:
                lo = mid
            else:
                hi = mid - 1
        return n - lo + partial

    def requests(self, worker_id: str) -> int:
        """Tracked requests on the worker."""
        w = self._workers.get(worker_id)
        return len(w.requests) if w is not None else 0

    def worker_of(self, request_id: str) -> str | None:
        req = self._requests.get(request_id)
        return req.worker_id if req is not None else None

    def __len__(self) -> int:
        return len(self._requests)
