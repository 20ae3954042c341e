"""The ``[plugin_config.trtllm]`` section: how this plugin builds ``tensorrt_llm.LLM``.

Everything else (block size, batch limits, the model) comes from the core settings;
see README.md for the mapping. Environment: ``DYNAMO_GATEWAY_PLUGIN_CONFIG__TRTLLM__...``
like any other plugin section.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.settings import Settings

__all__ = ["PLUGIN", "TrtllmSettings", "trtllm_settings"]

PLUGIN = "trtllm"


class TrtllmSettings(BaseModel):
    """Options of the trtllm engine (validated when the engine is built)."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1)
    dtype: str = Field("auto", description="model dtype, as TensorRT-LLM spells it")
    free_gpu_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="KvCacheConfig.free_gpu_memory_fraction"
    )
    enable_block_reuse: bool = Field(True, description="prefix caching (KvCacheConfig)")
    event_buffer_max_size: int = Field(
        1024, ge=0, description="KV events buffered by TensorRT-LLM; 0 turns KV events off"
    )
    iter_stats: bool = Field(
        True, description="enable_iter_perf_stats: load() needs it, off leaves it at zero"
    )
    poll_timeout_s: float = Field(
        1.0, gt=0, description="timeout of each get_kv_cache_events_async/get_stats_async wait"
    )
    max_logprobs: int = Field(
        20, ge=0, description="largest top-logprobs request accepted (more is a 400)"
    )
    cache_transceiver_backend: Literal["DEFAULT", "UCX", "NIXL", "MPI"] = Field(
        "DEFAULT", description="CacheTransceiverConfig.backend on prefill and decode workers"
    )
    skip_tokenizer_init: bool = Field(
        False, description="the engine works on token ids; True needs eos ids in the model card"
    )
    llm_args: dict[str, Any] = Field(
        default_factory=dict,
        description="extra keyword arguments for tensorrt_llm.LLM (they win over ours)",
    )


def trtllm_settings(settings: Settings) -> TrtllmSettings:
    """Our section of `settings.plugin_config`, validated; raises `ConfigError`."""
    raw = settings.plugin_config.get(PLUGIN, {})
    try:
        return TrtllmSettings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"bad [plugin_config.{PLUGIN}] settings: {exc}") from None
