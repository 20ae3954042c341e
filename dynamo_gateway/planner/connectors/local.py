"""The `local` connector: `dynamo-gateway worker` processes on this host.

Each worker logs to ``<log_dir>/<worker id>.log``. Removal sends SIGTERM (the
worker drains, see `dynamo_gateway.runtime.worker`); one that has not exited
``kill_after_s`` later is killed. A worker that exits by itself (a crash) just
leaves `managed()`; the planner sees its pool shrink and refills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dynamo_gateway.planner.config import PlannerConfig
from dynamo_gateway.planner.connector import ManagedWorker, WorkerSpec, WorkerState, new_worker_id
from dynamo_gateway.planner.observe import PoolKey

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often exits are looked for


@dataclass
class _Proc:
    worker_id: str
    pool: PoolKey
    process: subprocess.Popen[bytes]
    started_at: float
    draining: bool = False
    waiter: asyncio.Task[None] | None = None


class LocalConnector:
    def __init__(self, config: PlannerConfig, *, kill_after_s: float = 120.0) -> None:
        self.kill_after_s = kill_after_s
        self._log_dir = config.log_dir
        self._procs: dict[str, _Proc] = {}
        self._used_s = 0.0  # worker-seconds of exited workers
        self.exits: list[tuple[str, int]] = []  # (worker id, return code)

    async def start(self) -> None:
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="dynamo-gateway-planner-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log.info("local connector: worker logs in %s", self._log_dir)

    def managed(self) -> list[ManagedWorker]:
        return [
            ManagedWorker(
                p.worker_id,
                p.pool,
                WorkerState.DRAINING if p.draining else WorkerState.RUNNING,
                p.started_at,
            )
            for p in self._procs.values()
        ]

    async def add(self, spec: WorkerSpec, count: int) -> list[str]:
        assert self._log_dir is not None, "start() first"
        ids: list[str] = []
        for _ in range(count):
            worker_id = new_worker_id(spec.pool, uuid.uuid4().hex[:8])
            path = self._log_dir / f"{worker_id}.log"
            with path.open("wb") as out:
                # subprocess with close_fds=False spawns with posix_spawn, not fork: a
                # fork of this process while the etcd client's gRPC threads run can
                # crash the child before exec (seen: SIGSEGV), and uvloop's own
                # subprocesses fork. Our fds are not inheritable anyway (PEP 446).
                process = subprocess.Popen(
                    spec.command(worker_id), stdout=out, stderr=subprocess.STDOUT,
                    close_fds=False,
                )  # fmt: skip
            proc = _Proc(worker_id, spec.pool, process, time.monotonic())
            proc.waiter = asyncio.get_running_loop().create_task(self._wait(proc))
            self._procs[worker_id] = proc
            ids.append(worker_id)
            log.info("started worker %s (pid %d)", worker_id, process.pid)
        return ids

    async def _wait(self, proc: _Proc) -> None:
        while (code := proc.process.poll()) is None:
            await asyncio.sleep(POLL_S)
        self._procs.pop(proc.worker_id, None)
        self._used_s += time.monotonic() - proc.started_at
        self.exits.append((proc.worker_id, code))
        how = "drained and exited" if proc.draining else "exited by itself"
        log.info("worker %s %s (code %d)", proc.worker_id, how, code)

    async def remove(self, pool: PoolKey, worker_ids: Sequence[str]) -> None:
        self._drain(worker_ids)

    def _drain(self, worker_ids: Sequence[str]) -> None:
        for worker_id in worker_ids:
            proc = self._procs.get(worker_id)
            if proc is None or proc.draining:
                continue
            proc.draining = True
            with contextlib.suppress(ProcessLookupError):
                proc.process.send_signal(signal.SIGTERM)
            asyncio.get_running_loop().create_task(self._kill_later(proc))
            log.info("draining worker %s", worker_id)

    async def _kill_later(self, proc: _Proc) -> None:
        deadline = time.monotonic() + self.kill_after_s
        while proc.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        if proc.process.poll() is not None:
            return
        log.warning("worker %s still running %.0f s after SIGTERM: killed", proc.worker_id,
                    self.kill_after_s)  # fmt: skip
        with contextlib.suppress(ProcessLookupError):
            proc.process.kill()

    def worker_seconds(self) -> float:
        now = time.monotonic()
        return self._used_s + sum(now - p.started_at for p in self._procs.values())

    async def aclose(self, *, stop_workers: bool = True) -> None:
        procs = list(self._procs.values())
        if not stop_workers:
            for p in procs:
                if p.waiter is not None:
                    p.waiter.cancel()
            return
        self._drain([p.worker_id for p in procs])
        waiters = [p.waiter for p in procs if p.waiter is not None]
        if waiters:
            await asyncio.wait(waiters, timeout=self.kill_after_s + 5)


def make_local_connector(config: PlannerConfig) -> LocalConnector:
    return LocalConnector(config)
