"""The trtllm plugin: listed without importing TensorRT-LLM, clear when it is missing."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

import dynamo_gateway
from dynamo_gateway.engines.base import Engine, EngineContext, EngineState
from dynamo_gateway.errors import ConfigError
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.settings import load_settings

PLUGIN = "trtllm"
DISTRIBUTION = "dynamo-gateway-trtllm"
MODULE = "dynamo_gateway_trtllm.plugin"
ENGINE_MODULE = "tensorrt_llm"
HAS_ENGINE = importlib.util.find_spec(ENGINE_MODULE) is not None


def _context(tmp_path: Path) -> EngineContext:
    card = ModelCard(
        path=tmp_path, served_name="m", max_model_len=128, vocab_size=100, eos_token_ids=()
    )
    return EngineContext(settings=load_settings(), model=card, worker_id="w0")


def test_plugin_is_installed() -> None:
    eps = importlib.metadata.entry_points(group="dynamo_gateway", name=PLUGIN)
    assert [ep.value for ep in eps] == [MODULE]

    plugins = load_plugins()
    info = next(i for i in plugins.loaded if i.name == PLUGIN)
    assert info.module == MODULE
    assert info.distribution == DISTRIBUTION
    assert info.version == "0.1.0"
    assert not info.builtin

    registration = plugins.registry.engines.registration(PLUGIN)
    assert registration.plugin == PLUGIN
    assert "tensorrt-llm" in registration.description
    assert plugins.registry.provided_by(PLUGIN) == {"engines": [PLUGIN]}


def test_listing_does_not_import_engine() -> None:
    # A fresh interpreter: this process may have imported anything by now.
    code = textwrap.dedent(
        f"""
        import sys
        from dynamo_gateway.plugins import load_plugins

        load_plugins(only=[])
        had_cuda = "torch.cuda" in sys.modules
        plugins = load_plugins()
        assert {PLUGIN!r} in plugins.registry.engines
        assert {ENGINE_MODULE!r} not in sys.modules, "listing imported the engine"
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


def test_missing_engine_gives_clear_error(tmp_path: Path) -> None:
    if HAS_ENGINE:
        pytest.skip("TensorRT-LLM is installed: the missing-library error cannot happen here")
    factory = load_plugins(only=[PLUGIN]).registry.engines.get(PLUGIN)
    with pytest.raises(ConfigError, match=r"pip install 'dynamo-gateway-trtllm\[engine\]'") as exc:
        factory(_context(tmp_path))
    assert "NVIDIA GPU" in str(exc.value)


def test_present_engine_builds_without_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in module is enough: building imports TensorRT-LLM, start() loads the model.
    monkeypatch.setitem(sys.modules, ENGINE_MODULE, ModuleType(ENGINE_MODULE))
    factory = load_plugins(only=[PLUGIN]).registry.engines.get(PLUGIN)
    engine = factory(_context(tmp_path))
    assert isinstance(engine, Engine)
    assert engine.state is EngineState.CREATED
    assert engine.block_size == 16


def test_bad_plugin_settings_are_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, ENGINE_MODULE, ModuleType(ENGINE_MODULE))
    factory = load_plugins(only=[PLUGIN]).registry.engines.get(PLUGIN)
    card = ModelCard(
        path=tmp_path, served_name="m", max_model_len=128, vocab_size=100, eos_token_ids=()
    )
    settings = load_settings(plugin_config={PLUGIN: {"no_such_option": 1}})
    with pytest.raises(ConfigError, match="no_such_option"):
        factory(EngineContext(settings=settings, model=card, worker_id="w0"))


@pytest.mark.trtllm
def test_real_engine_builds_without_starting(tmp_path: Path) -> None:
    factory = load_plugins(only=[PLUGIN]).registry.engines.get(PLUGIN)
    engine = factory(_context(tmp_path))
    assert engine.state is EngineState.CREATED


def test_narrowing_excludes_plugin() -> None:
    plugins = load_plugins(only=[])
    assert PLUGIN not in {i.name for i in plugins.loaded}
    assert PLUGIN not in plugins.registry.engines
    assert "mocker" in plugins.registry.engines  # built-ins always load

    with pytest.raises(ConfigError, match=PLUGIN):
        plugins.registry.engines.get(PLUGIN)


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
    assert PLUGIN not in plugins.registry.engines
