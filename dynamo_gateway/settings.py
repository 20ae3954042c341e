"""One settings object for the whole gateway.

Sources, highest priority first: explicit values (command-line flags),
environment variables (``DYNAMO_GATEWAY_*``, nested with ``__``, e.g.
``DYNAMO_GATEWAY_MOCKER__SPEEDUP=10``), a TOML file (``--config FILE`` or
``DYNAMO_GATEWAY_CONFIG``), then the defaults below. Code receives a
`Settings` instance; nothing else reads the environment.
"""

from __future__ import annotations

import contextvars
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from dynamo_gateway.errors import ConfigError

ENV_PREFIX = "DYNAMO_GATEWAY_"

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "dynamo_gateway_config_file", default=None
)


class TenantConfig(BaseModel):
    """One tenant: the hashes of its API keys and its limits (docs/operations.md).

    Also the schema of each entry of an ``--api-keys-file``. Keys are never
    stored, only ``sha256:<hex>`` (or ``hmac-sha256:<hex>`` with a pepper):
    ``dynamo-gateway keys hash`` computes them.
    """

    # A key pasted where its hash belongs must not be echoed by a validation error.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    key_hashes: list[str] = Field(default_factory=list)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(
        None, gt=0, description="prompt + completion tokens, charged as they become known"
    )
    max_concurrent: int | None = Field(
        None, ge=1, description="requests in flight; more wait in the tenant's queue"
    )
    weight: int = Field(1, ge=1, le=100, description="share of freed slots under contention")

    @field_validator("key_hashes")
    @classmethod
    def _check_hashes(cls, value: list[str]) -> list[str]:
        for i, h in enumerate(value):
            # The message never echoes the value: it may be a key pasted by mistake.
            if not re.fullmatch(r"(sha256|hmac-sha256):[0-9a-f]{64}", h):
                raise ValueError(
                    f"key_hashes[{i}] is not 'sha256:<64 hex>' or 'hmac-sha256:<64 hex>' "
                    "(see `dynamo-gateway keys hash`)"
                )
        return value


class FrontendSettings(BaseModel):
    """The HTTP frontend."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="accepted bearer tokens")
    max_inflight: int = Field(1024, ge=1, description="admission limit; beyond it 429")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger bodies get 413")
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request body not received in full after this gets 408 (a slow upload "
        "would otherwise hold an admission slot for as long as it likes)",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After on 429/503")
    dynamo_metric_names: bool = Field(
        False,
        description="also export the Dynamo-shaped series as dynamo_frontend_* (Dynamo's own "
        "names), so that dashboards made for Dynamo's frontend read them",
    )
    server: Literal["hypercorn", "uvicorn"] = "hypercorn"
    keep_alive_s: float = Field(
        5.0,
        gt=0,
        description="an idle keep-alive connection is closed after this; the server keeps a "
        "connection's state until then, even after the client left (75 s held ~27 MiB per "
        "2,000 clients)",
    )
    backlog: int = Field(
        2048,
        ge=1,
        description="listen backlog: connections the kernel holds until the server accepts "
        "them (capped by net.core.somaxconn); beyond it new connections stall in SYN retries",
    )
    stream_interval: int = Field(
        1,
        ge=1,
        description="tokens per streamed event: 1 sends one event per token (the default); "
        "more coalesces, like vLLM's --stream-interval",
    )
    tool_call_parser: str | None = Field(
        None, description="tool-call format of the models' output (default: from the template)"
    )
    reasoning_parser: str | None = Field(
        None, description="reasoning markers of the models' output (default: none)"
    )
    # Tenants and security (docs/operations.md). `api_keys` form the "default" tenant.
    tenants: list[TenantConfig] = Field(default_factory=list, description="tenants, inline")
    api_keys_file: Path | None = Field(
        None, description="TOML or JSON file of tenants (re-read by POST /admin/reload)"
    )
    api_key_pepper: SecretStr | None = Field(
        None, description="secret mixed into key hashes (hmac-sha256:...); keep it out of files"
    )
    max_queued_per_tenant: int = Field(
        64, ge=0, description="at --max-inflight, requests wait in per-tenant queues (0: 429)"
    )
    queue_timeout_s: float = Field(
        1.0, ge=0, description="longest wait in a tenant queue before a 429"
    )
    admin_port: int | None = Field(
        None, ge=0, le=65535, description="serve /admin/* on this port (default: off)"
    )
    admin_host: str = Field("127.0.0.1", description="address of the admin port")
    admin_key: SecretStr | None = Field(
        None, description="bearer token for /admin/* (required without an admin port)"
    )
    tls_cert: Path | None = Field(None, description="PEM certificate: serve HTTPS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")

    @model_validator(mode="after")
    def _check_tls(self) -> FrontendSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        return self


class CacheSettings(BaseModel):
    """Every engine's paged KV cache."""

    block_size: int = Field(16, ge=1, le=4096, description="tokens per KV block")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="device KV capacity in blocks (default: the engine's choice)"
    )


class SchedulerSettings(BaseModel):
    """Continuous batching limits, for every engine that schedules itself."""

    max_num_seqs: int = Field(256, ge=1, description="sequences running at once")
    max_num_batched_tokens: int = Field(8192, ge=1, description="token budget per step")


class MockerSettings(BaseModel):
    """The simulated engine's timing model.

    Step time in ms = prefill_base_ms + prefill_ms_per_token * new_tokens
    + prefill_ms_per_token2 * new_tokens**2 (if the step prefills)
    + decode_base_ms + decode_ms_per_kv_block * active_kv_blocks (if it decodes),
    divided by ``speedup``. Its KV capacity defaults to 16384 blocks.

    The defaults are NVIDIA Dynamo 1.6.1's mocker (prefill 16.50 + 0.01518 t +
    4.21e-7 t^2 ms; decode 5.74 + 54.01 u - 25.74 u^2 ms with u the used share of
    1M KV tokens, linearised here per 16-token block), so trace replays compare
    with Dynamo's replay side by side (docs/benchmarks.md).
    """

    speedup: float = Field(1.0, gt=0, description="run the timing model this many times faster")
    prefill_base_ms: float = Field(16.50142, ge=0)
    prefill_ms_per_token: float = Field(1.518344e-2, ge=0)
    prefill_ms_per_token2: float = Field(4.209989e-7, ge=0)
    decode_base_ms: float = Field(5.74, ge=0)
    decode_ms_per_kv_block: float = Field(8.24e-4, ge=0)
    # The simulated model's KV geometry (default: Llama-3-70B, bf16) and the
    # bandwidth a disaggregated handoff moves it at.
    kv_layers: int = Field(80, ge=1)
    kv_heads: int = Field(8, ge=1)
    kv_head_dim: int = Field(128, ge=1)
    kv_transfer_gbps: float = Field(
        25.0, gt=0, description="simulated KV transfer bandwidth, GB/s (200 Gb/s RDMA)"
    )
    # KV tiers ([kvbm]) are simulated: capacities from [kvbm], these read speeds.
    host_tier_gbps: float = Field(20.0, gt=0, description="simulated host->device GB/s (PCIe 4)")
    disk_tier_gbps: float = Field(5.0, gt=0, description="simulated NVMe read GB/s")
    disk_tier_latency_ms: float = Field(0.1, ge=0, description="simulated per-block disk read")
    remote_tier_gbps: float = Field(
        1.25, gt=0, description="simulated shared-store GB/s (10 Gb/s network)"
    )
    remote_tier_latency_ms: float = Field(0.5, ge=0, description="simulated per-block store read")
    remote_tier_gb: float = Field(64.0, gt=0, description="simulated shared-store capacity, GiB")


class DisaggSettings(BaseModel):
    """`[disagg]`: disaggregated prefill and decode (docs/disaggregation.md)."""

    kv_transport: str | None = Field(
        None, description="force one KV transport (default: the first that connects the pair)"
    )
    kv_transfer_timeout_s: float = Field(
        30.0, gt=0, description="a prefill worker frees unpulled KV blocks after this long"
    )
    min_prefill_tokens: int = Field(
        512,
        ge=0,
        description="prompts with fewer uncached tokens than this prefill on the decode worker",
    )
    max_queued_prefill_tokens: int = Field(
        65536,
        ge=1,
        description="prefill tokens in flight per prefill worker above which new "
        "prefills stay local (the prefill pool is saturated)",
    )


class KvbmSettings(BaseModel):
    """`[kvbm]`: KV cache tiers below the device cache (docs/kv-tiers.md)."""

    host_cache_gb: float = Field(0.0, ge=0, description="host RAM tier size, GiB (0: off)")
    disk_cache_dir: Path | None = Field(None, description="disk tier directory (unset: off)")
    disk_cache_gb: float = Field(8.0, gt=0, description="disk tier size, GiB")
    remote_url: str | None = Field(
        None, description="shared tier every worker of a model reads, e.g. redis://127.0.0.1:6379"
    )
    remote_ttl_s: float | None = Field(
        None, gt=0, description="shared tier: blocks expire this long after they were written"
    )
    offload_policy: str = Field(
        "host=write-on-evict,disk=write-on-evict,remote=write-through",
        description="when blocks move down: one mode (write-through | write-on-evict) or "
        "tier=mode[:min-uses=N],... for host, disk and remote",
    )
    max_pending_writes: int = Field(
        256, ge=1, description="disk/remote writes queued per worker before new ones are dropped"
    )

    @field_validator("offload_policy")
    @classmethod
    def _check_policy(cls, value: str) -> str:
        from dynamo_gateway.kvbm.policy import parse_offload_policy

        parse_offload_policy(value)  # ValueError -> a validation error naming the part
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.host_cache_gb or self.disk_cache_dir or self.remote_url)


class ReferenceSettings(BaseModel):
    """The built-in torch reference engine."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: the checkpoint's dtype on CUDA, float32 on CPU"
    )
    kv_cache_memory_fraction: float = Field(
        0.25,
        gt=0,
        le=0.95,
        description="share of free memory for the KV cache when cache.num_kv_blocks is unset",
    )
    max_kv_cache_gb: float = Field(
        1.0, gt=0, description="cap on the automatically sized KV cache, in GiB"
    )
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU")


class RuntimeSettings(BaseModel):
    """`[runtime]`: how frontends and workers find and reach each other."""

    discovery: str = Field(
        "memory://", description="memory://, file:///dir, etcd://host:port[/namespace]"
    )
    events: str = Field("memory://", description="memory://, zmq:///dir, nats://host:port")
    lease_ttl_s: float = Field(
        3.0, ge=1.0, le=600.0, description="a dead or frozen worker is dropped after this"
    )
    migration_limit: int = Field(
        3, ge=0, description="times a request may move to another worker when its worker fails"
    )
    migration_wait_s: float = Field(
        10.0, ge=0, description="a request being migrated waits this long for a live worker"
    )
    request_timeout_s: float | None = Field(
        None, gt=0, description="per-request deadline on the request plane (None: no limit)"
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="a stopping worker waits this long for in-flight requests"
    )
    router_replica_sync: bool = Field(
        False, description="share routing decisions with other frontends over the event plane"
    )
    connections_per_worker: int = Field(
        2, ge=1, le=64, description="request-plane TCP connections a frontend keeps per worker"
    )


class WorkerSettings(BaseModel):
    """`[worker]`: one `dynamo-gateway worker` process."""

    host: str = Field("127.0.0.1", description="request-plane listen address")
    port: int = Field(0, ge=0, le=65535, description="request-plane port (0: any free port)")
    advertise_host: str | None = Field(
        None, description="address other hosts reach this worker at (default: host)"
    )
    status_port: int | None = Field(
        0, ge=0, le=65535, description="HTTP /health and /metrics port (0: any; None: off)"
    )
    role: Literal["aggregated", "prefill", "decode"] = "aggregated"
    worker_id: str | None = Field(None, description="default: model-engine-<random>")


class KvRouterSettings(BaseModel):
    """`[kv_router]`: the `kv` routing policy (KV-cache overlap and load)."""

    overlap_weight: float = Field(
        2.0,
        ge=0,
        description="cost = overlap_weight * prefill_blocks + decode_blocks (Dynamo: 1.0; "
        "2.0 measured best on the Mooncake replays, docs/benchmarks.md)",
    )
    temperature: float = Field(
        0.0, ge=0, description="0: argmin of the cost; above 0: softmax sampling over it"
    )
    use_kv_events: bool = Field(
        True, description="index the workers' KV events; off: approximate from routing decisions"
    )
    approx_ttl_s: float = Field(
        120.0, gt=0, description="approximate mode: a routed prefix is assumed cached this long"
    )
    session_ttl_s: float = Field(
        300.0, ge=0, description="X-Session-Id affinity lasts this long after the last request"
    )
    tier_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "GPU": 1.0,
            "CPU": 0.75,
            "DISK": 0.25,
            "REMOTE": 0.2,
            "STORAGE": 0.25,
        },
        description="credit of a prefix block by the medium it would come from "
        "(Dynamo: host 0.75, disk 0.25); media not named count for nothing",
    )
    shared_media: list[str] = Field(
        default_factory=lambda: ["REMOTE"],
        description="media every worker of a model reads (a shared store): a block "
        "there counts for all of them",
    )
    max_imbalance_blocks: int | None = Field(
        None,
        ge=0,
        description="if the cheapest worker has this many more active blocks than the least "
        "loaded one, route by load instead (None: off, Dynamo's cost alone)",
    )
    seed: int | None = Field(
        None, description="seeds tie-breaks and sampling (None: random): reproducible replays"
    )


class TracingSettings(BaseModel):
    """`[tracing]`: OpenTelemetry spans of each request (docs/operations.md#tracing).

    Off unless an exporter is named; off, a request pays a few `None` checks.
    """

    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector, e.g. http://127.0.0.1:4318 (/v1/traces is added "
        "when the URL has no path); needs the `tracing` extra",
    )
    span_file: Path | None = Field(
        None, description="also write finished spans here, one JSON object per line"
    )
    service_name: str | None = Field(
        None, description="service.name of the spans (default: dynamo-gateway-<command>)"
    )
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of new traces recorded; a client's traceparent decides for its own",
    )

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint or self.span_file)


class ServedModel(BaseModel):
    """One model to serve: a local directory and the name clients ask for."""

    path: Path
    name: str | None = Field(None, description="served name (default: the directory name)")


class Settings(BaseSettings):
    """Everything configurable. Plugins read their own section from `plugin_config`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    plugins: Annotated[list[str] | None, NoDecode] = Field(
        None, description="entry-point plugins to load (comma-separated); unset loads all"
    )
    trace_hooks: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per log line (time, level, request_id, ...)"
    )

    models: list[ServedModel] = Field(
        default_factory=list, description="models to serve, each with its own worker pool"
    )
    max_model_len: int | None = Field(None, ge=1)
    engine: str = "reference"
    router: str | None = Field(
        None, description="routing policy; unset: kv for several workers, else round_robin"
    )
    workers: int = Field(1, ge=1)
    prefill_workers: int = Field(
        0, ge=0, description="embedded serve: prefill-only workers (0: aggregated serving)"
    )
    decode_workers: int | None = Field(
        None,
        ge=1,
        description="embedded serve with prefill workers: decode workers (default: workers)",
    )

    frontend: FrontendSettings = Field(default_factory=FrontendSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    mocker: MockerSettings = Field(default_factory=MockerSettings)
    reference: ReferenceSettings = Field(default_factory=ReferenceSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    kv_router: KvRouterSettings = Field(default_factory=KvRouterSettings)
    disagg: DisaggSettings = Field(default_factory=DisaggSettings)
    kvbm: KvbmSettings = Field(default_factory=KvbmSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    plugin_config: dict[str, dict[str, Any]] = Field(default_factory=dict)
    engine_args: list[str] = Field(
        default_factory=list,
        description="arguments handed to the engine plugin as they are "
        "(`serve|worker ... -- ARGS`: vLLM's engine flags for --engine vllm)",
    )

    @field_validator("plugins", mode="before")
    @classmethod
    def _split_plugins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @property
    def router_name(self) -> str:
        """The routing policy: `router`, else kv when a model has several workers."""
        if self.router:
            return self.router
        return "kv" if self.workers > 1 or self.prefill_workers > 0 else "round_robin"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))


class _TomlSource(PydanticBaseSettingsSource):
    """The TOML file named by `load_settings(config_file=...)` or DYNAMO_GATEWAY_CONFIG."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = _config_file.get()
        self._data: dict[str, Any] = _read_toml(path) if path else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    # A [dynamo_gateway] table is accepted so the file can be shared with other tools.
    section = data.get("dynamo_gateway", data)
    return section if isinstance(section, dict) else {}


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build `Settings` from flags (`overrides`), the environment and a TOML file."""
    path = config_file or os.environ.get(f"{ENV_PREFIX}CONFIG")
    token = _config_file.set(Path(path) if path else None)
    try:
        return Settings(**overrides)
    except ConfigError:
        raise
    except ValidationError as exc:
        # Without the input values: settings hold API keys and the admin key.
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise ConfigError(f"invalid settings: {problems}") from None
    except ValueError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc
    finally:
        _config_file.reset(token)
