"""Pure admission decisions: token buckets for rates, a fair queue for slots.

Nothing here reads a clock, sleeps or touches a socket: callers pass `now`
(seconds on any monotonic clock) and get plain answers back, so the policies
are unit-tested step by step (tests/frontend/test_tenants.py). The async
wiring lives in `dynamo_gateway.frontend.tenants`.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Arrival", "FairQueue", "TokenBucket", "retry_after_s"]

W = TypeVar("W")


def retry_after_s(seconds: float) -> int:
    """A Retry-After header value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(seconds - 1e-9))


class TokenBucket:
    """`rate` units per second refill a bucket of at most `burst` units.

    Requests take a unit when they are admitted (`take`). Tokens are charged
    when they become known (`charge`), after admission, so the level may go
    negative: the bucket is then in debt and `ready_in` says how long until it
    holds `amount` again. A full bucket at start lets a tenant use a whole
    minute's allowance in a burst, as OpenAI's per-minute limits do.
    """

    __slots__ = ("burst", "level", "rate", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.stamp = now

    @classmethod
    def per_minute(cls, limit: float, now: float) -> TokenBucket:
        return cls(limit / 60.0, limit, now)

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def ready_in(self, amount: float, now: float) -> float:
        """Seconds until the bucket holds `amount` (0.0: it does now)."""
        self._refill(now)
        missing = min(amount, self.burst) - self.level
        return 0.0 if missing <= 0 else missing / self.rate

    def take(self, amount: float, now: float) -> float:
        """Take `amount` if it is there and return 0.0; else take nothing and
        return the seconds until it would be."""
        wait = self.ready_in(amount, now)
        if wait == 0.0:
            self.level -= amount
        return wait

    def charge(self, amount: float, now: float) -> None:
        """Take `amount` unconditionally (usage learnt after admission)."""
        self._refill(now)
        self.level -= amount

    def available(self, now: float) -> float:
        self._refill(now)
        return self.level

    def update(self, rate: float, burst: float, now: float) -> None:
        """New limits (a reload), keeping what was used so far."""
        self._refill(now)
        used = self.burst - self.level
        self.rate, self.burst = rate, burst
        self.level = burst - used


class Arrival(enum.Enum):
    ADMITTED = "admitted"  # a slot is free: run now
    QUEUED = "queued"  # wait in the tenant's queue for a `release` to grant a slot
    FULL = "full"  # the tenant's queue is at its bound: reject


@dataclass
class _Tenant(Generic[W]):
    inflight: int = 0
    waiting: deque[W] = field(default_factory=deque)
    max_concurrent: int | None = None
    weight: int = 1
    credit: int = 0  # grants left in its current round-robin turn


class FairQueue(Generic[W]):
    """At most `capacity` requests in flight; the rest wait in per-tenant queues.

    NOTE on the algorithm: weighted round robin over the tenants that have
    waiters. A freed slot goes to the first tenant in the ring that may run
    one more request (under its own `max_concurrent`); that tenant keeps the
    head of the ring for `weight` grants, then moves to the back. A tenant that
    floods the gateway therefore fills only its own queue: every other tenant
    with a waiter is served within one turn of the ring. Within a tenant,
    requests are served first come first served. A new request runs at once
    only if a slot is free, its tenant is under its limit and has nobody
    waiting (no overtaking its own queue). `max_queue` bounds each queue;
    `0` rejects at once, the behaviour of a plain admission limit.

    Waiters are opaque tokens (`W`, hashable) that the caller maps to whatever
    it wakes up; `release` and `set_policy` return the waiters they granted.
    """

    def __init__(self, capacity: int, max_queue: int) -> None:
        if capacity < 1 or max_queue < 0:
            raise ValueError("capacity must be >= 1 and max_queue >= 0")
        self.capacity = capacity
        self.max_queue = max_queue
        self.inflight = 0
        self._tenants: dict[str, _Tenant[W]] = {}
        self._ring: deque[str] = deque()  # tenants with waiters, next to serve first

    def _state(self, tenant: str) -> _Tenant[W]:
        st = self._tenants.get(tenant)
        if st is None:
            st = self._tenants[tenant] = _Tenant()
        return st

    def set_policy(self, tenant: str, max_concurrent: int | None, weight: int = 1) -> list[W]:
        """A tenant's own concurrency limit and share; returns waiters a raised limit admits."""
        st = self._state(tenant)
        st.max_concurrent = max_concurrent
        st.weight = max(1, weight)
        return self._dispatch()

    def arrive(self, tenant: str, waiter: W) -> Arrival:
        st = self._state(tenant)
        if not st.waiting and self.inflight < self.capacity and self._eligible(st):
            st.inflight += 1
            self.inflight += 1
            return Arrival.ADMITTED
        if len(st.waiting) >= self.max_queue:
            return Arrival.FULL
        if not st.waiting:
            self._ring.append(tenant)
            st.credit = st.weight
        st.waiting.append(waiter)
        return Arrival.QUEUED

    def release(self, tenant: str) -> list[W]:
        """A request of `tenant` finished; returns the waiters granted its slot."""
        st = self._tenants[tenant]
        if st.inflight <= 0 or self.inflight <= 0:
            raise RuntimeError(f"release without a request in flight for {tenant!r}")
        st.inflight -= 1
        self.inflight -= 1
        return self._dispatch()

    def cancel(self, tenant: str, waiter: W) -> bool:
        """Withdraw a waiter (it gave up). False if it was granted a slot already:
        the caller then owns that slot and must `release` it."""
        st = self._tenants.get(tenant)
        if st is None or waiter not in st.waiting:
            return False
        st.waiting.remove(waiter)
        if not st.waiting:
            self._ring.remove(tenant)
        return True

    def inflight_of(self, tenant: str) -> int:
        st = self._tenants.get(tenant)
        return st.inflight if st is not None else 0

    def queued_of(self, tenant: str) -> int:
        st = self._tenants.get(tenant)
        return len(st.waiting) if st is not None else 0

    @property
    def queued(self) -> int:
        return sum(len(st.waiting) for st in self._tenants.values())

    @staticmethod
    def _eligible(st: _Tenant[W]) -> bool:
        return st.max_concurrent is None or st.inflight < st.max_concurrent

    def _dispatch(self) -> list[W]:
        granted: list[W] = []
        while self.inflight < self.capacity and self._ring:
            # Tenants at their own limit cannot take this slot: pass them by.
            for _ in range(len(self._ring)):
                if self._eligible(self._tenants[self._ring[0]]):
                    break
                self._ring.rotate(-1)
            else:
                break
            name = self._ring[0]
            st = self._tenants[name]
            granted.append(st.waiting.popleft())
            st.inflight += 1
            self.inflight += 1
            st.credit -= 1
            if not st.waiting:
                self._ring.popleft()
            elif st.credit <= 0:
                self._ring.rotate(-1)
                st.credit = st.weight
        return granted
