"""The shared scheduler on plain data: admission, chunking, preemption, prefix hits, aborts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_gateway.engines.scheduler import (
    KvEventPublisher,
    Scheduler,
    Seq,
    SeqStatus,
    StepPlan,
)
from dynamo_gateway.kv.block_manager import BlockManager
from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.protocol.engine import FinishReason, TokenLogprob
from dynamo_gateway.protocol.kv_events import BlockRemoved, BlockStored, KvEvent

BS = 4


def make(
    num_blocks: int = 64,
    *,
    max_num_seqs: int = 8,
    budget: int = 64,
    max_model_len: int = 1024,
    block_size: int = BS,
) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks, block_size),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
    )


def seq(seq_id: str, n: int, max_new: int = 4, *, base: int = 0) -> Seq:
    return Seq(seq_id, [base + i for i in range(n)], max_new)


def next_token(s: Seq) -> int:
    """A deterministic 'model': the next token is a function of the sequence so far."""
    return 1000 + (sum(s.tokens) * 31 + len(s.tokens)) % 97


def step(sched: Scheduler, token: Callable[[Seq], int] = next_token) -> StepPlan:
    plan = sched.schedule()
    sched.complete(plan, [token(s) for s in plan.sampling])
    return plan


def chunks(plan: StepPlan) -> dict[str, int]:
    return {s.seq_id: s.chunk for s in plan.seqs}


def run_to_end(sched: Scheduler, max_steps: int = 10_000) -> int:
    steps = 0
    while sched.has_work:
        step(sched)
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return steps


# -- admission and budget ------------------------------------------------------------------


def test_admission_is_fifo_and_capped_by_max_num_seqs() -> None:
    sched = make(max_num_seqs=2)
    a, b, c = seq("a", 5, 2), seq("b", 5, 4, base=20), seq("c", 5, 2, base=40)
    for s in (a, b, c):
        assert sched.add(s)
    plan = sched.schedule()
    assert [s.seq_id for s in plan.seqs] == ["a", "b"]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    assert c.status is SeqStatus.WAITING
    sched.complete(plan, [7, 8])
    plan = step(sched)  # a gets its 2nd token and finishes; c still waits for the slot
    assert a.status is SeqStatus.FINISHED and a.finish_reason is FinishReason.LENGTH
    assert "c" not in chunks(plan)
    plan = step(sched)
    assert chunks(plan) == {"b": 1, "c": 5}


def test_prefill_is_chunked_under_the_token_budget() -> None:
    sched = make(budget=16)
    a, b = seq("a", 40, 3), seq("b", 10, 3, base=500)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert chunks(plan) == {"a": 16}  # the budget is spent, b waits
    assert plan.sampling == [] and plan.prefill_tokens == 16
    assert a.step_tokens == a.tokens[:16] and a.start_pos == 0
    sched.complete(plan, [])
    assert a.num_computed == 16 and len(a.tokens) == 40
    plan = step(sched)
    assert chunks(plan) == {"a": 16}
    plan = sched.schedule()
    # a's last chunk samples; b is admitted with what is left of the budget.
    assert chunks(plan) == {"a": 8, "b": 8}
    assert plan.sampling == [a]
    sched.complete(plan, [99])
    assert a.tokens[-1] == 99 and a.num_generated == 1 and not a.prefilling
    plan = sched.schedule()
    # Decodes come first, then the rest of b's prompt, which samples too.
    assert [(s.seq_id, s.chunk) for s in plan.seqs] == [("a", 1), ("b", 2)]
    assert plan.sampling == [a, b]
    assert plan.decode_blocks == len(a.kv.block_ids)
    sched.complete(plan, [1, 2])
    run_to_end(sched)
    assert a.num_generated == 3 and b.num_generated == 3


def test_budget_limits_decodes_too() -> None:
    sched = make(budget=3, max_num_seqs=8)
    seqs = [seq(f"s{i}", 2, 10, base=10 * i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    for _ in range(4):
        plan = step(sched)
        assert sum(s.chunk for s in plan.seqs) <= 3
    run_to_end(sched)
    assert all(s.num_generated == 10 for s in seqs)


def test_a_big_request_at_the_head_is_never_overtaken() -> None:
    # 12 blocks; small requests keep arriving while a big one waits for room.
    sched = make(num_blocks=12, max_num_seqs=8)
    first = [seq(f"s{i}", 8, 6, base=100 * i) for i in range(3)]
    for s in first:
        sched.add(s)
    step(sched)
    big = seq("big", 36, 2, base=5000)  # 9 blocks: must wait for the others to finish
    sched.add(big)
    later: list[Seq] = []
    for i in range(40):
        s = seq(f"late{i}", 4, 2, base=10_000 + 100 * i)
        sched.add(s)
        later.append(s)
        step(sched)
        if big.status is not SeqStatus.WAITING:
            break
        # Nobody that arrived after it is admitted before it.
        assert all(s.status is SeqStatus.WAITING for s in later)
    assert big.status is not SeqStatus.WAITING
    run_to_end(sched)
    assert big.num_generated == 2 and all(s.num_generated == 2 for s in later)


def test_add_ends_what_cannot_run() -> None:
    sched = make(num_blocks=4, max_model_len=20)
    full = seq("full", 20, 5)
    assert not sched.add(full)
    assert full.finish_reason is FinishReason.LENGTH and full.error is None
    big = seq("big", 17, 1)  # 5 blocks of 4 in a 4-block cache
    assert not sched.add(big)
    assert big.finish_reason is FinishReason.ERROR and big.error
    capped = seq("capped", 15, 100)
    assert sched.add(capped)
    assert capped.remaining == 5  # the context window caps max_tokens
    with pytest.raises(ValueError):
        sched.add(seq("capped", 3))
    with pytest.raises(ValueError):
        sched.add(capped)
    with pytest.raises(ValueError):
        sched.add(Seq("empty", [], 3))
    assert sched.get("capped") is capped and sched.get("big") is None


def test_context_window_ends_generation() -> None:
    sched = make(max_model_len=12)
    s = seq("s", 10, 100)
    sched.add(s)
    run_to_end(sched)
    assert s.num_generated == 2 and s.finish_reason is FinishReason.LENGTH


# -- stops, outputs -------------------------------------------------------------------------


def test_stop_reason_takes_precedence_over_length() -> None:
    sched = make()
    a, b = seq("a", 3, 1), seq("b", 3, 5, base=50)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    finished = sched.complete(plan, [5, 6], [FinishReason.STOP, FinishReason.STOP])
    assert finished == [a, b]
    assert a.finish_reason is b.finish_reason is FinishReason.STOP
    assert a.generated == [5] and b.generated == [6]
    assert sched.block_manager.num_used == 0
    with pytest.raises(ValueError):
        sched.complete(plan, [1])


def test_take_output_coalesces_and_reports_cached_tokens_once() -> None:
    sched = make()
    s = Seq("s", [1, 2, 3], 4, logprobs=True)
    sched.add(s)
    assert not s.has_output
    for t in (10, 11):
        plan = sched.schedule()
        assert s.logprobs is not None
        s.logprobs.append(TokenLogprob(t, -0.5))
        sched.complete(plan, [t])
    assert s.has_output
    first = s.take_output()
    assert first.token_ids == [10, 11] and first.cached_tokens == 0
    assert [lp.token_id for lp in first.logprobs or []] == [10, 11]
    assert not s.has_output
    for t in (12, 13):
        plan = sched.schedule()
        assert s.logprobs is not None
        s.logprobs.append(TokenLogprob(t, -0.5))
        sched.complete(plan, [t])
    last = s.take_output()
    assert last.token_ids == [12, 13] and last.finish_reason is FinishReason.LENGTH
    assert last.cached_tokens is None
    assert [lp.token_id for lp in last.logprobs or []] == [12, 13]


# -- aborts ---------------------------------------------------------------------------------


def test_abort_frees_blocks_and_drops_the_step_in_flight() -> None:
    sched = make()
    a, b = seq("a", 9, 10), seq("b", 6, 10, base=100)
    sched.add(a)
    sched.add(b)
    step(sched)
    plan = sched.schedule()  # in flight
    assert sched.abort("a") is a
    assert sched.abort("a") is None  # idempotent: no longer live
    assert sched.abort("unknown") is None
    assert a.finish_reason is FinishReason.ABORT and a.status is SeqStatus.FINISHED
    sched.complete(plan, [1, 2])
    assert a.num_generated == 1  # the in-flight token was dropped
    assert b.num_generated == 2
    assert sched.block_manager.num_used == len(b.kv.block_ids)
    assert not sched.finish(a, FinishReason.ERROR)
    waiting = seq("w", 3)
    sched.add(waiting)
    sched.finish(waiting, FinishReason.ABORT)
    assert sched.num_waiting == 0
    assert sched.finish_all(FinishReason.ABORT) == [b]
    assert sched.block_manager.num_used == 0 and not sched.has_work


# -- prefix cache ---------------------------------------------------------------------------


def test_prefix_hits_skip_computation_and_count_as_cached() -> None:
    sched = make()
    shared = list(range(100, 110))  # 2 full blocks + 2 tokens
    a = Seq("a", [*shared, 1], 2)
    sched.add(a)
    run_to_end(sched)
    events = sched.drain_events()
    stored = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
    assert stored[:2] == sequence_hashes(shared, BS)[:2]
    b = Seq("b", [*shared, 2, 3], 2)
    sched.add(b)
    plan = sched.schedule()
    assert b.cached_tokens == 8 and b.start_pos == 8 and b.chunk == 4
    sched.complete(plan, [0])
    # The shared blocks are not stored again.
    again = [h for e in sched.drain_events() if isinstance(e, BlockStored) for h in e.block_hashes]
    assert not set(again) & set(stored[:2])
    assert b.take_output().cached_tokens == 8


def test_eviction_emits_block_removed() -> None:
    sched = make(num_blocks=4)
    a = seq("a", 8, 1)
    sched.add(a)
    run_to_end(sched)
    sched.drain_events()
    b = seq("b", 12, 1, base=50)  # needs 3 blocks: takes a free one, then evicts a's
    sched.add(b)
    run_to_end(sched)
    events = sched.drain_events()
    assert any(isinstance(e, BlockRemoved) for e in events)


# -- preemption -----------------------------------------------------------------------------


def test_preemption_takes_the_newest_and_recomputes_it() -> None:
    # 2 sequences of 4 prompt tokens growing to 4 + 8: 3 blocks each, 5 blocks in all.
    sched = make(num_blocks=5, max_num_seqs=4)
    old, new = seq("old", 4, 8), seq("new", 4, 8, base=40)
    sched.add(old)
    sched.add(new)
    preempted_at = None
    steps = 0
    while sched.has_work:
        plan = sched.schedule()
        if plan.num_preempted and preempted_at is None:
            preempted_at = steps
            assert new.status is SeqStatus.WAITING and new.num_computed == 0
            assert sched.waiting == [new]
            assert new.num_generated > 0  # its tokens stay
            assert old in plan.seqs and new not in plan.seqs
        sched.complete(plan, [next_token(s) for s in plan.sampling])
        steps += 1
    assert preempted_at is not None
    assert sched.num_preemptions >= 1 and new.num_preemptions >= 1 and old.num_preemptions == 0
    # Recompute changes nothing: same tokens as a run without pressure.
    roomy = make()
    old2, new2 = seq("old", 4, 8), seq("new", 4, 8, base=40)
    roomy.add(old2)
    roomy.add(new2)
    run_to_end(roomy)
    assert old.tokens == old2.tokens and new.tokens == new2.tokens
    assert sched.block_manager.num_used == 0


def test_a_sequence_alone_in_a_full_cache_stops_with_length() -> None:
    sched = make(num_blocks=3)
    s = seq("s", 5, 100)
    sched.add(s)
    finished: list[Seq] = []
    while sched.has_work:
        plan = sched.schedule()
        finished += plan.finished
        sched.complete(plan, [next_token(x) for x in plan.sampling])
    assert finished == [s]
    assert s.finish_reason is FinishReason.LENGTH
    assert s.num_generated == 8  # 12 slots: 5 + 7 computed, the 8th token never fed


def test_waiting_sequence_runs_once_the_only_running_one_stops() -> None:
    sched = make(num_blocks=3)
    a, b = seq("a", 5, 100), seq("b", 4, 3, base=70)
    sched.add(a)
    sched.add(b)  # needs 1 block + 1 spare while a runs
    run_to_end(sched)
    assert a.num_generated == 8 and b.num_generated == 3


# -- events ---------------------------------------------------------------------------------


def test_kv_event_publisher_numbers_events_and_survives_a_broken_sink() -> None:
    got: list[KvEvent] = []
    calls = 0

    def sink(event: KvEvent) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("down")
        got.append(event)

    pub = KvEventPublisher("w1", sink)
    removed = BlockRemoved(block_hashes=[1])
    pub.publish([removed, removed, removed])
    assert [e.event_id for e in got] == [1, 3]
    assert {e.worker_id for e in got} == {"w1"}
    assert pub.last_event_id == 3
    silent = KvEventPublisher("w2", None)
    assert not silent.enabled
    silent.publish([removed])
    assert silent.last_event_id == 0


# -- properties -----------------------------------------------------------------------------

_workload = st.lists(
    st.tuples(
        st.integers(1, 24),  # prompt length
        st.integers(1, 12),  # max new tokens
        st.integers(0, 3),  # prompt family: shared prefixes within a family
        st.integers(0, 6),  # arrival step
        st.booleans(),  # aborted a few steps after arrival
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload=_workload,
    spare_blocks=st.integers(0, 12),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 40),
)
def test_every_sequence_completes_in_fifo_order_with_correct_kv(
    workload: list[tuple[int, int, int, int, bool]],
    spare_blocks: int,
    block_size: int,
    max_num_seqs: int,
    budget: int,
) -> None:
    # Room for the largest sequence alone, so none can hit the capacity limit.
    largest = max(p + m for p, m, *_ in workload)
    num_blocks = -(-largest // block_size) + spare_blocks
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(
        bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=4096
    )
    # The simulated KV cache: which token each slot of each block holds.
    slots: dict[tuple[int, int], int] = {}
    seqs: list[Seq] = []
    admitted: list[str] = []
    aborted: set[str] = set()
    pending = sorted(enumerate(workload), key=lambda x: x[1][3])
    t = 0
    while pending or sched.has_work:
        while pending and pending[0][1][3] <= t:
            i, (plen, max_new, family, _, abort) = pending.pop(0)
            s = Seq(f"s{i}", [family * 100 + k for k in range(plen)], max_new)
            assert sched.add(s)
            seqs.append(s)
            if abort:
                aborted.add(s.seq_id)
        plan = sched.schedule()
        assert plan.finished == []
        assert sched.num_running <= max_num_seqs
        assert sum(s.chunk for s in plan.seqs) <= budget
        assert len({id(s) for s in plan.seqs}) == len(plan.seqs)
        for s in plan.seqs:
            if s.seq_id not in admitted:
                admitted.append(s.seq_id)
            # Everything before the chunk is in the cache (computed or a prefix hit) ...
            table = s.kv.block_ids
            for pos in range(s.start_pos):
                assert slots[table[pos // block_size], pos % block_size] == s.tokens[pos]
            # ... and the chunk is written by this step.
            assert len(table) * block_size >= s.start_pos + s.chunk
            for k, tok in enumerate(s.step_tokens):
                pos = s.start_pos + k
                slots[table[pos // block_size], pos % block_size] = tok
        assert plan.sampling == [s for s in plan.seqs if s.samples]
        sched.complete(plan, [next_token(s) for s in plan.sampling])
        for s in seqs:
            if s.seq_id in aborted and s.num_generated >= 1:
                sched.abort(s.seq_id)
        t += 1
        assert t < 5000, "no progress"
    # Strict FIFO: first admissions happen in arrival order.
    order = [s.seq_id for s in seqs]
    assert admitted == [sid for sid in order if sid in admitted]
    for s in seqs:
        assert s.status is SeqStatus.FINISHED
        if s.seq_id in aborted:
            assert s.finish_reason in (FinishReason.ABORT, FinishReason.LENGTH)
        else:
            assert s.finish_reason is FinishReason.LENGTH
            assert s.num_generated == workload[int(s.seq_id[1:])][1]
    assert bm.num_used == 0
    assert all(bm.ref_count(b) == 0 for b in range(num_blocks))
