"""The load-only routing policies, on hand-built worker views."""

from __future__ import annotations

from collections import Counter

import pytest

from dynamo_gateway.protocol.engine import LoadMetrics
from dynamo_gateway.router.base import NoWorkerError, RouteRequest, WorkerView
from dynamo_gateway.router.policies import LeastLoadedRouter, RandomRouter, RoundRobinRouter

REQ = RouteRequest("r", [1, 2, 3])


def _workers(n: int) -> list[WorkerView]:
    return [WorkerView(f"w{i}") for i in range(n)]


def test_round_robin_cycles_in_order() -> None:
    router = RoundRobinRouter()
    workers = _workers(3)
    picks = [router.select(REQ, workers).worker_id for _ in range(7)]
    assert picks == ["w0", "w1", "w2", "w0", "w1", "w2", "w0"]


def test_round_robin_survives_a_shrinking_pool() -> None:
    router = RoundRobinRouter()
    router.select(REQ, _workers(5))
    router.select(REQ, _workers(5))
    assert router.select(REQ, _workers(2)).worker_id in {"w0", "w1"}


def test_random_is_roughly_uniform_and_seedable() -> None:
    workers = _workers(4)
    counts = Counter(RandomRouter(seed=1).select(REQ, workers).worker_id for _ in range(1))
    assert sum(counts.values()) == 1
    router = RandomRouter(seed=42)
    counts = Counter(router.select(REQ, workers).worker_id for _ in range(4000))
    assert set(counts) == {"w0", "w1", "w2", "w3"}
    assert all(800 < c < 1200 for c in counts.values())
    a = [RandomRouter(seed=5).select(REQ, workers).worker_id for _ in range(3)]
    b = [RandomRouter(seed=5).select(REQ, workers).worker_id for _ in range(3)]
    assert a == b


def test_least_loaded_prefers_fewest_outstanding() -> None:
    workers = _workers(3)
    workers[0].inflight = 5
    workers[1].inflight = 1
    workers[2].inflight = 3
    assert LeastLoadedRouter().select(REQ, workers).worker_id == "w1"


def test_least_loaded_uses_reported_load_when_higher() -> None:
    workers = _workers(2)
    workers[0].load = LoadMetrics(active_requests=4, waiting_requests=4)  # other frontends
    workers[1].inflight = 2
    assert LeastLoadedRouter().select(REQ, workers).worker_id == "w1"


def test_least_loaded_breaks_ties_on_kv_usage_then_rotates() -> None:
    workers = _workers(2)
    workers[0].load = LoadMetrics(kv_blocks_used=90, kv_blocks_total=100)
    workers[1].load = LoadMetrics(kv_blocks_used=10, kv_blocks_total=100)
    assert LeastLoadedRouter().select(REQ, workers).worker_id == "w1"
    idle = _workers(3)
    router = LeastLoadedRouter()
    assert {router.select(REQ, idle).worker_id for _ in range(3)} == {"w0", "w1", "w2"}


@pytest.mark.parametrize("router", [RoundRobinRouter(), RandomRouter(), LeastLoadedRouter()])
def test_empty_pool_raises(router: RoundRobinRouter) -> None:
    with pytest.raises(NoWorkerError):
        router.select(REQ, [])


class _CountingWorker:
    """A pool worker that counts load refreshes (routing never sends it anything)."""

    def __init__(self, worker_id: str) -> None:
        from dynamo_gateway.runtime.discovery import WorkerRecord

        self.record = WorkerRecord(worker_id=worker_id, model="m", model_path="/", address="x")
        self.view = WorkerView(worker_id)
        self.refreshes = 0

    def refresh_load(self) -> None:
        self.refreshes += 1


@pytest.mark.parametrize(
    ("router", "refreshed"),
    [(RoundRobinRouter(), False), (RandomRouter(), False), (LeastLoadedRouter(), True)],
)
def test_pool_refreshes_load_only_for_load_aware_policies(
    router: RoundRobinRouter, refreshed: bool
) -> None:
    from pathlib import Path

    from dynamo_gateway.models.card import ModelCard
    from dynamo_gateway.runtime.pool import ModelPool

    card = ModelCard(Path("/"), "m", max_model_len=8, vocab_size=8, eos_token_ids=())
    pool = ModelPool(card, tokenizer=None, chat_template=None, router=router)  # type: ignore[arg-type]
    workers = [_CountingWorker(f"w{i}") for i in range(3)]
    for w in workers:
        pool.add(w)  # type: ignore[arg-type]
    for _ in range(4):
        pool.select(REQ)
    assert all((w.refreshes == 4) is refreshed for w in workers)
