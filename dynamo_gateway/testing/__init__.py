"""pytest fixtures and options for dynamo-gateway and its plugin authors.

This package is the ``pytest11`` plugin ``dynamo_gateway``, so any project with
dynamo-gateway installed gets its options, markers and fixtures without a
``conftest.py``:

- ``--run-slow``: run tests marked ``slow`` (skipped by default).
- ``--require-engines``: tests marked ``gpu``/``vllm``/``sglang``/``trtllm``/``nixl``
  fail instead of skipping when their hardware or library is missing.
- ``demo_model`` (session): a built demo model directory.
- ``real_model`` (session): SmolLM2-135M-Instruct as a HF directory (with its GGUF file).
- ``gateway_server``: a factory that starts a real ``dynamo-gateway serve``
  process on a free loopback port and stops it after the test.
- ``cluster``: a factory of `Cluster` s (worker and frontend processes).
- ``etcd_server``: a real etcd on free loopback ports (an `EtcdServer`; skips without
  the binary unless ``DYNAMO_GATEWAY_REQUIRE_SERVERS=1``).
- ``nats_server``: a real nats-server on a free loopback port (a `NatsServer`; skips
  without the binary unless ``DYNAMO_GATEWAY_REQUIRE_SERVERS=1``).
- ``redis_server``: a real redis-server on a free loopback port (a `RedisServer`;
  skips without the binary unless ``DYNAMO_GATEWAY_REQUIRE_SERVERS=1``).

and, as plain imports from this package:

- ``start_gateway()``, `GatewayProcess`, ``wait_ready()``: a ``serve`` process for a
  module-scoped fixture; `Cluster`, `ClusterProcess`, ``read_metric()``.
- ``free_port()``: a free TCP port on 127.0.0.1.
- ``engine_request()``, ``collect()``, ``tokens_of()``: driving an `Engine` directly.

The engine conformance suite, `dynamo_gateway.testing.conformance`, and the
planner tests' client-side helpers, `dynamo_gateway.testing.planner` (``Load``,
``live_workers()``, ``wait_for()``, ``drain_times()``, ``planner_toml()``), are
imported by the test modules that use them (they need the dev extras:
``pytest-asyncio``, ``httpx``, ``openai``), never by this plugin.

Layout: `markers` (options, markers, skipping), `fixtures`, `cluster` (processes),
`engines` (request helpers), `conformance`, `planner` (planner load and logs).
Modules here import the rest of dynamo_gateway; nothing outside this package
imports it.
"""

from __future__ import annotations

from dynamo_gateway.servers.etcd import EtcdServer
from dynamo_gateway.servers.nats import NatsServer
from dynamo_gateway.servers.ports import free_port
from dynamo_gateway.servers.redis import RedisServer
from dynamo_gateway.testing.cluster import (
    Cluster,
    ClusterProcess,
    GatewayProcess,
    read_metric,
    start_gateway,
    wait_ready,
)
from dynamo_gateway.testing.engines import collect, engine_request, tokens_of

# Fixtures and hooks: pytest looks for them on this module (the entry point).
from dynamo_gateway.testing.fixtures import (
    REAL_MODEL,
    REQUIRE_SERVERS_ENV,
    cluster,
    demo_model,
    etcd_server,
    gateway_server,
    nats_server,
    real_model,
    redis_server,
)
from dynamo_gateway.testing.markers import (
    ENGINE_MARKERS,
    MARKERS,
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_setup,
)

__all__ = [
    "ENGINE_MARKERS",
    "MARKERS",
    "REAL_MODEL",
    "REQUIRE_SERVERS_ENV",
    "Cluster",
    "ClusterProcess",
    "EtcdServer",
    "GatewayProcess",
    "NatsServer",
    "RedisServer",
    "cluster",
    "collect",
    "demo_model",
    "engine_request",
    "etcd_server",
    "free_port",
    "gateway_server",
    "nats_server",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_runtest_setup",
    "read_metric",
    "real_model",
    "redis_server",
    "start_gateway",
    "tokens_of",
    "wait_ready",
]
