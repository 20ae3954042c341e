"""The nixl plugin: installed, listed without importing NIXL, clear when NIXL is missing,
and building the transport works when it is installed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dynamo_gateway
from dynamo_gateway.disagg.layout import KvLayout
from dynamo_gateway.disagg.transport import KvTransport, TransportContext
from dynamo_gateway.errors import ConfigError
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.settings import Settings, load_settings

PLUGIN = "nixl"
DISTRIBUTION = "dynamo-gateway-nixl"
MODULE = "dynamo_gateway_nixl.plugin"
LIBRARY_MODULE = "nixl"
HAS_LIBRARY = importlib.util.find_spec(LIBRARY_MODULE) is not None

LAYOUT = KvLayout(num_layers=2, num_kv_heads=1, head_dim=8, block_size=4, dtype="uint8")
CONTEXT = TransportContext(Settings(), "w0", LAYOUT)


def test_plugin_is_installed() -> None:
    eps = importlib.metadata.entry_points(group="dynamo_gateway", name=PLUGIN)
    assert [ep.value for ep in eps] == [MODULE]

    plugins = load_plugins()
    info = next(i for i in plugins.loaded if i.name == PLUGIN)
    assert info.module == MODULE
    assert info.distribution == DISTRIBUTION
    assert info.version == "0.1.0"
    assert not info.builtin

    registration = plugins.registry.kv_transports.registration(PLUGIN)
    assert registration.plugin == PLUGIN
    assert "nixl" in registration.description
    assert plugins.registry.provided_by(PLUGIN) == {"kv_transports": [PLUGIN]}


def test_listing_does_not_import_engine() -> None:
    # A fresh interpreter: this process may have imported anything by now.
    code = textwrap.dedent(
        f"""
        import sys
        from dynamo_gateway.plugins import load_plugins

        load_plugins(only=[])
        had_cuda = "torch.cuda" in sys.modules
        plugins = load_plugins()
        assert {PLUGIN!r} in plugins.registry.kv_transports
        assert {LIBRARY_MODULE!r} not in sys.modules, "listing imported NIXL"
        assert had_cuda or "torch.cuda" not in sys.modules, "listing imported torch.cuda"
        """
    )
    core_root = str(Path(dynamo_gateway.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (core_root, env.get("PYTHONPATH")) if p)
    env.pop("DYNAMO_GATEWAY_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_missing_engine_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import nixl` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, LIBRARY_MODULE, None)
    factory = load_plugins(only=[PLUGIN]).registry.kv_transports.get(PLUGIN)
    with pytest.raises(
        ConfigError, match=r"pip install --no-deps nixl==1\.5\.1 nixl-cu12==1\.5\.1"
    ):
        factory(CONTEXT)


@pytest.mark.nixl
def test_real_library_builds_transport() -> None:
    if not HAS_LIBRARY:
        pytest.skip("NIXL is not installed (pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1)")
    factory = load_plugins(only=[PLUGIN]).registry.kv_transports.get(PLUGIN)
    transport = factory(CONTEXT)
    assert transport.name == PLUGIN
    assert isinstance(transport, KvTransport)
    assert transport.allocate(LAYOUT, 8) is None


@pytest.mark.nixl
def test_nixl_logging_stays_off_stdout() -> None:
    if not HAS_LIBRARY:
        pytest.skip("NIXL is not installed (pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1)")
    from dynamo_gateway_nixl.factory import import_nixl

    raise_exceptions = logging.raiseExceptions
    import_nixl()
    assert logging.raiseExceptions == raise_exceptions
    logger = logging.getLogger("nixl")
    assert logger.propagate
    assert not any(
        getattr(h, "stream", None) in (sys.stdout, sys.__stdout__) for h in logger.handlers
    )


def test_narrowing_excludes_plugin() -> None:
    plugins = load_plugins(only=[])
    assert PLUGIN not in {i.name for i in plugins.loaded}
    assert PLUGIN not in plugins.registry.kv_transports
    assert "mocker" in plugins.registry.engines  # built-ins always load

    with pytest.raises(ConfigError, match=PLUGIN):
        plugins.registry.kv_transports.get(PLUGIN)


def test_env_narrowing_excludes_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    others = sorted(
        ep.name
        for ep in importlib.metadata.entry_points(group="dynamo_gateway")
        if ep.name != PLUGIN
    )
    if not others:
        pytest.skip("no other dynamo_gateway plugin is installed to narrow to")
    monkeypatch.setenv("DYNAMO_GATEWAY_PLUGINS", ",".join(others))
    plugins = load_plugins(only=load_settings().plugins)
    assert PLUGIN not in {i.name for i in plugins.loaded}
    assert PLUGIN not in plugins.registry.kv_transports
