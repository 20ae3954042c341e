"""Load-only routing policies: round_robin, random, least_loaded."""

from __future__ import annotations

import random
from collections.abc import Sequence

from dynamo_gateway.router.base import NoWorkerError, RouterBase, RouteRequest, WorkerView


def _check(workers: Sequence[WorkerView]) -> None:
    if not workers:
        raise NoWorkerError("no worker to route to")


class RoundRobinRouter(RouterBase):
    """Cycle through the workers in the order the pool lists them."""

    uses_load = False

    def __init__(self) -> None:
        self._next = 0

    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView:
        _check(workers)
        worker = workers[self._next % len(workers)]
        self._next = (self._next + 1) % len(workers)
        return worker


class RandomRouter(RouterBase):
    """Pick uniformly at random; `seed` makes the sequence reproducible."""

    uses_load = False

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView:
        _check(workers)
        return workers[self._rng.randrange(len(workers))]


class LeastLoadedRouter(RouterBase):
    """Pick the worker with the fewest outstanding requests.

    Outstanding = requests this frontend has in flight there, or what the
    engine reports as running + waiting if that is higher (other frontends
    share the worker). Ties go to lower KV usage, then rotate so that an idle
    fleet is filled evenly rather than worker 0 first.
    """

    def __init__(self) -> None:
        self._rotate = 0

    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView:
        _check(workers)
        n = len(workers)
        start = self._rotate % n
        self._rotate += 1
        best = workers[start]
        best_key = _load_key(best)
        for i in range(1, n):
            w = workers[(start + i) % n]
            key = _load_key(w)
            if key < best_key:
                best, best_key = w, key
        return best


def _load_key(w: WorkerView) -> tuple[int, float]:
    reported = w.load.active_requests + w.load.waiting_requests
    return (max(w.inflight, reported), w.load.kv_usage)
