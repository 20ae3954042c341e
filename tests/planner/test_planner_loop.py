"""The planner loop in-process: discovery and load reports in, decisions and metrics out."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Sequence

from dynamo_gateway.cli import main
from dynamo_gateway.planner.config import load_config
from dynamo_gateway.planner.connector import ManagedWorker, WorkerSpec, WorkerState
from dynamo_gateway.planner.loop import Planner
from dynamo_gateway.planner.observe import PoolKey
from dynamo_gateway.planner.policies.load import LoadPolicy
from dynamo_gateway.protocol.engine import LoadMetrics, WorkerRole
from dynamo_gateway.runtime.discovery import MemoryDiscovery, WorkerRecord
from dynamo_gateway.runtime.events import LoadReport, MemoryEventPlane, load_topic

KEY = PoolKey("m", WorkerRole.AGGREGATED)


class Recorder:
    """A connector that records what it is asked and registers nothing by itself."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.removed: list[str] = []
        self.workers: dict[str, ManagedWorker] = {}

    async def start(self) -> None:
        pass

    def managed(self) -> list[ManagedWorker]:
        return list(self.workers.values())

    async def add(self, spec: WorkerSpec, count: int) -> list[str]:
        ids = [f"new{len(self.added) + i}" for i in range(count)]
        for i in ids:
            self.workers[i] = ManagedWorker(i, spec.pool, WorkerState.RUNNING, 0.0)
        self.added += ids
        return ids

    async def remove(self, pool: PoolKey, worker_ids: Sequence[str]) -> None:
        for i in worker_ids:
            w = self.workers[i]
            self.workers[i] = ManagedWorker(i, w.pool, WorkerState.DRAINING, w.started_at)
        self.removed += worker_ids

    def worker_seconds(self) -> float:
        return 12.5

    async def aclose(self, *, stop_workers: bool = True) -> None:
        pass


def record(wid: str) -> WorkerRecord:
    return WorkerRecord(worker_id=wid, model="m", model_path="m", address=f"tcp://h:{wid}")


async def run_planner(dry_run: bool) -> tuple[Planner, Recorder, list[int], str]:
    cfg = load_config(
        None,
        dry_run=dry_run,
        cooldown_s=0,
        load={"up_intervals": 1, "down_intervals": 1},
        models=[{"name": "m", "path": "m", "pools": {"aggregated": {"min": 1, "max": 3}}}],
    )
    discovery, events = MemoryDiscovery(), MemoryEventPlane()
    clock = [0.0]
    connector = Recorder()
    planner = Planner(
        cfg, LoadPolicy(cfg.load), connector, discovery=discovery, events=events,
        clock=lambda: clock[0],
    )  # fmt: skip
    await planner.start(metrics_port=0)
    await discovery.register(record("w0"))
    await asyncio.sleep(0.01)
    targets = []
    for busy in (30, 30, 0):
        events.publish(
            load_topic("m"), LoadReport(worker_id="w0", metrics=LoadMetrics(active_requests=busy))
        )
        await asyncio.sleep(0.01)
        clock[0] += 1
        targets.append((await planner.step())[0].target)
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"{planner.metrics_address}/metrics").read().decode()
    )
    await planner.aclose()
    return planner, connector, targets, text


def test_the_loop_adds_then_drains_the_least_busy_worker_it_started() -> None:
    planner, connector, targets, text = asyncio.run(run_planner(dry_run=False))
    # 30 requests on one worker: up by max_step (2) -> 3; then idle: down by one.
    assert targets == [3, 3, 2]
    assert connector.added == ["new0", "new1"]
    assert len(connector.removed) == 1 and connector.removed[0] in connector.added
    assert 'dynamo_gateway_planner_desired_workers{model="m",role="aggregated"} 2.0' in text
    assert 'dynamo_gateway_planner_scaling_actions_total{direction="up"' in text
    assert "dynamo_gateway_planner_worker_seconds 12.5" in text
    assert len(planner.history) == 3


def test_dry_run_decides_and_logs_but_starts_nothing() -> None:
    _, connector, targets, _ = asyncio.run(run_planner(dry_run=True))
    assert targets[0] == 3
    assert connector.added == [] and connector.removed == []


def test_planner_flags_need_a_model(capsys: object) -> None:
    assert main(["planner", "--min-workers", "2"]) == 2
    assert main(["planner", "--discovery", "memory://"]) == 2
