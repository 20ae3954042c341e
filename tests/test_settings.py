"""Settings: defaults, environment, TOML file, flags, and their priority."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("DYNAMO_GATEWAY_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = load_settings()
    assert s.engine == "reference" and s.router_name == "round_robin" and s.workers == 1
    assert s.frontend.host == "127.0.0.1" and s.frontend.port == 8000
    assert s.plugins is None and s.cache.block_size == 16


def test_env_overrides_including_nested(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNAMO_GATEWAY_ROUTER", "least_loaded")
    monkeypatch.setenv("DYNAMO_GATEWAY_MOCKER__SPEEDUP", "25")
    monkeypatch.setenv("DYNAMO_GATEWAY_FRONTEND__MAX_INFLIGHT", "7")
    monkeypatch.setenv("DYNAMO_GATEWAY_PLUGINS", "vllm, nixl")
    s = load_settings()
    assert s.router == "least_loaded"
    assert s.mocker.speedup == 25.0
    assert s.frontend.max_inflight == 7
    assert s.plugins == ["vllm", "nixl"]


def test_empty_plugins_env_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNAMO_GATEWAY_PLUGINS", "")
    assert load_settings().plugins == []


def test_toml_file_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        'router = "random"\nworkers = 3\n[mocker]\nspeedup = 5.0\n'
        '[cache]\nblock_size = 32\n[frontend]\nport = 9000\napi_keys = ["a", "b"]\n'
    )
    s = load_settings(cfg)
    assert (s.router, s.workers, s.mocker.speedup, s.cache.block_size) == ("random", 3, 5.0, 32)
    assert s.frontend.port == 9000 and s.frontend.api_keys == ["a", "b"]

    monkeypatch.setenv("DYNAMO_GATEWAY_WORKERS", "4")
    monkeypatch.setenv("DYNAMO_GATEWAY_MOCKER__SPEEDUP", "6")
    s = load_settings(cfg)
    assert s.workers == 4 and s.mocker.speedup == 6.0 and s.cache.block_size == 32

    s = load_settings(cfg, workers=9, mocker={"speedup": 7.0}, cache={"num_kv_blocks": 5})
    # Flags win, and a nested flag does not wipe the other nested values.
    assert s.workers == 9 and s.mocker.speedup == 7.0 and s.cache.block_size == 32


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[dynamo_gateway]\nengine = "vllm"\n')
    monkeypatch.setenv("DYNAMO_GATEWAY_CONFIG", str(cfg))
    assert load_settings().engine == "vllm"


@pytest.mark.parametrize(
    "kwargs",
    [{"workers": 0}, {"frontend": {"port": 70000}}, {"mocker": {"speedup": 0}},
     {"log_level": "loud"}, {"no_such_field": 1}],
)  # fmt: skip
def test_invalid_values_raise_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="invalid settings"):
        load_settings(**kwargs)


def test_missing_or_bad_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("router = [unclosed")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(bad)


def test_settings_is_one_object() -> None:
    s = Settings()
    assert s.model_dump()["frontend"]["max_body_bytes"] == 4 * 1024 * 1024


def test_models_from_toml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('[[models]]\npath = "/m/a"\nname = "a"\n[[models]]\npath = "/m/b"\n')
    s = load_settings(cfg)
    assert [(str(m.path), m.name) for m in s.models] == [("/m/a", "a"), ("/m/b", None)]
    monkeypatch.setenv("DYNAMO_GATEWAY_MODELS", '[{"path": "/m/c", "name": "c"}]')
    assert [m.name for m in load_settings(cfg).models] == ["c"]


def test_cli_pairs_models_and_names() -> None:
    from dynamo_gateway.cli import _parser, settings_from_args

    args = _parser().parse_args(
        ["serve", "--model", "/m/a", "--served-model-name", "x", "--model", "/m/b"]
    )
    s = settings_from_args(args)
    assert [(str(m.path), m.name) for m in s.models] == [("/m/a", "x"), ("/m/b", None)]
    bad = _parser().parse_args(["serve", "--model", "/m/a", "--served-model-name", "x",
                                "--served-model-name", "y"])  # fmt: skip
    with pytest.raises(ConfigError, match="more --served-model-name"):
        settings_from_args(bad)
