"""pytest fixtures and options for dynamo-gateway and its plugin authors.

Loaded through the ``pytest11`` entry point, so any project with dynamo-gateway
installed gets:

- ``--run-slow``: run tests marked ``slow`` (skipped by default).
- ``--require-engines``: tests marked ``gpu``/``vllm``/``sglang``/``trtllm``/``nixl``
  fail instead of skipping when their hardware or library is missing.
- ``demo_model`` (session): a built demo model directory.
- ``real_model`` (session): SmolLM2-135M-Instruct as a HF directory (with its GGUF file).
- ``start_gateway()``: a ``dynamo-gateway serve`` process for a module-scoped fixture.
- ``gateway_server``: a factory that starts a real ``dynamo-gateway serve``
  process on a free loopback port and stops it after the test.
- ``etcd_server``: a real etcd on free loopback ports (an `EtcdServer`; skips without
  the binary unless ``DYNAMO_GATEWAY_REQUIRE_SERVERS=1``).
- ``nats_server``: a real nats-server on a free loopback port (a `NatsServer`; skips
  without the binary unless ``DYNAMO_GATEWAY_REQUIRE_SERVERS=1``).
- ``free_port()``: a free TCP port on 127.0.0.1.
- ``engine_request()``, ``collect()``, ``tokens_of()``: driving an `Engine` directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dynamo_gateway.engines.base import Engine
from dynamo_gateway.protocol.engine import EngineOutput, EngineRequest, SamplingParams
from dynamo_gateway.servers.etcd import EtcdServer, find_etcd
from dynamo_gateway.servers.nats import NatsServer, find_nats_server
from dynamo_gateway.servers.process import terminate

# marker -> importable module that provides it
ENGINE_MARKERS = {
    "vllm": "vllm",
    "sglang": "sglang",
    "trtllm": "tensorrt_llm",
    "nixl": "nixl",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dynamo-gateway")
    group.addoption("--run-slow", action="store_true", help="run tests marked slow")
    group.addoption(
        "--require-engines",
        action="store_true",
        help="fail (instead of skip) engine/GPU tests whose engine or device is missing",
    )


MARKERS = {
    "gpu": "needs an NVIDIA GPU (CUDA)",
    "vllm": "needs vLLM installed",
    "sglang": "needs SGLang installed",
    "trtllm": "needs TensorRT-LLM installed",
    "nixl": "needs NIXL installed",
    "slow": "takes more than a few seconds; run with --run-slow",
    "real_model": "serves the real SmolLM2-135M-Instruct checkpoint (fixture real_model)",
}


def pytest_configure(config: pytest.Config) -> None:
    # Declared here too, so plugin packages testing with --strict-markers get them.
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow")
    require = config.getoption("--require-engines")
    for item in items:
        # get_closest_marker, not item.keywords: keywords also hold the names of
        # the folders above the test (plugins/vllm/... would count as `vllm`).
        if item.get_closest_marker("slow") and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: use --run-slow"))
        missing = [
            marker
            for marker, module in ENGINE_MARKERS.items()
            if item.get_closest_marker(marker) and importlib.util.find_spec(module) is None
        ]
        if item.get_closest_marker("gpu") and not _cuda_available():
            missing.append("gpu")
        if missing:
            reason = f"needs {', '.join(missing)} (not available here)"
            if require:
                item.stash[_MISSING] = reason
            else:
                item.add_marker(pytest.mark.skip(reason=reason))


_MISSING = pytest.StashKey[str]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    reason = item.stash.get(_MISSING, None)
    if reason is not None:
        pytest.fail(f"--require-engines: {reason}", pytrace=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo model directory, built once per session (or DYNAMO_GATEWAY_TEST_MODEL)."""
    given = os.environ.get("DYNAMO_GATEWAY_TEST_MODEL")
    if given:
        return Path(given)
    from dynamo_gateway.models.demo import build_demo_model

    out = tmp_path_factory.mktemp("models") / "demo"
    build_demo_model(out)
    return out


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


@pytest.fixture
def gateway_server(tmp_path: Path, demo_model: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory: ``gateway_server("--workers", "2", ...)`` starts `serve` on a free port.

    The demo model and the mocker engine are the defaults; pass ``--model`` or
    ``--engine`` to change them. Every process started is stopped at teardown.
    """
    started: list[GatewayProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> GatewayProcess:
        argv: list[str] = []
        if "--model" not in args:
            argv += ["--model", str(demo_model)]
        if "--engine" not in args:
            argv += ["--engine", "mocker"]
        gw = start_gateway([*argv, *args], tmp_path, env=env)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


REAL_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The real instruct model's HF directory (SmolLM2-135M-Instruct, with its GGUF file).

    ``DYNAMO_GATEWAY_REAL_MODEL`` names a pulled directory (``make pytest`` sets it);
    otherwise it is pulled into the cache (``models pull``). When it cannot be
    fetched the test is skipped, or fails under ``--require-engines``.
    """
    given = os.environ.get("DYNAMO_GATEWAY_REAL_MODEL")
    if given:
        return Path(given)
    from dynamo_gateway.errors import GatewayError
    from dynamo_gateway.models.pull import default_cache_dir, pull

    try:
        return pull(REAL_MODEL, default_cache_dir() / "models" / REAL_MODEL, say=lambda _: None)
    except GatewayError as exc:
        pytest.skip(f"real model unavailable: {exc}")


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


# -- distributed clusters ----------------------------------------------------------------


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

    def frontend(self, *args: str, timeout: float = 60.0) -> ClusterProcess:
        """Start a frontend on a free port and wait until it listens."""
        port = free_port()
        argv = ["frontend", "--discovery", self.discovery, "--events", self.events]
        proc = self._spawn("frontend", [*argv, "--port", str(port), *args])
        proc.url = f"http://127.0.0.1:{port}"
        _wait_for_line(proc, "dynamo-gateway frontend ", timeout)
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


@pytest.fixture
def cluster(tmp_path: Path, demo_model: Path) -> Iterator[Callable[[str, str], Cluster]]:
    """Factory: ``cluster(discovery_url, events_url)`` -> a `Cluster` on the demo model
    (served as ``demo``); every process is stopped at teardown."""
    made: list[Cluster] = []

    def make(discovery: str, events: str) -> Cluster:
        directory = tmp_path / f"cluster{len(made)}"
        directory.mkdir()
        made.append(Cluster(directory, demo_model, discovery, events))
        return made[-1]

    yield make
    for c in made:
        c.stop_all()


# -- helpers for testing engines directly -------------------------------------------------


def engine_request(
    request_id: str,
    prompt: list[int],
    max_tokens: int = 16,
    *,
    resumed: Sequence[int] = (),
    **sampling: Any,
) -> EngineRequest:
    """An `EngineRequest`; keyword arguments are `SamplingParams` fields."""
    return EngineRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),
        resumed_token_ids=list(resumed),
    )


async def collect(engine: Engine, request: EngineRequest) -> list[EngineOutput]:
    """Every output of one request, to the end."""
    return [out async for out in engine.generate(request)]


def tokens_of(outputs: Sequence[EngineOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


# "1": tests that need etcd / nats-server fail instead of skipping without them (CI).
REQUIRE_SERVERS_ENV = "DYNAMO_GATEWAY_REQUIRE_SERVERS"


def _need_binary(found: str | None, reason: str) -> None:
    if found is None:
        if os.environ.get(REQUIRE_SERVERS_ENV) == "1":
            pytest.fail(f"{REQUIRE_SERVERS_ENV}=1: {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A started `EtcdServer` in ``tmp_path``, stopped after the test."""
    _need_binary(find_etcd(), "needs the etcd binary (apt install etcd-server)")
    with EtcdServer(tmp_path / "etcd") as server:
        yield server


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A started `NatsServer` in ``tmp_path``, stopped after the test."""
    _need_binary(find_nats_server(), "needs the nats-server binary (apt install nats-server)")
    with NatsServer(tmp_path / "nats") as server:
        yield server
