"""Session affinity: requests with the same ``X-Session-Id`` go to the same worker.

A conversation's next turn repeats its whole history, so the worker that served
the last turn holds most of the prompt in its KV cache. `SessionAffinity` is the
bookkeeping (session -> worker, with a TTL refreshed on each request); any policy
can use it, and `SessionAffinityRouter` wraps any `Router` with it.

A sticky worker is given up when it is gone, when the session has been idle
longer than the TTL, or when the worker is overloaded (`is_overloaded`): then
the wrapped policy decides and the session moves to its choice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from dynamo_gateway.clock import now as clock_now
from dynamo_gateway.protocol.kv_events import KvEvent
from dynamo_gateway.router.base import Router, RouteRequest, WorkerView

__all__ = ["SessionAffinity", "SessionAffinityRouter", "is_overloaded"]

# A worker this full would have to evict or preempt to admit one more request, and
# one with this many queued requests makes a sticky request wait longer than the
# prefill it saves; past either, a session moves (the cache it leaves behind is
# usually cheaper to recompute than the wait).
OVERLOAD_KV_USAGE = 0.95
OVERLOAD_WAITING = 32


def is_overloaded(view: WorkerView) -> bool:
    """Whether affinity should give way to the policy for this worker (its own report)."""
    load = view.load
    return load.kv_usage >= OVERLOAD_KV_USAGE or load.waiting_requests >= OVERLOAD_WAITING


class SessionAffinity:
    """session id -> (worker id, expiry). Entries expire lazily, oldest first.

    `ttl_s` is the idle time after which a session forgets its worker (0 turns
    affinity off); `max_sessions` bounds memory (the least recently used go first).
    """

    def __init__(
        self,
        ttl_s: float,
        *,
        clock: Callable[[], float] = clock_now,
        max_sessions: int = 100_000,
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._max = max_sessions
        # Least recently used first; with one TTL that is also expiry order.
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def _expire(self, now: float) -> None:
        sessions = self._sessions
        while sessions:
            key = next(iter(sessions))
            if sessions[key][1] > now:
                break
            del sessions[key]

    def lookup(self, session_id: str | None, workers: Sequence[WorkerView]) -> WorkerView | None:
        """The session's worker, if it is known, fresh and among `workers`."""
        if session_id is None or self.ttl_s <= 0:
            return None
        self._expire(self._clock())
        entry = self._sessions.get(session_id)
        if entry is None:
            return None
        for view in workers:
            if view.worker_id == entry[0]:
                return view
        return None

    def record(self, session_id: str | None, worker_id: str) -> None:
        """The session's request went to `worker_id`; its TTL starts again."""
        if session_id is None or self.ttl_s <= 0:
            return
        sessions = self._sessions
        sessions[session_id] = (worker_id, self._clock() + self.ttl_s)
        sessions.move_to_end(session_id)
        while len(sessions) > self._max:
            sessions.popitem(last=False)

    def forget_worker(self, worker_id: str) -> None:
        for sid in [s for s, (w, _) in self._sessions.items() if w == worker_id]:
            del self._sessions[sid]

    def __len__(self) -> int:
        return len(self._sessions)


class SessionAffinityRouter:
    """Any policy, with session affinity in front of it."""

    def __init__(self, inner: Router, affinity: SessionAffinity) -> None:
        self.inner = inner
        self.affinity = affinity
        self.uses_load = True  # `is_overloaded` reads the workers' reports
        self.hits = 0  # decisions made by affinity

    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView:
        view = self.affinity.lookup(request.session_id, workers)
        if view is not None and not is_overloaded(view):
            self.hits += 1
            return view
        return self.inner.select(request, workers)

    def on_routed(self, request: RouteRequest, worker: WorkerView) -> None:
        self.affinity.record(request.session_id, worker.worker_id)
        self.inner.on_routed(request, worker)

    def on_first_token(self, request_id: str) -> None:
        self.inner.on_first_token(request_id)

    def on_finished(self, request_id: str) -> None:
        self.inner.on_finished(request_id)

    def on_kv_event(self, event: KvEvent) -> None:
        self.inner.on_kv_event(event)

    def remove_worker(self, worker_id: str) -> None:
        self.affinity.forget_worker(worker_id)
        self.inner.remove_worker(worker_id)
