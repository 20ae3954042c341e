"""The in-process connector: workers as engines of an embedded gateway's `LocalFleet`.

What a trace replay scales (`bench replay --planner`): adding a worker waits
``startup_s`` (the time a real worker takes to load its model; simulated on a
virtual clock), then starts an engine in this process and registers it; removal
drains it through `LocalFleet.drain` (no new requests, the running ones finish,
then it stops). Worker time is counted on the event loop's clock from the
moment a worker is asked for until it is gone, as a cloud would bill it. It
takes the fleet at construction, so it is built by code that holds one, not
from the plugin registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.planner.connector import ManagedWorker, WorkerSpec, WorkerState, new_worker_id
from dynamo_gateway.planner.observe import PoolKey
from dynamo_gateway.runtime.local import LocalFleet

log = logging.getLogger(__name__)


@dataclass
class _Worker:
    worker_id: str
    pool: PoolKey
    asked_at: float
    state: WorkerState = WorkerState.STARTING
    loading: bool = False  # its engine is starting (past the start-up wait)
    task: asyncio.Task[None] | None = None  # starting or draining


class InprocessConnector:
    def __init__(
        self, fleet: LocalFleet, *, startup_s: float = 0.0, drain_timeout_s: float = 600.0
    ) -> None:
        self.fleet = fleet
        self.startup_s = startup_s
        self.drain_timeout_s = drain_timeout_s
        self._workers: dict[str, _Worker] = {}
        self._used_s = 0.0  # worker time of workers gone
        self._ids = itertools.count()
        self.history: list[tuple[float, str, str]] = []  # (loop time, worker id, what)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def start(self) -> None:
        pass

    def managed(self) -> list[ManagedWorker]:
        return [
            ManagedWorker(w.worker_id, w.pool, w.state, w.asked_at) for w in self._workers.values()
        ]

    async def add(self, spec: WorkerSpec, count: int) -> list[str]:
        card = self.fleet.cards.get(spec.pool.model)
        if card is None:
            raise ConfigError(f"the in-process fleet serves no model {spec.pool.model!r}")
        if spec.engine != self.fleet.settings.engine:
            raise ConfigError(
                f"the in-process fleet runs {self.fleet.settings.engine!r} engines, "
                f"not {spec.engine!r}"
            )
        ids = []
        loop = asyncio.get_running_loop()
        for _ in range(count):
            worker = _Worker(
                new_worker_id(spec.pool, f"{next(self._ids):04d}"), spec.pool, loop.time()
            )
            worker.task = loop.create_task(self._boot(worker))
            self._workers[worker.worker_id] = worker
            self.history.append((worker.asked_at, worker.worker_id, "asked"))
            ids.append(worker.worker_id)
        return ids

    async def _boot(self, worker: _Worker) -> None:
        await asyncio.sleep(self.startup_s)
        card = self.fleet.cards[worker.pool.model]
        worker.loading = True
        try:
            await self.fleet.start(card, worker.worker_id, role=worker.pool.role, report_load=True)
        except Exception:
            log.exception("worker %s failed to start", worker.worker_id)
            self._gone(worker)
            return
        if worker.state is WorkerState.STARTING:
            worker.state = WorkerState.RUNNING
            self.history.append((self._now(), worker.worker_id, "running"))

    async def remove(self, pool: PoolKey, worker_ids: Sequence[str]) -> None:
        self._drain_all(worker_ids)

    def _drain_all(self, worker_ids: Sequence[str]) -> None:
        for worker_id in worker_ids:
            worker = self._workers.get(worker_id)
            if worker is None or worker.state is WorkerState.DRAINING:
                continue
            booting = worker.task if worker.state is WorkerState.STARTING else None
            worker.state = WorkerState.DRAINING
            self.history.append((self._now(), worker_id, "draining"))
            worker.task = asyncio.get_running_loop().create_task(self._drain(worker, booting))

    async def _drain(self, worker: _Worker, booting: asyncio.Task[None] | None) -> None:
        if booting is not None:
            # Asked for but not up yet: it holds no request. Stop the wait for it; one
            # already loading its engine finishes starting and is drained at once.
            if not worker.loading:
                booting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await booting
        if worker.worker_id in self.fleet.engines:
            await self.fleet.drain(worker.worker_id, self.drain_timeout_s)
        self._gone(worker)

    def _gone(self, worker: _Worker) -> None:
        if self._workers.pop(worker.worker_id, None) is not None:
            now = self._now()
            self._used_s += now - worker.asked_at
            self.history.append((now, worker.worker_id, "gone"))

    def worker_seconds(self) -> float:
        now = self._now()
        return self._used_s + sum(now - w.asked_at for w in self._workers.values())

    async def aclose(self, *, stop_workers: bool = True) -> None:
        if stop_workers:
            self._drain_all(list(self._workers))
        tasks = [w.task for w in self._workers.values() if w.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
