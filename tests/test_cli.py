"""The `dynamo-gateway` command: plugins listing, demo-model, bad flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "dynamo_gateway.cli"]


def test_plugins_json_lists_builtins_and_the_four_packages() -> None:
    out = subprocess.run([*CLI, "plugins", "--json"], capture_output=True, text=True, check=True)
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert rows["builtin.engines"]["provides"] == {"engines": ["mocker", "reference"]}
    assert rows["builtin.routers"]["provides"]["routers"] == [
        "kv", "least_loaded", "random", "round_robin",
    ]  # fmt: skip
    assert rows["vllm"]["provides"] == {"engines": ["vllm"]}
    assert rows["sglang"]["provides"] == {"engines": ["sglang"]}
    assert rows["trtllm"]["provides"] == {"engines": ["trtllm"]}
    assert rows["nixl"]["provides"] == {"kv_transports": ["nixl"]}
    assert rows["vllm"]["distribution"] == "dynamo-gateway-vllm"
    assert rows["builtin.engines"]["builtin"] is True


def test_plugins_text_listing_names_families() -> None:
    out = subprocess.run([*CLI, "plugins"], capture_output=True, text=True, check=True)
    assert "engine: mocker" in out.stdout
    assert "router: least_loaded" in out.stdout
    assert "KV transport: nixl" in out.stdout


def test_demo_model_command_builds_once(tmp_path: Path) -> None:
    target = tmp_path / "m"
    first = subprocess.run([*CLI, "demo-model", str(target)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    again = subprocess.run([*CLI, "demo-model", str(target)], capture_output=True, text=True)
    assert again.returncode == 0 and "already holds a model" in again.stderr


def test_serve_with_unknown_engine_fails_clearly(demo_model: Path) -> None:
    out = subprocess.run(
        [*CLI, "serve", "--model", str(demo_model), "--engine", "warp-drive", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "no engine named 'warp-drive'" in out.stderr and "mocker" in out.stderr


def test_serve_with_missing_model_dir_fails_clearly(tmp_path: Path) -> None:
    out = subprocess.run(
        [*CLI, "serve", "--model", str(tmp_path / "absent"), "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_builtin_kv_transports_are_listed() -> None:
    out = subprocess.run([*CLI, "plugins", "--json"], capture_output=True, text=True, check=True)
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert rows["builtin.transports"]["provides"] == {"kv_transports": ["inprocess", "shm", "tcp"]}


def test_serve_with_unknown_kv_transport_fails_clearly(demo_model: Path) -> None:
    out = subprocess.run(
        [*CLI, "serve", "--model", str(demo_model), "--engine", "mocker", "--prefill-workers", "1",
         "--kv-transport", "warp", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "no KV transport named 'warp'" in out.stderr and "tcp" in out.stderr


def test_disagg_flags_reach_the_settings() -> None:
    from dynamo_gateway.cli import _parser, settings_from_args

    args = _parser().parse_args(
        ["serve", "--prefill-workers", "2", "--decode-workers", "3", "--kv-transport", "tcp",
         "--kv-transfer-timeout", "5", "--disagg-min-prefill-tokens", "100",
         "--disagg-max-queued-prefill-tokens", "999"]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert (settings.prefill_workers, settings.decode_workers) == (2, 3)
    assert settings.disagg.kv_transport == "tcp"
    assert settings.disagg.kv_transfer_timeout_s == 5.0
    assert settings.disagg.min_prefill_tokens == 100
    assert settings.disagg.max_queued_prefill_tokens == 999
    assert settings.router_name == "kv"


def test_connection_flags_reach_the_settings() -> None:
    from dynamo_gateway.cli import _parser, settings_from_args

    default = settings_from_args(_parser().parse_args(["serve"])).frontend
    assert (default.keep_alive_s, default.backlog) == (5.0, 2048)
    for command in ("serve", "frontend"):
        args = _parser().parse_args([command, "--keep-alive", "0.5", "--backlog", "4096"])
        fe = settings_from_args(args).frontend
        assert (fe.keep_alive_s, fe.backlog) == (0.5, 4096)


def test_kv_tier_flags_reach_the_settings(tmp_path: Path) -> None:
    from dynamo_gateway.cli import _parser, settings_from_args

    args = _parser().parse_args(
        ["worker", "--kv-host-cache-gb", "1.5", "--kv-disk-cache-dir", str(tmp_path),
         "--kv-disk-cache-gb", "3", "--kv-remote-url", "redis://127.0.0.1:6390/2",
         "--kv-offload-policy", "disk=write-on-evict:min-uses=2"]
    )  # fmt: skip
    kvbm = settings_from_args(args).kvbm
    assert kvbm.enabled
    assert (kvbm.host_cache_gb, kvbm.disk_cache_dir, kvbm.disk_cache_gb) == (1.5, tmp_path, 3.0)
    assert kvbm.remote_url == "redis://127.0.0.1:6390/2"
    assert kvbm.offload_policy == "disk=write-on-evict:min-uses=2"


def test_a_bad_offload_policy_fails_clearly(demo_model: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dynamo_gateway.cli", "serve", "--engine", "mocker",
         "--model", str(demo_model), "--kv-host-cache-gb", "1", "--kv-offload-policy", "tape=x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "unknown tier 'tape'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_engine_args_after_a_bare_double_dash() -> None:
    from dynamo_gateway.cli import _parser, settings_from_args, split_engine_args

    argv = ["serve", "--engine", "vllm", "--", "--max-num-seqs", "8", "--", "x"]
    ours, theirs = split_engine_args(argv)
    assert ours == ["serve", "--engine", "vllm"]
    assert theirs == ["--max-num-seqs", "8", "--", "x"]  # only the first `--` is ours
    args = _parser().parse_args(ours)
    args.engine_args = theirs
    settings = settings_from_args(args)
    assert settings.engine == "vllm"
    assert settings.engine_args == ["--max-num-seqs", "8", "--", "x"]
    assert split_engine_args(["serve"]) == (["serve"], None)
    args = _parser().parse_args(["serve"])
    args.engine_args = None
    assert settings_from_args(args).engine_args == []
