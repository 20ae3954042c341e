"""The `kv` router: cost choices, load bookkeeping, approximate mode, session affinity."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.protocol.engine import LoadMetrics
from dynamo_gateway.protocol.kv_events import AllBlocksCleared, BlockStored, KvEvent
from dynamo_gateway.router.base import NoWorkerError, Router, RouteRequest, WorkerView
from dynamo_gateway.router.kv import KvRouter, WorkerState, choose_worker, worker_costs
from dynamo_gateway.router.kv_load import LoadTracker
from dynamo_gateway.router.policies import RoundRobinRouter
from dynamo_gateway.router.session import SessionAffinity, SessionAffinityRouter
from dynamo_gateway.settings import KvRouterSettings

BS = 4  # block size of these tests


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tokens(n_blocks: int, start: int = 0, tail: int = 0) -> list[int]:
    return list(range(start, start + n_blocks * BS + tail))


def _stored(worker: str, tokens: list[int], event_id: int = 1) -> KvEvent:
    hashes = sequence_hashes(tokens, BS)
    return KvEvent(
        worker_id=worker,
        event_id=event_id,
        data=BlockStored(
            block_hashes=hashes,
            parent_block_hash=None,
            token_ids=tokens[: len(hashes) * BS],
            block_size=BS,
        ),
    )


def _router(clock: FakeClock | None = None, seed: int = 0, **settings: object) -> KvRouter:
    return KvRouter(
        BS,
        KvRouterSettings.model_validate(settings),
        clock=clock or FakeClock(),
        rng=random.Random(seed),
    )


def _views(n: int) -> list[WorkerView]:
    return [WorkerView(f"w{i}", block_size=BS) for i in range(n)]


def _state(
    wid: str, overlap: int = 0, prefill: float = 0, active: float = 0, new: int = 4
) -> WorkerState:
    return WorkerState(wid, overlap, prefill, active, new)


# -- pure cost and choice ------------------------------------------------------------------


def test_cost_is_dynamos_formula() -> None:
    [c] = worker_costs(
        [_state("a", overlap=2, prefill=8, active=10, new=2)],
        request_tokens=16,
        block_size=BS,
        overlap_weight=2.0,
    )
    # prefill = (8 queued + 16 - 2*4 new) / 4 = 4 blocks; decode = 10 + 2
    assert (c.prefill_blocks, c.decode_blocks, c.cost) == (4.0, 12.0, 2.0 * 4 + 12)


def test_overlap_wins_when_loads_are_equal() -> None:
    states = [_state("a", overlap=1), _state("b", overlap=3), _state("c", overlap=0)]
    costs = worker_costs(states, request_tokens=16, block_size=BS)
    assert choose_worker(states, costs) == 1


def test_load_wins_when_overlap_is_equal() -> None:
    states = [_state("a", overlap=2, active=30), _state("b", overlap=2, active=5)]
    costs = worker_costs(states, request_tokens=16, block_size=BS)
    assert choose_worker(states, costs) == 1
    states = [_state("a", prefill=40), _state("b", prefill=4)]
    costs = worker_costs(states, request_tokens=16, block_size=BS)
    assert choose_worker(states, costs) == 1


def test_overlap_weight_changes_the_choice() -> None:
    # a: 3 of 4 blocks cached but busy; b: nothing cached, idle.
    states = [_state("a", overlap=3, active=8, new=1), _state("b", overlap=0, active=0)]

    def pick(weight: float) -> str:
        costs = worker_costs(states, request_tokens=16, block_size=BS, overlap_weight=weight)
        return states[choose_worker(states, costs)].worker_id

    assert pick(1.0) == "b"  # a: 1 + 9 = 10, b: 4 + 4 = 8
    assert pick(4.0) == "a"  # a: 4 + 9 = 13, b: 16 + 4 = 20


def test_ties_go_to_lower_kv_usage_then_random() -> None:
    states = [WorkerState("a", 0, 0, 0, 4, 0.5), WorkerState("b", 0, 0, 0, 4, 0.1)]
    costs = worker_costs(states, request_tokens=16, block_size=BS)
    assert choose_worker(states, costs) == 1
    even = [_state("a"), _state("b"), _state("c")]
    costs = worker_costs(even, request_tokens=16, block_size=BS)
    rng = random.Random(7)
    picks = Counter(choose_worker(even, costs, rng=rng) for _ in range(300))
    assert set(picks) == {0, 1, 2}


def test_temperature_samples_cheaper_workers_more_often() -> None:
    states = [_state("a", active=0), _state("b", active=10), _state("c", active=20)]
    costs = worker_costs(states, request_tokens=16, block_size=BS)
    rng = random.Random(1234)
    picks = Counter(choose_worker(states, costs, temperature=0.5, rng=rng) for _ in range(4000))
    # Normalized costs 0, .5, 1 -> weights 1, e^-1, e^-2 -> p = .665, .245, .090
    assert picks[0] > picks[1] > picks[2] > 0
    assert abs(picks[0] / 4000 - 0.665) < 0.03
    assert abs(picks[2] / 4000 - 0.090) < 0.02
    # Same seed, same draws.
    again = random.Random(1234)
    assert [choose_worker(states, costs, temperature=0.5, rng=again) for _ in range(20)] == [
        choose_worker(states, costs, temperature=0.5, rng=r)
        for r in [random.Random(1234)]
        for _ in range(20)
    ]


def test_imbalance_guard_drops_overloaded_candidates() -> None:
    # a holds the whole prefix but is far busier than b.
    states = [_state("a", overlap=4, active=100, new=0), _state("b", overlap=0, active=10)]
    costs = worker_costs(states, request_tokens=16, block_size=BS, overlap_weight=50)
    assert choose_worker(states, costs) == 0
    assert choose_worker(states, costs, max_imbalance_blocks=50) == 1
    assert choose_worker(states, costs, max_imbalance_blocks=100) == 0


def test_choose_with_no_worker_raises() -> None:
    with pytest.raises(NoWorkerError):
        choose_worker([], [])


# -- load tracker ---------------------------------------------------------------------------


def test_tracker_route_first_token_finish() -> None:
    t = LoadTracker(BS)
    tokens = _tokens(3, tail=2)  # 3 full blocks + a partial one
    t.add("r1", "w0", sequence_hashes(tokens, BS), len(tokens), prefill_tokens=10)
    assert t.prefill_tokens("w0") == 10 and t.active_blocks("w0") == 4
    t.prefill_done("r1")
    assert t.prefill_tokens("w0") == 0 and t.active_blocks("w0") == 4
    t.prefill_done("r1")  # twice: no effect
    assert t.prefill_tokens("w0") == 0
    t.remove("r1")
    assert t.active_blocks("w0") == 0 and t.requests("w0") == 0 and len(t) == 0
    t.remove("r1")  # idempotent
    t.remove("never-seen")
    assert t.prefill_tokens("w0") == 0


def test_tracker_counts_shared_prefix_blocks_once() -> None:
    t = LoadTracker(BS)
    a = [*_tokens(4), 900, 901, 902, 903]
    b = [*_tokens(4), 800, 801, 802, 803]
    t.add("a", "w0", sequence_hashes(a, BS), len(a), len(a))
    assert t.new_blocks("w0", sequence_hashes(b, BS), len(b)) == 1
    t.add("b", "w0", sequence_hashes(b, BS), len(b), 4)
    assert t.active_blocks("w0") == 4 + 1 + 1
    assert t.prefill_tokens("w0") == len(a) + 4
    t.remove("a")
    assert t.active_blocks("w0") == 5  # b still holds the shared prefix
    t.remove("b")
    assert t.active_blocks("w0") == 0


def test_tracker_migration_moves_the_request() -> None:
    t = LoadTracker(BS)
    tokens = _tokens(2)
    hashes = sequence_hashes(tokens, BS)
    t.add("r", "w0", hashes, len(tokens), 8)
    # The pool's migration: finished on the old worker, routed again on the new one.
    t.remove("r")
    t.add("r", "w1", hashes, len(tokens), 8)
    assert (t.active_blocks("w0"), t.active_blocks("w1")) == (0, 2)
    # A re-route without a finish moves it too.
    t.add("r", "w2", hashes, len(tokens), 0)
    assert (t.active_blocks("w1"), t.active_blocks("w2")) == (0, 2)
    assert t.worker_of("r") == "w2" and len(t) == 1


def test_tracker_remove_worker_then_late_callbacks() -> None:
    t = LoadTracker(BS)
    t.add("r", "w0", [1, 2], 8, 8)
    t.remove_worker("w0")
    assert t.active_blocks("w0") == 0 and len(t) == 0
    t.prefill_done("r")
    t.remove("r")


# -- the router: indexer, load, lifecycle -----------------------------------------------


def test_kv_router_satisfies_the_protocol() -> None:
    assert isinstance(_router(), Router)


def test_kv_events_change_the_choice() -> None:
    router = _router()
    views = _views(3)
    prompt = _tokens(8, tail=1)
    router.on_kv_event(_stored("w2", prompt[:24]))  # 6 of its 8 blocks
    router.on_kv_event(_stored("w1", prompt[:8]))  # 2 of them
    assert router.select(RouteRequest("r", prompt), views).worker_id == "w2"


def test_all_blocks_cleared_forgets_a_worker() -> None:
    router = _router(seed=3)
    views = _views(2)
    prompt = _tokens(8)
    router.on_kv_event(_stored("w1", prompt))
    assert router.select(RouteRequest("r", prompt), views).worker_id == "w1"
    router.on_kv_event(KvEvent(worker_id="w1", event_id=2, data=AllBlocksCleared()))
    router.on_kv_event(_stored("w0", prompt[:16], event_id=1))
    assert router.select(RouteRequest("r", prompt), views).worker_id == "w0"


def test_routed_load_spreads_requests_without_overlap() -> None:
    router = _router()
    views = _views(2)
    seen = []
    for i in range(4):
        req = RouteRequest(f"r{i}", _tokens(4, start=1000 * (i + 1)))
        view = router.select(req, views)
        router.on_routed(req, view)
        seen.append(view.worker_id)
    assert Counter(seen) == {"w0": 2, "w1": 2}
    for i in range(4):
        router.on_first_token(f"r{i}")
        router.on_finished(f"r{i}")
        router.on_finished(f"r{i}")
    assert len(router.load) == 0


def test_reported_load_counts_when_higher() -> None:
    router = _router()
    views = _views(2)
    views[0].load = LoadMetrics(kv_blocks_used=500, kv_blocks_total=1000)
    assert router.select(RouteRequest("r", _tokens(4)), views).worker_id == "w1"


def test_stats_hit_rate_and_latency() -> None:
    router = _router()
    views = _views(2)
    prompt = _tokens(4)
    router.on_kv_event(_stored("w0", prompt[:8]))
    req = RouteRequest("r", prompt)
    view = router.select(req, views)
    router.on_routed(req, view)
    stats = router.stats()
    assert view.worker_id == "w0"
    assert (stats.routed, stats.request_blocks, stats.matched_blocks) == (1, 4, 2)
    assert stats.hit_rate == 0.5
    assert stats.decisions == 1 and stats.decision_p99_s >= stats.decision_p50_s > 0
    assert stats.hashing_s > 0 and stats.kv_events == 1
    assert stats.indexer_blocks >= 2 and stats.indexer_bytes > 0


def test_remove_worker_forgets_index_and_load() -> None:
    router = _router()
    views = _views(2)
    prompt = _tokens(4)
    router.on_kv_event(_stored("w0", prompt))
    req = RouteRequest("r", prompt)
    router.on_routed(req, views[0])
    router.remove_worker("w0")
    assert router.load.active_blocks("w0") == 0
    assert router.indexer.find_matches(sequence_hashes(prompt, BS)).get("w0", 0) == 0
    router.on_finished("r")  # late: no error


# -- approximate mode -------------------------------------------------------------------


def test_approximate_mode_remembers_routes_until_the_ttl() -> None:
    clock = FakeClock()
    router = _router(clock, use_kv_events=False, approx_ttl_s=60)
    views = _views(2)
    prompt = _tokens(8)
    first = RouteRequest("a", [*prompt, 1, 2, 3, 4])
    chosen = router.select(first, views)
    router.on_routed(first, chosen)
    router.on_first_token("a")
    router.on_finished("a")
    # Events are ignored in this mode.
    other = next(v for v in views if v is not chosen)
    router.on_kv_event(_stored(other.worker_id, prompt))
    clock.now += 30
    second = RouteRequest("b", [*prompt, 5, 6, 7, 8])
    assert router.select(second, views) is chosen
    clock.now += 31  # past the first route's TTL
    assert router.stats().approx_entries == 9
    router.select(second, views)
    assert router.stats().approx_entries == 0
    assert router.indexer.find_matches(sequence_hashes(prompt, BS)) == {} or all(
        n == 0 for n in router.indexer.find_matches(sequence_hashes(prompt, BS)).values()
    )


def test_approximate_mode_refreshes_shared_prefixes() -> None:
    clock = FakeClock()
    router = _router(clock, use_kv_events=False, approx_ttl_s=60)
    views = _views(1)
    prompt = _tokens(4)
    router.on_routed(RouteRequest("a", [*prompt, *_tokens(1, 50)]), views[0])
    clock.now += 50
    router.on_routed(RouteRequest("b", [*prompt, *_tokens(1, 60)]), views[0])
    clock.now += 20  # a's own block expired, the shared prefix was refreshed by b
    router.select(RouteRequest("c", prompt), views)
    matches = router.indexer.find_matches(sequence_hashes(prompt, BS))
    assert matches.get("w0") == 4
    assert router.stats().approx_entries == 5


# -- session affinity ------------------------------------------------------------------


def test_session_sticks_even_against_the_cost() -> None:
    router = _router()
    views = _views(2)
    first = RouteRequest("a", _tokens(4), session_id="s1")
    router.on_routed(first, views[1])
    # w1 is busier now, so the cost alone would pick w0.
    nxt = RouteRequest("b", _tokens(4, start=500), session_id="s1")
    assert router.select(nxt, views).worker_id == "w1"
    assert router.select(RouteRequest("c", nxt.token_ids), views).worker_id == "w0"
    assert router.stats().session_hits == 1


def test_session_expires_after_its_ttl() -> None:
    clock = FakeClock()
    router = _router(clock, session_ttl_s=10)
    views = _views(2)
    router.on_routed(RouteRequest("a", _tokens(4), session_id="s"), views[1])
    clock.now += 11
    assert router.select(RouteRequest("b", _tokens(4, 99), session_id="s"), views).worker_id == "w0"


def test_session_falls_back_when_its_worker_is_gone_or_overloaded() -> None:
    router = _router()
    views = _views(3)
    router.on_routed(RouteRequest("a", _tokens(4), session_id="s"), views[2])
    req = RouteRequest("b", _tokens(4, 99), session_id="s")
    assert router.select(req, views[:2]).worker_id != "w2"
    views[2].load = LoadMetrics(kv_blocks_used=99, kv_blocks_total=100)
    assert router.select(req, views).worker_id != "w2"
    router.remove_worker("w2")
    views[2].load = LoadMetrics()
    assert router.select(req, views).worker_id == "w0"


def test_session_affinity_wraps_other_policies() -> None:
    clock = FakeClock()
    router = SessionAffinityRouter(RoundRobinRouter(), SessionAffinity(60, clock=clock))
    assert isinstance(router, Router)
    views = _views(3)
    picks = []
    for i in range(4):
        req = RouteRequest(f"r{i}", [1], session_id="s")
        view = router.select(req, views)
        router.on_routed(req, view)
        picks.append(view.worker_id)
    assert picks == ["w0"] * 4
    assert router.select(RouteRequest("x", [1]), views).worker_id == "w1"


def test_session_affinity_bounds_its_memory() -> None:
    aff = SessionAffinity(60, clock=FakeClock(), max_sessions=2)
    for s in "abc":
        aff.record(s, "w0")
    assert len(aff) == 2 and aff.lookup("a", _views(1)) is None
