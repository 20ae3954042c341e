"""The planner scaling a live mocker cluster over etcd + NATS with the local connector.

Real processes throughout: etcd, NATS, a frontend, `dynamo-gateway planner`
and the workers it starts and drains. Load comes from client threads holding a
set number of requests in flight; every request must succeed, whatever the
planner does meanwhile.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

from dynamo_gateway.servers.etcd import EtcdServer
from dynamo_gateway.servers.nats import NatsServer
from dynamo_gateway.testing import Cluster, ClusterProcess
from dynamo_gateway.testing.planner import Load, drain_times, live_workers, planner_toml, wait_for

MakeCluster = Callable[[str, str], Cluster]


def start(
    c: Cluster, tmp_path: Path, demo_model: Path, models: dict[str, int], budget: int | None
) -> tuple[ClusterProcess, ClusterProcess]:
    frontend = c.frontend("--migration-limit", "3")
    config = tmp_path / "planner.toml"
    config.write_text(planner_toml(demo_model, models, budget))
    planner = c.planner("--config", str(config), "--frontend", frontend.url)
    return frontend, planner


def test_planner_scales_a_mocker_cluster_up_and_down_without_failing_a_request(
    cluster: MakeCluster,
    etcd_server: EtcdServer,
    nats_server: NatsServer,
    tmp_path: Path,
    demo_model: Path,
) -> None:
    c = cluster(etcd_server.url, nats_server.url)
    frontend, planner = start(c, tmp_path, demo_model, {"demo": 4}, None)
    load = Load(frontend.url, "demo")
    try:
        # Its minimum: one worker, started by the planner itself.
        wait_for(frontend, lambda w: w.get("demo") == 1, 60, "the first worker")
        load.set_users(2)  # 2 requests in flight: under the target, stays at 1
        time.sleep(3)
        assert live_workers(frontend).get("demo") == 1
        load.set_users(14)  # 14 in flight: 14 / (0.9 * 4) -> 4 workers
        up = wait_for(frontend, lambda w: w.get("demo", 0) >= 4, 60, "scale-up to 4")
        load.set_users(1)
        down = wait_for(frontend, lambda w: w.get("demo") == 1, 90, "scale-down to 1")
        time.sleep(1)
    finally:
        load.stop()
    assert load.failures() == [], c.logs()
    assert len(load.results) > 30
    log = planner.log()
    assert "add" in log and "drain" in log, log
    assert "exited by itself" not in log, log  # no worker crashed
    # Down one at a time, each at least the 4 s cool-down after the pool last changed
    # (the planner's own log times: what the client sees also depends on drain time).
    drains = drain_times(log, "demo/aggregated")
    assert len(drains) == 3, log
    assert all(b - a >= 4 - 0.1 for a, b in itertools.pairwise(drains)), (drains, up, down)
    planner.stop(timeout=60)
    drained = [p for p in (tmp_path / "cluster0" / "planned").glob("*.log")]
    assert len(drained) >= 4
    for path in drained:
        text = path.read_text()
        assert "stopping" in text, text  # every worker drained and exited on SIGTERM


def test_two_models_share_the_planners_worker_budget(
    cluster: MakeCluster,
    etcd_server: EtcdServer,
    nats_server: NatsServer,
    tmp_path: Path,
    demo_model: Path,
) -> None:
    c = cluster(etcd_server.url, nats_server.url)
    frontend, planner = start(c, tmp_path, demo_model, {"a": 3, "b": 3}, 4)
    loads = [Load(frontend.url, "a"), Load(frontend.url, "b")]
    seen: list[dict[str, int]] = []
    try:
        wait_for(frontend, lambda w: w.get("a") == 1 and w.get("b") == 1, 60, "one each", seen)
        for load in loads:
            load.set_users(12)  # each model alone would take 3 workers
        wait_for(frontend, lambda w: sum(w.values()) == 4, 60, "the budget used", seen)
        end = time.monotonic() + 6
        while time.monotonic() < end:
            seen.append(live_workers(frontend))
            time.sleep(0.2)
    finally:
        for load in loads:
            load.stop()
        planner.stop(timeout=60)  # before NATS and etcd go
    for load in loads:
        assert load.failures() == [], c.logs()
    assert "exited by itself" not in planner.log()
    assert max(sum(w.values()) for w in seen) == 4, seen  # never over the budget
    final = seen[-1]
    assert final.get("a", 0) >= 1 and final.get("b", 0) >= 1 and sum(final.values()) == 4
    assert "budget: " in planner.log()
