"""The plugin's settings: ``[plugin_config.sglang]`` of the gateway's settings.

::

    [plugin_config.sglang]
    bootstrap_host = "10.0.0.5"          # prefill workers: where decode workers reach us
    [plugin_config.sglang.server_args]   # any `sglang.srt.server_args.ServerArgs` field
    mem_fraction_static = 0.8
    disaggregation_transfer_backend = "nixl"

or ``DYNAMO_GATEWAY_PLUGIN_CONFIG='{"sglang": {"server_args": {...}}}'``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.settings import Settings

__all__ = ["OWNED_SERVER_ARGS", "SglangSettings", "sglang_settings"]

# Server args the plugin derives from the gateway's own settings; setting them in
# `server_args` would desynchronise the two, so it is refused.
OWNED_SERVER_ARGS = frozenset({"model_path", "kv_events_config", "disaggregation_mode"})


class SglangSettings(BaseModel):
    """What the ``sglang`` engine reads from ``plugin_config["sglang"]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server_args: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of sglang.Engine (ServerArgs fields), after ours",
    )
    bootstrap_host: str | None = Field(
        None,
        description="prefill role: the host decode workers use to reach this worker's "
        "bootstrap server (default: ServerArgs.host unless it is a wildcard)",
    )


def sglang_settings(settings: Settings) -> SglangSettings:
    """Validate ``plugin_config["sglang"]``; raises `ConfigError` naming the problem."""
    raw = settings.plugin_config.get("sglang", {})
    try:
        parsed = SglangSettings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"bad [plugin_config.sglang]: {exc}") from None
    owned = sorted(OWNED_SERVER_ARGS & parsed.server_args.keys())
    if owned:
        raise ConfigError(
            f"[plugin_config.sglang.server_args] may not set {', '.join(owned)}: the plugin "
            "derives them (--model, --role, the worker's KV event plane)"
        )
    if settings.engine_args:
        raise ConfigError(
            "the sglang engine takes no arguments after `--`; put SGLang server args in "
            "[plugin_config.sglang.server_args] (a table of ServerArgs fields)"
        )
    return parsed
