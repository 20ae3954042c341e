"""The `kv` routing policy: send a request where its prefix is cached, weighed against load.

NOTE on the algorithm (Dynamo's KV router cost). For a request of ``T`` prompt
tokens whose full blocks hash to ``H`` (`sequence_hashes`), and each eligible
worker ``w``::

    overlap(w)   = leading blocks of H cached on w           (the radix indexer)
    prefill(w)   = (prefill tokens queued on w + T - overlap(w) * block_size) / block_size
    decode(w)    = blocks active on w + blocks of this request not active there yet
    cost(w)      = overlap_weight * prefill(w) + decode(w)

With temperature 0 the cheapest worker wins (ties: lower KV usage, then
random); above 0 a worker is sampled with probability proportional to
``exp(-c / temperature)``, ``c`` being its cost scaled to [0, 1] over the
candidates. The load terms blend this frontend's own bookkeeping
(`LoadTracker`, fresh) with the worker's report (`WorkerView.load`, which also
sees other frontends' requests): the larger wins.

Optional guard (``max_imbalance_blocks``, off by default = Dynamo): workers with
more than that many active blocks above the least loaded one are not candidates,
so a hot prefix cannot pile every request onto one worker.

Approximate mode (``use_kv_events = False``): no KV events; each routed request
is assumed cached on its worker for ``approx_ttl_s`` seconds (inserted in the
indexer as if the worker had sent a `BlockStored`), and expired entries are
removed lazily before each decision.

Tiers: when workers report blocks on lower media (host, disk, a shared store;
`dynamo_gateway.kvbm`), ``overlap(w)`` becomes the tier-weighted run of
`RadixIndexer.find_tiered_matches`: each leading block counts the weight of the
best medium it can come from (``tier_weights``: GPU 1, CPU 0.75, DISK 0.25, as
Dynamo credits them), and a block on a shared medium (``shared_media``: REMOTE)
counts for every worker, even one that never stored it. Onboarding is cheaper
than recomputing but dearer than a device hit, so a device hit beats a host
hit, which beats a cold worker.

Session affinity: a request with a session id seen within ``session_ttl_s`` goes
to that session's last worker if it is still eligible and not overloaded
(`dynamo_gateway.router.session`).

Decision logic (`worker_costs`, `choose_worker`) is pure; `KvRouter` does the
bookkeeping around it.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dynamo_gateway.clock import now as clock_now
from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.kv.indexer import DEFAULT_MEDIUM, RadixIndexer
from dynamo_gateway.protocol.kv_events import BlockRemoved, BlockStored, KvEvent
from dynamo_gateway.router.base import NoWorkerError, RouterBase, RouteRequest, WorkerView
from dynamo_gateway.router.kv_load import LoadTracker
from dynamo_gateway.router.session import SessionAffinity, is_overloaded
from dynamo_gateway.settings import KvRouterSettings

__all__ = [
    "KvRouter",
    "KvRouterStats",
    "WorkerCost",
    "WorkerState",
    "choose_worker",
    "worker_costs",
]

_LATENCY_SAMPLES = 1024  # recent decision latencies kept for percentiles


# -- pure decision logic ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerState:
    """Everything one worker's cost depends on, as plain numbers."""

    worker_id: str
    overlap_blocks: float  # leading blocks of the request cached there (tier-weighted)
    prefill_tokens: float  # prefill work already queued there
    active_blocks: float  # KV blocks its running requests hold
    new_blocks: int  # blocks this request would add to those (not shared with them)
    kv_usage: float = 0.0  # tie-break: emptier first


@dataclass(frozen=True, slots=True)
class WorkerCost:
    """One worker's cost and its two terms, in blocks."""

    worker_id: str
    prefill_blocks: float
    decode_blocks: float
    cost: float


def worker_costs(
    states: Sequence[WorkerState],
    *,
    request_tokens: int,
    block_size: int,
    overlap_weight: float = 1.0,
) -> list[WorkerCost]:
    """Dynamo's cost of placing a `request_tokens`-token request on each worker."""
    out: list[WorkerCost] = []
    for s in states:
        new_tokens = max(request_tokens - s.overlap_blocks * block_size, 0)
        prefill = (s.prefill_tokens + new_tokens) / block_size
        decode = s.active_blocks + s.new_blocks
        out.append(WorkerCost(s.worker_id, prefill, decode, overlap_weight * prefill + decode))
    return out


def choose_worker(
    states: Sequence[WorkerState],
    costs: Sequence[WorkerCost],
    *,
    temperature: float = 0.0,
    rng: random.Random | None = None,
    max_imbalance_blocks: int | None = None,
) -> int:
    """Index of the worker to use (see the module docstring). `states` and `costs`
    are parallel and not empty."""
    if not states:
        raise NoWorkerError("no worker to route to")
    rng = rng or random.Random()
    candidates = list(range(len(states)))
    if max_imbalance_blocks is not None:
        least = min(s.active_blocks for s in states)
        candidates = [
            i for i in candidates if states[i].active_blocks - least <= max_imbalance_blocks
        ]
    return _choose(candidates, states, costs, temperature, rng)


def _choose(
    candidates: list[int],
    states: Sequence[WorkerState],
    costs: Sequence[WorkerCost],
    temperature: float,
    rng: random.Random,
) -> int:
    values = [costs[i].cost for i in candidates]
    lo = min(values)
    if temperature > 0:
        hi = max(values)
        if hi - lo <= 1e-12:
            return candidates[rng.randrange(len(candidates))]
        weights = [math.exp(-((v - lo) / (hi - lo)) / temperature) for v in values]
        return rng.choices(candidates, weights)[0]
    best = [i for i, v in zip(candidates, values, strict=True) if v - lo <= 1e-9]
    if len(best) > 1:
        usage = min(states[i].kv_usage for i in best)
        best = [i for i in best if states[i].kv_usage <= usage]
    return best[0] if len(best) == 1 else best[rng.randrange(len(best))]


# -- the router -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KvRouterStats:
    """Counters for metrics; sums are cumulative, percentiles over recent decisions."""

    routed: int  # requests placed (a migrated request counts again)
    request_blocks: int  # full prompt blocks of those requests
    matched_blocks: int  # of which cached on the chosen worker
    session_hits: int  # decisions made by session affinity
    decisions: int
    hashing_s: float
    matching_s: float
    selection_s: float
    decision_p50_s: float
    decision_p99_s: float
    kv_events: int
    indexer_blocks: int
    indexer_entries: int
    indexer_bytes: int
    approx_entries: int  # approximate mode: (worker, block) pairs awaiting expiry

    @property
    def hit_rate(self) -> float:
        """Share of routed prompt blocks that were cached where they went."""
        return self.matched_blocks / self.request_blocks if self.request_blocks else 0.0


class KvRouter(RouterBase):
    """KV-aware routing with load (see the module docstring).

    `clock` (monotonic seconds) and `rng` are injectable for tests.
    """

    def __init__(
        self,
        block_size: int,
        settings: KvRouterSettings | None = None,
        *,
        indexer: RadixIndexer | None = None,
        clock: Callable[[], float] = clock_now,
        rng: random.Random | None = None,
    ) -> None:
        self.block_size = block_size
        self.settings = settings or KvRouterSettings()
        self.indexer = indexer if indexer is not None else RadixIndexer()
        self.load = LoadTracker(block_size)
        self.sessions = SessionAffinity(self.settings.session_ttl_s, clock=clock)
        self._clock = clock
        self._rng = rng or random.Random(self.settings.seed)
        # The last decision, so `on_routed` (called right after `select`) reuses it.
        self._last: tuple[str, list[int], dict[str, int]] | None = None
        # Approximate mode: (worker, block hash) -> expiry, oldest first.
        self._approx: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._approx_ids: dict[str, int] = {}
        # Mean new (uncached) prompt tokens per request: turns a worker's reported
        # queue length into prefill tokens.
        self._mean_prefill = 0.0
        # Stats.
        self._routed = 0
        self._request_blocks = 0
        self._matched_blocks = 0
        self._decisions = 0
        self._session_hits = 0
        self._hashing_s = 0.0
        self._matching_s = 0.0
        self._selection_s = 0.0
        self._latencies: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self._kv_events = 0

    # -- decision -------------------------------------------------------------------------

    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView:
        if not workers:
            raise NoWorkerError("no worker to route to")
        t0 = time.perf_counter()
        if not self.settings.use_kv_events:
            self._expire(self._clock())
        tokens = request.token_ids
        hashes = sequence_hashes(tokens, self.block_size)
        t1 = time.perf_counter()
        matches = self.indexer.find_matches(hashes) if hashes else {}
        credits = self._tiered(hashes)
        t2 = time.perf_counter()
        self._last = (request.request_id, hashes, matches)
        chosen = self.sessions.lookup(request.session_id, workers)
        if chosen is not None and not is_overloaded(chosen):
            self._session_hits += 1
        else:
            states = [self.state_of(w, hashes, len(tokens), matches, credits) for w in workers]
            costs = worker_costs(
                states,
                request_tokens=len(tokens),
                block_size=self.block_size,
                overlap_weight=self.settings.overlap_weight,
            )
            index = choose_worker(
                states,
                costs,
                temperature=self.settings.temperature,
                rng=self._rng,
                max_imbalance_blocks=self.settings.max_imbalance_blocks,
            )
            chosen = workers[index]
        t3 = time.perf_counter()
        self._decisions += 1
        self._hashing_s += t1 - t0
        self._matching_s += t2 - t1
        self._selection_s += t3 - t2
        self._latencies.append(t3 - t0)
        return chosen

    def overlap_blocks(self, request: RouteRequest, worker_id: str) -> int:
        """Leading blocks of `request` that the index says `worker_id` caches.

        Cheap right after `select()` for the same request (its match is reused).
        """
        last = self._last
        if last is not None and last[0] == request.request_id:
            _, hashes, matches = last
        else:
            hashes = sequence_hashes(request.token_ids, self.block_size)
            matches = self.indexer.find_matches(hashes) if hashes else {}
        return min(matches.get(worker_id, 0), len(hashes))

    def _tiered(self, hashes: Sequence[int]) -> tuple[dict[str, float], float] | None:
        """Tier-weighted matches, when some worker reports blocks below the device."""
        if not hashes:
            return None
        media = self.indexer.media()
        if not media or media == [DEFAULT_MEDIUM]:
            return None
        settings = self.settings
        return self.indexer.find_tiered_matches(
            hashes, settings.tier_weights, shared=settings.shared_media
        )

    def state_of(
        self,
        view: WorkerView,
        hashes: Sequence[int],
        num_tokens: int,
        matches: dict[str, int],
        credits: tuple[dict[str, float], float] | None = None,
    ) -> WorkerState:
        """One worker's cost inputs: tracked load blended with its own report."""
        wid = view.worker_id
        load = view.load
        prefill = max(self.load.prefill_tokens(wid), load.waiting_requests * self._mean_prefill)
        active = max(self.load.active_blocks(wid), load.kv_blocks_used)
        if credits is None:
            overlap: float = matches.get(wid, 0)
        else:
            overlap = max(credits[0].get(wid, credits[1]), matches.get(wid, 0))
        return WorkerState(
            wid,
            min(overlap, len(hashes)),
            prefill,
            active,
            self.load.new_blocks(wid, hashes, num_tokens),
            load.kv_usage,
        )

    # -- lifecycle ------------------------------------------------------------------------

    def on_routed(self, request: RouteRequest, worker: WorkerView) -> None:
        last = self._last
        self._last = None
        if last is not None and last[0] == request.request_id:
            _, hashes, matches = last
        else:
            hashes = sequence_hashes(request.token_ids, self.block_size)
            matches = self.indexer.find_matches(hashes) if hashes else {}
        wid = worker.worker_id
        num_tokens = len(request.token_ids)
        overlap = min(matches.get(wid, 0), len(hashes))
        new_tokens = max(num_tokens - overlap * self.block_size, 0)
        self.load.add(request.request_id, wid, hashes, num_tokens, new_tokens)
        self._mean_prefill += (new_tokens - self._mean_prefill) / min(self._routed + 1, 100)
        self._routed += 1
        self._request_blocks += len(hashes)
        self._matched_blocks += overlap
        self.sessions.record(request.session_id, wid)
        if not self.settings.use_kv_events and hashes:
            self._assume_cached(wid, hashes, request.token_ids)

    def on_first_token(self, request_id: str) -> None:
        self.load.prefill_done(request_id)

    def on_finished(self, request_id: str) -> None:
        self.load.remove(request_id)

    def on_kv_event(self, event: KvEvent) -> None:
        if self.settings.use_kv_events:
            self._kv_events += 1
            self.indexer.apply(event)

    def remove_worker(self, worker_id: str) -> None:
        self.indexer.remove_worker(worker_id)
        self.load.remove_worker(worker_id)
        self.sessions.forget_worker(worker_id)
        self._approx_ids.pop(worker_id, None)
        for key in [k for k in self._approx if k[0] == worker_id]:
            del self._approx[key]

    # -- approximate mode -----------------------------------------------------------------

    def _assume_cached(self, worker_id: str, hashes: list[int], tokens: Sequence[int]) -> None:
        expiry = self._clock() + self.settings.approx_ttl_s
        approx = self._approx
        fresh = False
        for h in hashes:  # root first, so a parent never expires before its children
            key = (worker_id, h)
            fresh |= key not in approx
            approx[key] = expiry
            approx.move_to_end(key)
        if fresh:
            stored = BlockStored(
                block_hashes=list(hashes),
                parent_block_hash=None,
                token_ids=list(tokens[: len(hashes) * self.block_size]),
                block_size=self.block_size,
            )
            self.indexer.apply(
                KvEvent(worker_id=worker_id, event_id=self._next_id(worker_id), data=stored)
            )

    def _expire(self, now: float) -> None:
        approx = self._approx
        gone: dict[str, list[int]] = {}
        while approx:
            key = next(iter(approx))
            if approx[key] > now:
                break
            del approx[key]
            gone.setdefault(key[0], []).append(key[1])
        for wid, hashes in gone.items():
            hashes.reverse()  # children before their parents
            removed = BlockRemoved(block_hashes=hashes)
            self.indexer.apply(KvEvent(worker_id=wid, event_id=self._next_id(wid), data=removed))

    def _next_id(self, worker_id: str) -> int:
        n = self._approx_ids.get(worker_id, 0) + 1
        self._approx_ids[worker_id] = n
        return n

    # -- stats ----------------------------------------------------------------------------

    def stats(self) -> KvRouterStats:
        lat = sorted(self._latencies)
        idx = self.indexer
        return KvRouterStats(
            routed=self._routed,
            request_blocks=self._request_blocks,
            matched_blocks=self._matched_blocks,
            session_hits=self._session_hits,
            decisions=self._decisions,
            hashing_s=self._hashing_s,
            matching_s=self._matching_s,
            selection_s=self._selection_s,
            decision_p50_s=_percentile(lat, 0.50),
            decision_p99_s=_percentile(lat, 0.99),
            kv_events=self._kv_events,
            indexer_blocks=idx.num_blocks,
            indexer_entries=idx.num_entries,
            indexer_bytes=idx.approx_bytes(),
            approx_entries=len(self._approx),
        )


def _percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]
