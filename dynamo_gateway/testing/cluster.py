"""Real gateway processes for end-to-end tests: one `dynamo-gateway serve`
(`start_gateway`, `GatewayProcess`), or a `Cluster` of `worker` and `frontend`
processes over one discovery backend and one event plane; `read_metric` reads
their Prometheus ``/metrics``.

Every process logs to a file, shown in the error when it fails to start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamo_gateway.servers.ports import free_port
from dynamo_gateway.servers.process import terminate

__all__ = [
    "Cluster",
    "ClusterProcess",
    "GatewayProcess",
    "read_metric",
    "start_gateway",
    "wait_ready",
]


@dataclass
class GatewayProcess:
    """A running `dynamo-gateway serve` subprocess."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        return terminate(self.process, timeout)


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode} before becoming ready")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"gateway at {url} not ready after {timeout} s")


def start_gateway(
    args: Sequence[str], log_dir: Path, *, env: dict[str, str] | None = None
) -> GatewayProcess:
    """Start ``dynamo-gateway serve ARGS`` on a free port and wait until it is ready.

    The caller stops it (`GatewayProcess.stop`). Its output goes to a log file
    in `log_dir`, shown in the error when it fails to start.
    """
    port = free_port()
    argv = [sys.executable, "-m", "dynamo_gateway.cli", "serve", "--port", str(port), *args]
    log_path = log_dir / f"gateway-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    gw = GatewayProcess(f"http://127.0.0.1:{port}", port, process, log_path, argv)
    try:
        wait_ready(gw.url, process, timeout=120.0)
    except (RuntimeError, TimeoutError) as exc:
        gw.stop()
        raise RuntimeError(f"{exc}\n--- gateway log ---\n{gw.log()}") from None
    return gw


def read_metric(url: str, name: str, **labels: str) -> float:
    """One sample from ``{url}/metrics`` (Prometheus text): the series called `name`
    with exactly `labels`; 0.0 if there is none."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        got_name, _, got_labels = head.partition("{")
        if got_name == name and set(filter(None, got_labels.rstrip("}").split(","))) == want:
            return float(value)
    return 0.0


@dataclass
class ClusterProcess:
    """A `dynamo-gateway worker` or `frontend` subprocess of a `Cluster`."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""  # frontends: http://127.0.0.1:<port>
    worker_id: str = ""  # workers: from their ready line

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no drain, no deregistration (the lease must expire)."""
        self.signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (a worker drains first); SIGKILL after `timeout`."""
        return terminate(self.process, timeout)


class Cluster:
    """Frontend and worker processes sharing one discovery and one event plane."""

    def __init__(self, directory: Path, model: Path, discovery: str, events: str) -> None:
        self.directory = directory
        self.model = model
        self.discovery = discovery
        self.events = events
        self.processes: list[ClusterProcess] = []
        self._count = 0

    def _spawn(self, name: str, argv: list[str]) -> ClusterProcess:
        self._count += 1
        log_path = self.directory / f"{self._count:02d}-{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "dynamo_gateway.cli", *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc = ClusterProcess(name, process, log_path)
        self.processes.append(proc)
        return proc

    def worker(self, *args: str, engine: str = "mocker", timeout: float = 60.0) -> ClusterProcess:
        """Start a worker of the cluster's model and wait until it has registered."""
        argv = ["worker", "--engine", engine, "--discovery", self.discovery]
        argv += ["--events", self.events]
        if "--model" not in args:
            argv += ["--model", str(self.model)]
        if "--served-model-name" not in args:
            argv += ["--served-model-name", "demo"]
        proc = self._spawn(f"worker-{engine}", argv + list(args))
        line = _wait_for_line(proc, "dynamo-gateway worker ", timeout)
        proc.worker_id = line.split()[2]
        return proc

    def frontend(
        self, *args: str, port: int | None = None, timeout: float = 60.0
    ) -> ClusterProcess:
        """Start a frontend on `port` (default a free one) and wait until it listens."""
        port = port or free_port()
        argv = ["frontend", "--discovery", self.discovery, "--events", self.events]
        proc = self._spawn("frontend", [*argv, "--port", str(port), *args])
        proc.url = f"http://127.0.0.1:{port}"
        _wait_for_line(proc, "dynamo-gateway frontend ", timeout)
        return proc

    def planner(self, *args: str, timeout: float = 60.0) -> ClusterProcess:
        """Start `dynamo-gateway planner` over the cluster's discovery and event plane
        (workers it starts log under the cluster's directory); wait until it runs."""
        argv = ["planner", "--discovery", self.discovery, "--events", self.events]
        argv += ["--log-dir", str(self.directory / "planned")]
        proc = self._spawn("planner", [*argv, *args])
        _wait_for_line(proc, "dynamo-gateway planner ", timeout)
        return proc

    def wait_workers(
        self, frontend: ClusterProcess, count: int, *, model: str = "demo", timeout: float = 30.0
    ) -> None:
        """Wait until `frontend` routes to exactly `count` workers of `model`."""
        deadline = time.monotonic() + timeout
        seen: Any = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{frontend.url}/ready", timeout=2) as resp:
                    seen = json.loads(resp.read())
            except urllib.error.HTTPError as exc:  # 503 while no worker is live
                seen = json.loads(exc.read())
            except (urllib.error.URLError, OSError):
                seen = None
            if seen is not None and seen["models"].get(model, 0) == count:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{frontend.url} never had {count} workers of {model}: {seen}")

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop(timeout=15)

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name} ---\n{p.log()}" for p in self.processes)


def _wait_for_line(proc: ClusterProcess, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.log().splitlines():
            if line.startswith(prefix):
                return line
        if proc.process.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.log()}")
        time.sleep(0.05)
    raise TimeoutError(f"{proc.name} not ready after {timeout} s:\n{proc.log()}")
