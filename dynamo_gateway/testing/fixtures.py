"""The fixtures the pytest plugin provides (re-exported by `dynamo_gateway.testing`,
which is what pytest loads, so they are visible wherever dynamo-gateway is
installed)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dynamo_gateway.servers.etcd import EtcdServer, find_etcd
from dynamo_gateway.servers.nats import NatsServer, find_nats_server
from dynamo_gateway.servers.redis import RedisServer, find_redis_server
from dynamo_gateway.testing.cluster import Cluster, GatewayProcess, start_gateway

__all__ = [
    "REAL_MODEL",
    "REQUIRE_SERVERS_ENV",
    "cluster",
    "demo_model",
    "etcd_server",
    "gateway_server",
    "nats_server",
    "real_model",
    "redis_server",
]

REAL_MODEL = "smollm2-135m-instruct"

# "1": tests that need etcd / nats-server fail instead of skipping without them (CI).
REQUIRE_SERVERS_ENV = "DYNAMO_GATEWAY_REQUIRE_SERVERS"


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


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started `RedisServer` in ``tmp_path`` (no persistence), stopped after the test."""
    _need_binary(find_redis_server(), "needs the redis-server binary (apt install redis-server)")
    with RedisServer(tmp_path / "redis") as server:
        yield server
