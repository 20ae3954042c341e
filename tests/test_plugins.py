"""The plugin manager factory and the registry its hooks fill."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from dynamo_gateway import hookimpl
from dynamo_gateway.errors import ConfigError, DuplicatePluginError, PluginNotFoundError
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.registry import EngineRegister, RouterRegister
from dynamo_gateway.router.policies import RoundRobinRouter


def _plugin(**hooks: object) -> types.SimpleNamespace:
    return types.SimpleNamespace(**hooks)


def test_builtins_register_mocker_routers_and_memory_backends() -> None:
    plugins = load_plugins(entry_points=False)
    reg = plugins.registry
    assert reg.engines.names() == ["mocker", "reference"]
    assert reg.routers.names() == ["kv", "least_loaded", "random", "round_robin"]
    assert reg.discovery.names() == ["etcd", "file", "memory"]
    assert reg.event_planes.names() == ["memory", "nats", "zmq"]
    assert reg.engines.registration("mocker").plugin == "builtin.engines"
    assert all(info.builtin for info in plugins.loaded)


def test_throwaway_plugin_registers_and_is_attributed() -> None:
    @hookimpl
    def dynamo_gateway_register_routers(register: RouterRegister) -> None:
        register("always_first", lambda ctx: RoundRobinRouter(), description="test")

    plugins = load_plugins(
        entry_points=False,
        extra=[(_plugin(dynamo_gateway_register_routers=dynamo_gateway_register_routers), "t")],
    )
    assert "always_first" in plugins.registry.routers
    assert plugins.registry.provided_by("t") == {"routers": ["always_first"]}


def test_duplicate_name_names_both_plugins() -> None:
    @hookimpl
    def dynamo_gateway_register_engines(register: EngineRegister) -> None:
        register("mocker", lambda ctx: None)  # type: ignore[arg-type,return-value]

    with pytest.raises(DuplicatePluginError) as info:
        load_plugins(
            entry_points=False,
            extra=[(_plugin(dynamo_gateway_register_engines=dynamo_gateway_register_engines),
                    "impostor")],
        )  # fmt: skip
    assert "builtin.engines" in str(info.value) and "impostor" in str(info.value)


def test_missing_component_lists_available() -> None:
    reg = load_plugins(entry_points=False).registry
    with pytest.raises(PluginNotFoundError) as info:
        reg.routers.get("psychic")
    message = str(info.value)
    assert "psychic" in message and "round_robin" in message and "least_loaded" in message


def test_non_callable_factory_is_rejected() -> None:
    @hookimpl
    def dynamo_gateway_register_engines(register: EngineRegister) -> None:
        register("broken", "not a factory")  # type: ignore[arg-type]

    with pytest.raises(ConfigError, match="not callable"):
        load_plugins(
            entry_points=False,
            extra=[(_plugin(dynamo_gateway_register_engines=dynamo_gateway_register_engines),
                    "bad")],
        )  # fmt: skip


def test_unknown_hook_fails_check_pending() -> None:
    @hookimpl
    def dynamo_gateway_register_wormholes(register: object) -> None:
        pass

    with pytest.raises(Exception, match="unknown hook"):
        load_plugins(
            entry_points=False,
            extra=[(_plugin(dynamo_gateway_register_wormholes=dynamo_gateway_register_wormholes),
                    "typo")],
        )  # fmt: skip


def test_only_narrows_entry_points_and_rejects_unknown_names() -> None:
    everything = load_plugins()
    entry_point_names = {i.name for i in everything.loaded if not i.builtin}
    assert {"vllm", "sglang", "trtllm", "nixl"} <= entry_point_names
    narrowed = load_plugins(only=["nixl"])
    assert {i.name for i in narrowed.loaded if not i.builtin} == {"nixl"}
    assert "vllm" not in narrowed.registry.engines
    assert {i.name for i in load_plugins(only=[]).loaded if not i.builtin} == set()
    with pytest.raises(ConfigError, match="not-installed"):
        load_plugins(only=["not-installed"])


def test_env_var_narrows_cli_listing() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dynamo_gateway.cli", "plugins", "--json"],
        capture_output=True, text=True, check=True,
        env={"DYNAMO_GATEWAY_PLUGINS": "vllm", "PATH": ""},
    )  # fmt: skip
    import json

    names = {row["name"] for row in json.loads(out.stdout)}
    assert "vllm" in names and "nixl" not in names and "builtin.engines" in names


def test_trace_writes_hook_calls(capsys: pytest.CaptureFixture[str]) -> None:
    load_plugins(entry_points=False, trace=True)
    err = capsys.readouterr().err
    assert "dynamo_gateway_register_engines -> builtin.engines" in err
