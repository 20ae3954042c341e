"""`dynamo_gateway.testing` sits on top: it imports the package, nothing imports it.

And every name the old single-module ``testing`` offered is still importable
from the package, which is what the ``pytest11`` entry point loads.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dynamo_gateway
import dynamo_gateway.testing as testing

PACKAGE = Path(dynamo_gateway.__file__).parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_nothing_outside_testing_imports_testing() -> None:
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "testing" not in path.relative_to(PACKAGE).parts
        and any(
            name == "dynamo_gateway.testing" or name.startswith("dynamo_gateway.testing.")
            for name in _imports(path)
        )
    ]
    assert offenders == []


def test_the_plugin_module_offers_every_public_name() -> None:
    names = {
        # options, markers and skipping
        "ENGINE_MARKERS",
        "MARKERS",
        "pytest_addoption",
        "pytest_configure",
        "pytest_collection_modifyitems",
        "pytest_runtest_setup",
        # fixtures
        "demo_model",
        "real_model",
        "REAL_MODEL",
        "gateway_server",
        "cluster",
        "etcd_server",
        "nats_server",
        "REQUIRE_SERVERS_ENV",
        # processes
        "GatewayProcess",
        "wait_ready",
        "start_gateway",
        "read_metric",
        "Cluster",
        "ClusterProcess",
        "free_port",
        # engines
        "engine_request",
        "collect",
        "tokens_of",
    }
    assert names <= set(testing.__all__)
    assert all(hasattr(testing, name) for name in testing.__all__)


def test_free_port_lives_below_testing() -> None:
    from dynamo_gateway.servers.ports import free_port

    assert testing.free_port is free_port
    assert 0 < free_port() < 65536
