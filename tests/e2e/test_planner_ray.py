"""The planner scaling a mocker cluster whose workers are Ray actors (`ray` connector).

A real two-node Ray cluster on this host (two `ray start --block` processes,
each its own raylet and temp dir), etcd, NATS, a frontend and
`dynamo-gateway planner` with ``connector = "ray"``: scale up and down with no
failed request, workers on both nodes, drains only; then a second planner that
adopts the worker the first one left and refills the pool when it dies. The
planner process is the Ray driver; this process never imports ray (so Ray's
warnings never meet our ``filterwarnings = error``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynamo_gateway.servers.etcd import EtcdServer
from dynamo_gateway.servers.nats import NatsServer
from dynamo_gateway.testing import Cluster, ClusterProcess, free_port
from dynamo_gateway.testing.planner import Load, drain_times, live_workers, planner_toml, wait_for

pytestmark = pytest.mark.ray

MakeCluster = Callable[[str, str], Cluster]

# The ray connector's line once an actor has started its worker on a node.
STARTED = re.compile(r"started worker (\S+) \(pid (\d+) on node (\w+),")
DRAINED = r"worker (\S+) drained and exited \(code 0\)"


def wait_log(proc: ClusterProcess, pattern: str, count: int = 1, timeout: float = 30.0) -> None:
    """Until `proc` has logged `pattern` (a regex) `count` times."""
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, proc.log())) < count:
        assert time.monotonic() < deadline, f"{pattern!r} not logged {count}x:\n{proc.log()}"
        time.sleep(0.1)


@dataclass
class RayNode:
    process: subprocess.Popen[bytes]
    log_path: Path
    temp_dir: Path  # Ray's --temp-dir: sessions, sockets, raylet logs

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def raylet_logs(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in self.temp_dir.glob("session_*/logs/raylet*.out")
        )


@dataclass
class RayCluster:
    address: str
    nodes: list[RayNode]


def _ray_start(args: list[str], log_path: Path, timeout: float = 60.0) -> RayNode:
    # A short temp dir of its own per node: Ray's Unix socket paths live under it
    # (108-byte limit), and two raylets on one host must not share one.
    temp_dir = Path(tempfile.mkdtemp(prefix="dgw-ray-", dir="/tmp"))
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    argv = [
        ray, "start", *args, "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
        "--temp-dir", str(temp_dir), "--disable-usage-stats", "--block",
        # Ports two raylets on one host would otherwise share: the agent's HTTP
        # port is fixed by default, and worker ports come from one fixed range.
        "--dashboard-agent-listen-port", str(free_port()),
        "--min-worker-port", "0", "--max-worker-port", "0",
    ]  # fmt: skip
    with log_path.open("wb") as out:
        # Its own session: teardown can kill whatever of it outlives SIGTERM.
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    node = RayNode(process, log_path, temp_dir)
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in node.log():
        if process.poll() is not None or time.monotonic() > deadline:
            _ray_stop(node)
            raise RuntimeError(f"ray start {args} failed:\n{node.log()}")
        time.sleep(0.1)
    return node


def _ray_stop(node: RayNode) -> None:
    if node.process.poll() is None:
        node.process.send_signal(signal.SIGTERM)  # `ray start --block` stops its node
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(15)  # it waits for actors to finish up to 30 s
    _kill_session(node.process.pid)  # whatever of it outlived SIGTERM
    node.process.wait()
    shutil.rmtree(node.temp_dir, ignore_errors=True)


def _kill_session(sid: int) -> None:
    # Ray gives each worker process a process group of its own, so killpg would
    # miss them; they all stay in the session `ray start` opened.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == sid:
                    os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A head node and a second node on this host, 2 CPUs each, no dashboard."""
    logs = tmp_path_factory.mktemp("ray")
    port = free_port()
    nodes: list[RayNode] = []
    try:
        head_args = ["--head", "--port", str(port), "--include-dashboard=false",
                     "--ray-client-server-port", str(free_port())]  # fmt: skip
        nodes.append(_ray_start(head_args, logs / "head.log"))
        nodes.append(_ray_start(["--address", f"127.0.0.1:{port}"], logs / "node2.log"))
        yield RayCluster(f"127.0.0.1:{port}", nodes)
    finally:
        for node in reversed(nodes):
            _ray_stop(node)


def test_planner_scales_ray_actors_across_two_nodes_and_drains_them(
    ray_cluster: RayCluster,
    cluster: MakeCluster,
    etcd_server: EtcdServer,
    nats_server: NatsServer,
    tmp_path: Path,
    demo_model: Path,
) -> None:
    c = cluster(etcd_server.url, nats_server.url)
    frontend = c.frontend("--migration-limit", "3")
    config = tmp_path / "planner.toml"
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    config.write_text(
        planner_toml(
            demo_model, {"demo": 4},
            tail=f'connector = "ray"\n[plugin_config.ray]\naddress = "{ray_cluster.address}"\n'
            f'namespace = "{namespace}"\n',
        )
    )  # fmt: skip
    # --keep-workers: a second planner must adopt what the first one leaves running.
    args = ("--config", str(config), "--frontend", frontend.url)
    planner = c.planner(*args, "--keep-workers")
    load = Load(frontend.url, "demo")
    try:
        wait_for(frontend, lambda w: w.get("demo") == 1, 60, "the first worker")
        load.set_users(14)  # 14 in flight: 14 / (0.9 * 4) -> 4 workers
        wait_for(frontend, lambda w: w.get("demo", 0) >= 4, 60, "scale-up to 4")
        load.set_users(1)
        wait_for(frontend, lambda w: w.get("demo") == 1, 90, "scale-down to 1")
    finally:
        load.stop()
    assert load.failures() == [], c.logs()
    assert len(load.results) > 30
    # The frontend stops routing to a worker as its drain begins; the planner
    # sees it exit a little later.
    wait_log(planner, DRAINED, count=3)
    planner.stop(timeout=60)
    first = planner.log()
    assert "exited by itself" not in first, first  # no worker crashed

    # Every worker ran in a Ray actor; SPREAD put them on both raylets we started.
    started = {w: (int(pid), node) for w, pid, node in STARTED.findall(first)}
    assert len(started) == 4, first
    nodes = {node for _, node in started.values()}
    raylets = [node.raylet_logs() for node in ray_cluster.nodes]
    assert all(any(n in log for log in raylets) for n in nodes), (nodes, ray_cluster.nodes)
    assert len(nodes) == 2, started
    # Down one at a time, each at least the 4 s cool-down after the pool last changed.
    drains = drain_times(first, "demo/aggregated")
    assert len(drains) == 3, first
    assert all(b - a >= 4 - 0.1 for a, b in itertools.pairwise(drains)), drains
    drained = re.findall(DRAINED, first)
    assert len(drained) == 3, first

    # The last worker outlived its planner (detached actor); the next planner takes
    # it over without starting another.
    (survivor,) = set(started) - set(drained)
    assert live_workers(frontend).get("demo") == 1
    second = c.planner(*args)
    wait_log(second, re.escape(f"adopted worker {survivor} "))
    assert STARTED.search(second.log()) is None, second.log()
    # That worker dies (SIGKILL: no drain): it leaves the pool and the planner refills it.
    os.kill(started[survivor][0], signal.SIGKILL)
    wait_log(second, re.escape(f"worker {survivor} exited by itself (code -9)"))
    wait_log(second, STARTED.pattern)
    wait_for(frontend, lambda w: w.get("demo") == 1, 30, "the replacement")
    second.stop(timeout=60)
    log = second.log()
    (replacement,) = STARTED.findall(log)
    assert f"worker {replacement[0]} drained and exited (code 0)" in log, log

    # And every other worker's own log shows it stopped on SIGTERM: drained, not killed.
    logs = {p.stem: p.read_text() for p in (c.directory / "planned").glob("*.log")}
    assert set(logs) == {*started, replacement[0]}
    for worker_id, text in logs.items():
        if worker_id != survivor:
            assert f"worker {worker_id} (pid" in text and ") stopping" in text, text


def test_an_unreachable_ray_cluster_fails_the_planner_at_start(
    tmp_path: Path, demo_model: Path
) -> None:
    # ray.init alone retries a dead address for many minutes.
    config = tmp_path / "planner.toml"
    tail = (
        f'connector = "ray"\n[plugin_config.ray]\naddress = "127.0.0.1:{free_port()}"\n'
        "connect_timeout_s = 2\n"
    )
    config.write_text(planner_toml(demo_model, {"demo": 1}, tail=tail))
    argv = [sys.executable, "-m", "dynamo_gateway.cli", "planner", "--config", str(config)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "no Ray cluster answered at 127.0.0.1:" in done.stderr, done.stderr
    assert "dynamo-gateway planner over" not in done.stdout
