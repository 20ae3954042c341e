"""The planner scaling a live mocker cluster over etcd + NATS with the local connector.

Real processes throughout: etcd, NATS, a frontend, `dynamo-gateway planner`
and the workers it starts and drains. Load comes from client threads holding a
set number of requests in flight; every request must succeed, whatever the
planner does meanwhile.
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dynamo_gateway.servers.etcd import EtcdServer
from dynamo_gateway.servers.nats import NatsServer
from dynamo_gateway.testing import Cluster, ClusterProcess

MakeCluster = Callable[[str, str], Cluster]

# Reacts within a couple of seconds: 0.5 s intervals, a 4 s cool-down, 4 requests
# per worker as the target. Workers drain for up to 20 s on scale-down.
PLANNER_TOML = """
interval_s = 0.5
cooldown_s = 4
{budget}
[load]
target_requests = 4
up_intervals = 2
down_intervals = 4
{models}
"""

MODEL_TOML = """
[[models]]
name = "{name}"
path = "{path}"
engine = "mocker"
worker_args = ["--drain-timeout", "20"]
pools = {{ aggregated = {{ min = 1, max = {max} }} }}
"""


@dataclass
class Load:
    """Client threads, each keeping one completion request in flight at a time."""

    url: str
    model: str
    results: list[tuple[int, str]] = field(default_factory=list)  # (status, detail)
    _stops: list[threading.Event] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def set_users(self, n: int) -> None:
        while len(self._stops) < n:
            stop = threading.Event()
            thread = threading.Thread(target=self._user, args=(stop,), daemon=True)
            self._stops.append(stop)
            self._threads.append(thread)
            thread.start()
        while len(self._stops) > n:
            self._stops.pop().set()

    def _user(self, stop: threading.Event) -> None:
        body = {"model": self.model, "prompt": "hello " * 40, "max_tokens": 96,
                "ignore_eos": True}  # fmt: skip
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                try:
                    resp = client.post(f"{self.url}/v1/completions", json=body)
                    ok = resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 96
                    self.results.append((resp.status_code, "" if ok else resp.text[:300]))
                except Exception as exc:  # a failed request, never a crash of the test
                    self.results.append((0, repr(exc)))

    def stop(self) -> None:
        self.set_users(0)
        for thread in self._threads:
            thread.join(60)

    def failures(self) -> list[tuple[int, str]]:
        return [r for r in self.results if r[0] != 200 or r[1]]


def live_workers(frontend: ClusterProcess) -> dict[str, int]:
    try:
        with urllib.request.urlopen(f"{frontend.url}/ready", timeout=2) as resp:
            return dict(json.loads(resp.read())["models"])
    except urllib.error.HTTPError as exc:  # 503 while a model has no worker
        return dict(json.loads(exc.read()).get("models", {}))
    except (urllib.error.URLError, OSError):
        return {}


def wait_for(
    frontend: ClusterProcess, check: Callable[[dict[str, int]], bool], timeout: float, what: str,
    seen: list[dict[str, int]] | None = None,
) -> float:  # fmt: skip
    start = time.monotonic()
    now: dict[str, int] = {}
    while time.monotonic() - start < timeout:
        now = live_workers(frontend)
        if seen is not None:
            seen.append(now)
        if check(now):
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s (workers now {now})")


def drain_times(log: str, pool: str) -> list[float]:
    """When the planner decided to drain one worker of `pool` (seconds, from its log);
    fails on a decision that drains more than one at a time."""
    times = []
    for line in log.splitlines():
        match = re.match(rf"(\S+ \S+) INFO .*planner: {re.escape(pool)} drain (\d+) ", line)
        if match is None:
            continue
        assert match[2] == "1", line  # max_down_step
        stamp = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
        times.append(stamp.timestamp())
    return times


def start(
    c: Cluster, tmp_path: Path, demo_model: Path, models: dict[str, int], budget: int | None
) -> tuple[ClusterProcess, ClusterProcess]:
    frontend = c.frontend("--migration-limit", "3")
    config = tmp_path / "planner.toml"
    config.write_text(
        PLANNER_TOML.format(
            budget=f"budget = {budget}" if budget else "",
            models="".join(
                MODEL_TOML.format(name=name, path=demo_model, max=top)
                for name, top in models.items()
            ),
        )
    )
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
