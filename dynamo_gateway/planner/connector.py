"""The connector interface: how the planner starts and stops workers somewhere.

A connector owns the workers it started. The planner asks it to `add` workers
to a pool and to `remove` chosen ones; removal is always a drain (the worker
leaves discovery for new requests, finishes what it runs - migration takes what
would outlive its drain timeout - then exits), never a kill. Both calls return
once the request is made; `managed()` says what is starting, running or
draining, and `worker_seconds()` how much worker time has been used.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dynamo_gateway.planner.config import ModelPlan, PlannerConfig
from dynamo_gateway.planner.observe import PoolKey


class WorkerState(enum.Enum):
    STARTING = "starting"  # asked for; not registered in discovery yet (the planner decides)
    RUNNING = "running"
    DRAINING = "draining"  # told to stop; finishing its requests


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker of a pool runs: `dynamo-gateway worker` with these flags."""

    pool: PoolKey
    model_path: Path
    engine: str
    discovery: str
    events: str
    args: tuple[str, ...] = ()

    @classmethod
    def for_pool(cls, config: PlannerConfig, model: ModelPlan, pool: PoolKey) -> WorkerSpec:
        return cls(
            pool, model.path, model.engine, config.discovery, config.events,
            tuple(model.worker_args),
        )  # fmt: skip

    def worker_args(self, worker_id: str) -> list[str]:
        """Arguments after ``dynamo-gateway``."""
        return [
            "worker",
            "--engine", self.engine,
            "--model", str(self.model_path),
            "--served-model-name", self.pool.model,
            "--role", self.pool.role.value,
            "--discovery", self.discovery,
            "--events", self.events,
            "--worker-id", worker_id,
            *self.args,
        ]  # fmt: skip

    def command(self, worker_id: str) -> list[str]:
        """The whole command line, with this interpreter."""
        return [sys.executable, "-m", "dynamo_gateway.cli", *self.worker_args(worker_id)]


@dataclass(frozen=True)
class ManagedWorker:
    worker_id: str
    pool: PoolKey
    state: WorkerState
    started_at: float  # the connector's monotonic clock


class PlannerConnector(Protocol):
    async def start(self) -> None:
        """Connect to the substrate; called once before anything else."""

    def managed(self) -> list[ManagedWorker]:
        """Workers this connector started that have not exited."""
        ...

    async def add(self, spec: WorkerSpec, count: int) -> list[str]:
        """Start `count` workers of `spec.pool`; returns their worker ids."""
        ...

    async def remove(self, pool: PoolKey, worker_ids: Sequence[str]) -> None:
        """Drain and stop these workers (ids from `managed()`)."""

    def worker_seconds(self) -> float:
        """Worker time used so far: every started worker, from start to exit."""
        ...

    async def aclose(self, *, stop_workers: bool = True) -> None:
        """Release the connector; drain its workers first when `stop_workers`."""


ConnectorFactory = Callable[[PlannerConfig], PlannerConnector]


def new_worker_id(pool: PoolKey, token: str) -> str:
    return f"{pool.model}-{pool.role.value}-{token}"
