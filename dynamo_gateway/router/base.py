"""The router interface: pure decision logic over plain data.

A router only decides which worker should serve a request; it never sends the
request there. The worker pool calls `select()` with the request's token ids
and a view of every eligible worker, then reports the request's lifecycle
(`on_routed`, `on_first_token`, `on_finished`) so that routers which track load
themselves can, and feeds KV events to routers that index caches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from dynamo_gateway.protocol.engine import LoadMetrics, WorkerRole
from dynamo_gateway.protocol.kv_events import KvEvent

if TYPE_CHECKING:
    from dynamo_gateway.settings import Settings


class WorkerView:
    """One worker as a router sees it. Mutable so the pool can update it in place."""

    __slots__ = ("block_size", "inflight", "load", "role", "worker_id")

    def __init__(
        self,
        worker_id: str,
        *,
        role: WorkerRole = WorkerRole.AGGREGATED,
        block_size: int = 16,
        load: LoadMetrics | None = None,
        inflight: int = 0,
    ) -> None:
        self.worker_id = worker_id
        self.role = role
        self.block_size = block_size
        self.load = load if load is not None else LoadMetrics()
        # Requests this frontend has routed to the worker and not seen finish;
        # fresher than `load`, which is the engine's last report.
        self.inflight = inflight

    def __repr__(self) -> str:
        return f"WorkerView({self.worker_id!r}, inflight={self.inflight}, load={self.load})"


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a router may look at to place a request."""

    request_id: str
    token_ids: Sequence[int]
    session_id: str | None = None


class NoWorkerError(LookupError):
    """`select()` was called with no eligible worker."""


@runtime_checkable
class Router(Protocol):
    """A routing policy for one model's worker pool."""

    def select(self, request: RouteRequest, workers: Sequence[WorkerView]) -> WorkerView:
        """Pick one of `workers` (never empty) for `request`."""
        ...

    def on_routed(self, request: RouteRequest, worker: WorkerView) -> None:
        """The request was sent to `worker`."""

    def on_first_token(self, request_id: str) -> None:
        """The request's prefill is done (its first token came back)."""

    def on_finished(self, request_id: str) -> None:
        """The request ended (any reason), or moved to another worker."""

    def on_kv_event(self, event: KvEvent) -> None:
        """A worker stored or removed KV blocks."""

    def remove_worker(self, worker_id: str) -> None:
        """The worker left; forget everything about it."""


@dataclass(frozen=True)
class RouterContext:
    """What a router factory receives."""

    settings: Settings
    model_name: str
    block_size: int


RouterFactory = Callable[[RouterContext], Router]


class RouterBase:
    """No-op lifecycle callbacks, so simple policies only write `select()`."""

    # Whether `select()` reads `WorkerView.load`. The pool refreshes every worker's
    # load before each decision only for routers that do (a router without this
    # attribute is assumed to).
    uses_load: bool = True

    def on_routed(self, request: RouteRequest, worker: WorkerView) -> None:
        pass

    def on_first_token(self, request_id: str) -> None:
        pass

    def on_finished(self, request_id: str) -> None:
        pass

    def on_kv_event(self, event: KvEvent) -> None:
        pass

    def remove_worker(self, worker_id: str) -> None:
        pass
