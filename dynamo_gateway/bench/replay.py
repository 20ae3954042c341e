"""Trace replay: a Mooncake trace sent through the real frontend, router and engines.

``dynamo-gateway bench replay`` starts an in-process fleet (:func:`embedded` with
``settings.workers`` engines, ``settings.router`` in front) and replays a trace against
its ASGI app open-loop: each request is sent at its (scaled) trace timestamp, whatever
the earlier ones are doing.

NOTE on the transport: requests are handed to the ASGI app directly (scope, ``receive``,
``send``), not through sockets. Everything the frontend does in production still runs -
body decoding, validation, routing, the engine stream, detokenization, SSE encoding - but
no HTTP parsing on either side, which matters on a small machine where client, gateway
and a simulated fleet share a CPU. (``httpx.ASGITransport`` would buffer the whole
response and hide TTFT.) Each ``http.response.body`` message is timestamped on arrival.

NOTE on time: ``arrival_speedup`` (A) compresses the trace's arrival gaps: the
experiment *is* the faster trace, so latencies are reported as measured. ``speedup`` (S)
runs the whole experiment S times faster than real time (arrivals divided by S, and the
mocker's timing model divided by S); measured latencies and durations are multiplied
back by S, so every reported figure is in trace time. Large S only stays faithful while
the process keeps up: ``dispatch_lag_ms`` (how late requests left, in trace time) tells
when it did not. ``virtual_clock`` removes that limit: the whole run (arrivals, the
mocker's steps, the planner's intervals) happens on a simulated clock
(`dynamo_gateway.bench.vclock`) that jumps instead of waiting, so a replay takes the CPU
time its work needs, whatever the trace's length, and nothing can fall behind.

NOTE on scaling: with ``planner`` (a planner TOML) the fleet starts empty and the real
planner sizes it (`dynamo_gateway.bench.scaled`); the summary then has the worker time
used and the workers over time. With SLA targets (``ttft_target_ms``, ``itl_target_ms``,
or the planner file's) it has the share of requests that met them. A live replay with a
planner runs at speedup 1 (the planner's own intervals are wall-clock time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from dynamo_gateway.bench.httpclient import SSEDecoder
from dynamo_gateway.bench.loadgen import BenchConfig, RequestRecord, aggregate
from dynamo_gateway.bench.scaled import (
    ScaledFleet,
    replay_planner_config,
    scaled_fleet,
    sla_attainment,
)
from dynamo_gateway.bench.stats import summarize
from dynamo_gateway.bench.trace import (
    DEFAULT_TRACE_BLOCK_SIZE,
    PromptSynthesizer,
    TraceRequest,
    arrival_offsets,
    load_trace,
)
from dynamo_gateway.clock import now
from dynamo_gateway.planner.config import PlannerConfig

__all__ = [
    "DYNAMO_MOCKER_KV_TOKENS",
    "DYNAMO_TIMING",
    "ReplayConfig",
    "ReplayRecord",
    "ReplayResult",
    "default_model_dir",
    "format_replay_summary",
    "plot_ttft_cdfs",
    "replay",
    "run_replay",
]

log = logging.getLogger(__name__)

#: KV capacity of one Dynamo mocker worker in tokens (16384 blocks of 64): the default
#: capacity of a replay worker, so that cache hit rates compare.
DYNAMO_MOCKER_KV_TOKENS = 16384 * 64

#: NVIDIA Dynamo 1.6.1's mocker timing (its built-in polynomials) in our
#: `MockerSettings` terms. Prefill is exact: 16.50142 + 0.01518344 t + 4.209989e-7 t^2 ms
#: for t new tokens in the step. Decode is 5.74 + 54.01 u - 25.74 u^2 ms with u the
#: used fraction of a 1M-token KV cache; linearised per 16-token block (the quadratic
#: term is < 3% below u = 0.1, where these traces run).
DYNAMO_TIMING: dict[str, float] = {
    "prefill_base_ms": 16.50142,
    "prefill_ms_per_token": 1.518344e-2,
    "prefill_ms_per_token2": 4.209989e-7,
    "decode_base_ms": 5.74,
    "decode_ms_per_kv_block": 54.01 * 16 / DYNAMO_MOCKER_KV_TOKENS,
}

_ERROR_BODY_LIMIT = 300
_MAX_ERROR_KINDS = 5


@dataclass(slots=True)
class ReplayConfig:
    """Parameters of one replay."""

    trace: Path
    model: Path | None = None  # None: the demo model, built once into a cache dir
    engine: str = "mocker"
    workers: int = 1
    router: str = "round_robin"
    #: Disaggregated fleet: this many prefill workers (0: `workers` aggregated ones) ...
    prefill_workers: int = 0
    #: ... and this many decode workers.
    decode_workers: int = 1
    #: Prefill locally below this many uncached prompt tokens (`disagg.min_prefill_tokens`);
    #: 0 disaggregates every request; None: the settings' default.
    disagg_min_prefill_tokens: int | None = None
    #: Mocker: simulated KV transfer bandwidth in GB/s; None: the settings' default.
    kv_transfer_gbps: float | None = None
    arrival_speedup: float = 1.0
    speedup: float = 1.0
    trace_block_size: int = DEFAULT_TRACE_BLOCK_SIZE
    limit: int | None = None
    #: Context window; None: the longest request of the (limited) trace, rounded up.
    max_model_len: int | None = None
    #: Engine KV block size; None: the settings' default.
    block_size: int | None = None
    #: KV capacity per worker in blocks; None: `DYNAMO_MOCKER_KV_TOKENS` worth.
    num_kv_blocks: int | None = None
    seed: int = 0
    #: ``[kvbm]`` settings (KV tiers; simulated on the mocker), e.g. {"host_cache_gb": 8}.
    kvbm: dict[str, Any] = field(default_factory=dict)
    #: ``[kv_router]`` overrides, e.g. {"tier_weights": {"GPU": 1.0}} (tier-blind).
    kv_router: dict[str, Any] = field(default_factory=dict)
    #: Mocker timing: "dynamo" (`DYNAMO_TIMING`, scaled to the block size) or
    #: "settings" (the `MockerSettings` from defaults, environment and config file).
    timing: str = "dynamo"
    #: Per-request limit in wall-clock seconds.
    timeout_s: float = 600.0
    #: Run on a simulated clock (`dynamo_gateway.bench.vclock`); needs speedup 1.
    virtual_clock: bool = False
    #: Planner TOML: the fleet starts empty and the planner scales it (see the docstring).
    planner: Path | None = None
    #: Seconds a worker the planner adds takes to start (trace time).
    worker_startup_s: float = 0.0
    #: Seconds between samples of the worker count (trace time).
    sample_interval_s: float = 1.0
    #: SLA targets for the attainment figures; None: the planner file's model's, if any.
    ttft_target_ms: float | None = None
    itl_target_ms: float | None = None
    #: Progress lines on stderr: True / False, or None for "only on a TTY".
    progress: bool | None = None
    #: Seconds between progress lines.
    progress_interval_s: float = 5.0

    def validate(self) -> None:
        """Raise :class:`ValueError` for impossible settings."""
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.prefill_workers < 0 or self.decode_workers < 1:
            raise ValueError("prefill_workers must be >= 0 and decode_workers >= 1")
        if not self.arrival_speedup > 0 or not math.isfinite(self.arrival_speedup):
            raise ValueError("arrival_speedup must be > 0")
        if not self.speedup > 0 or not math.isfinite(self.speedup):
            raise ValueError("speedup must be > 0")
        if self.trace_block_size < 1:
            raise ValueError("trace_block_size must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if self.timing not in ("dynamo", "settings"):
            raise ValueError(f"timing must be 'dynamo' or 'settings', not {self.timing!r}")
        if self.virtual_clock and self.speedup != 1:
            raise ValueError("a virtual-clock replay runs at speedup 1 (it never waits anyway)")
        if self.planner is not None and self.speedup != 1:
            raise ValueError("a replay with a planner runs at speedup 1 (or on --virtual-clock)")
        if self.planner is not None and self.prefill_workers:
            raise ValueError("the planner sizes the fleet: give its pools in the planner file")
        if self.worker_startup_s < 0 or self.sample_interval_s <= 0:
            raise ValueError("worker_startup_s must be >= 0 and sample_interval_s > 0")

    def to_json_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trace"] = str(self.trace)
        out["model"] = None if self.model is None else str(self.model)
        out["planner"] = None if self.planner is None else str(self.planner)
        return out


@dataclass(slots=True)
class ReplayRecord:
    """What one replayed request measured (seconds on `dynamo_gateway.clock.now`)."""

    index: int
    arrival_s: float  # scheduled send time, seconds after the first (wall clock)
    input_length: int
    max_tokens: int
    start: float = 0.0
    end: float = 0.0
    times: list[float] = field(default_factory=list)  # content-bearing SSE events
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class ReplayResult:
    """Aggregated figures of a replay; every time is in trace time."""

    config: ReplayConfig
    summary: dict[str, Any]
    per_request: list[dict[str, Any]] = field(repr=False)
    #: The measured window on the event loop's clock: first send, last completion.
    window: tuple[float, float] = (0.0, 0.0)

    def to_json_dict(self, *, per_request: bool = True) -> dict[str, Any]:
        out = dict(self.summary)
        out["config"] = self.config.to_json_dict()
        if per_request:
            out["per_request"] = self.per_request
        return out


# -- the in-process ASGI client ------------------------------------------------------


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: dict[str, int] | None = None


class _Choice(msgspec.Struct):
    text: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


async def _post_stream(app: Any, path: str, body: bytes, record: ReplayRecord) -> None:
    """POST ``body`` to ``app`` and fill ``record`` from its SSE stream."""
    finished = asyncio.get_running_loop().create_future()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished  # the client stays until the response is complete
        return {"type": "http.disconnect"}

    sse = SSEDecoder()
    status = 0
    err_body = b""
    done = False
    times = record.times

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, err_body, done
        t = now()
        if message["type"] == "http.response.start":
            status = message["status"]
            return
        if message["type"] != "http.response.body":
            return
        data: bytes = message.get("body", b"")
        if status != 200:
            err_body += data[: _ERROR_BODY_LIMIT - len(err_body)]
        elif record.error is None:
            for payload in sse.feed(data):
                if payload == b"[DONE]":
                    done = True
                    continue
                chunk = _decode_chunk(payload)
                if chunk.error is not None:
                    record.error = f"error event: {payload[:200].decode('utf-8', 'replace')}"
                    break
                if chunk.choices and chunk.choices[0].text:
                    times.append(t)
                usage = chunk.usage
                if usage is not None:
                    record.output_tokens = usage.completion_tokens or 0
                    record.prompt_tokens = usage.prompt_tokens or 0
                    details = usage.prompt_tokens_details or {}
                    record.cached_tokens = int(details.get("cached_tokens", 0))
        if not message.get("more_body", False) and not finished.done():
            finished.set_result(None)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"replay"),
            (b"content-type", b"application/json"),
            (b"accept", b"text/event-stream"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 0),
        "server": ("replay", 80),
    }
    try:
        await app(scope, receive, send)
    finally:
        if not finished.done():
            finished.set_result(None)
    if status != 200:
        text = err_body.decode("utf-8", "replace").strip()
        record.error = f"HTTP {status}: {text}"
    elif record.error is None and not done:
        record.error = "stream ended without data: [DONE]"


# -- the run -------------------------------------------------------------------------


def default_model_dir() -> Path:
    """The demo model in the user's cache dir, built on first use."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    out = base / "dynamo-gateway" / "demo-model"
    if not (out / "config.json").is_file():
        from dynamo_gateway.models.demo import build_demo_model

        print(f"replay: building the demo model into {out}", file=sys.stderr, flush=True)
        build_demo_model(out)
    return out


def _settings(config: ReplayConfig, model: Path, requests: Sequence[TraceRequest]) -> Any:
    from dynamo_gateway.settings import load_settings

    max_len = config.max_model_len
    if max_len is None:
        longest = max((r.input_length + r.output_length for r in requests), default=1)
        max_len = -(-(longest + 1) // 1024) * 1024
    cache: dict[str, Any] = {}
    if config.block_size is not None:
        cache["block_size"] = config.block_size
    overrides: dict[str, Any] = {
        "models": [{"path": model, "name": "replay"}],
        "engine": config.engine,
        "workers": config.workers,
        "prefill_workers": config.prefill_workers,
        "decode_workers": config.decode_workers,
        "router": config.router,
        "max_model_len": max_len,
        "log_level": "warning",
        "mocker": {"speedup": config.speedup},
        "kvbm": config.kvbm,
        # Tie-breaks seeded: the same replay routes the same way every time.
        "kv_router": {"seed": config.seed, **config.kv_router},
        "frontend": {"max_inflight": 1 << 20, "max_body_bytes": 64 * 1024 * 1024},
    }
    settings = load_settings(**overrides, cache=cache) if cache else load_settings(**overrides)
    if config.timing == "dynamo":
        for name, value in DYNAMO_TIMING.items():
            if name == "decode_ms_per_kv_block":
                value *= settings.cache.block_size / 16
            setattr(settings.mocker, name, value)
    if config.disagg_min_prefill_tokens is not None:
        settings.disagg.min_prefill_tokens = config.disagg_min_prefill_tokens
    if config.kv_transfer_gbps is not None:
        settings.mocker.kv_transfer_gbps = config.kv_transfer_gbps
    if config.num_kv_blocks is not None:
        settings.cache.num_kv_blocks = config.num_kv_blocks
    elif settings.cache.num_kv_blocks is None:
        settings.cache.num_kv_blocks = max(1, DYNAMO_MOCKER_KV_TOKENS // settings.cache.block_size)
    return settings


class _Progress:
    """Periodic one-line reports on stderr."""

    def __init__(self, total: int, enabled: bool | None, interval: float) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total = total
        self.interval = interval
        self.sent = 0
        self.done = 0
        self.errors = 0
        self._t0 = time.perf_counter()

    def line(self) -> str:
        elapsed = time.perf_counter() - self._t0
        return (
            f"replay  {self.done}/{self.total} done  {self.sent - self.done} in flight  "
            f"{self.errors} errors  {elapsed:.1f} s"
        )

    async def run(self) -> None:
        if not self.enabled:
            return
        last = time.perf_counter()
        while True:
            # Short ticks on the loop's clock, lines by the real one: on a virtual clock
            # a loop-clock interval can pass in no real time at all.
            await asyncio.sleep(min(self.interval, 0.5))
            if time.perf_counter() - last >= self.interval:
                last = time.perf_counter()
                print(self.line(), file=sys.stderr, flush=True)


async def run_replay(config: ReplayConfig) -> ReplayResult:
    """Replay ``config.trace`` against an in-process fleet; see the module docstring."""
    from dynamo_gateway.frontend.app import build_app
    from dynamo_gateway.server import embedded

    config.validate()
    requests = load_trace(config.trace, config.limit)
    if not requests:
        raise ValueError(f"{config.trace} holds no requests")
    model = config.model or default_model_dir()
    settings = _settings(config, model, requests)
    for name in ("dynamo_gateway", "hypercorn"):
        logging.getLogger(name).setLevel(logging.WARNING)
    planner = None
    if config.planner is not None:
        planner = replay_planner_config(
            config.planner, model="replay", model_path=model, engine=config.engine
        )
    async with (
        embedded(settings, start_workers=planner is None) as gateway,
        contextlib.AsyncExitStack() as stack,
    ):
        app = build_app(gateway)
        scaled: ScaledFleet | None = None
        if planner is not None:
            scaled = await stack.enter_async_context(
                scaled_fleet(
                    gateway, planner, startup_s=config.worker_startup_s,
                    sample_interval_s=config.sample_interval_s,
                )
            )  # fmt: skip
        pool = gateway.manager.get("replay")
        synth = PromptSynthesizer(
            pool.tokenizer.vocab_size, config.trace_block_size, seed=config.seed
        )
        result = await _replay(config, app, synth, requests)
        summary = result.summary
        summary["remote_prefills"] = pool.remote_prefills
        summary["local_prefills"] = dict(pool.local_prefills)
        if scaled is not None:
            summary["planner"] = scaled.report(*result.window, time_scale=config.speedup)
            summary["worker_seconds"] = summary["planner"]["worker_seconds"]
        else:
            size = (
                config.prefill_workers + config.decode_workers
                if config.prefill_workers
                else config.workers
            )
            summary["worker_seconds"] = size * summary["duration_s"]
        targets = _targets(config, planner)
        if targets is not None:
            summary["sla"] = {
                "ttft_target_ms": targets[0],
                "itl_target_ms": targets[1],
                **sla_attainment(result.per_request, *targets),
            }
        return result


def _targets(config: ReplayConfig, planner: PlannerConfig | None) -> tuple[float, float] | None:
    ttft, itl = config.ttft_target_ms, config.itl_target_ms
    if planner is not None:
        ttft = ttft if ttft is not None else planner.models[0].ttft_ms
        itl = itl if itl is not None else planner.models[0].itl_ms
    if ttft is None or itl is None:
        return None
    return ttft, itl


def replay(config: ReplayConfig, *, uvloop: bool = True) -> ReplayResult:
    """Run :func:`run_replay` on the right event loop: a virtual-clock one when the
    config asks for it, else asyncio's (or uvloop's)."""
    if config.virtual_clock:
        from dynamo_gateway.bench import vclock

        return vclock.run(run_replay(config))
    from dynamo_gateway.bench.cli import _loop_factory

    with asyncio.Runner(loop_factory=_loop_factory(uvloop)) as runner:
        return runner.run(run_replay(config))


async def _replay(
    config: ReplayConfig, app: Any, synth: PromptSynthesizer, requests: list[TraceRequest]
) -> ReplayResult:
    loop = asyncio.get_running_loop()
    offsets = arrival_offsets(requests, config.arrival_speedup * config.speedup)
    records = [
        ReplayRecord(i, off, r.input_length, r.output_length)
        for i, (r, off) in enumerate(zip(requests, offsets, strict=True))
    ]
    progress = _Progress(len(requests), config.progress, config.progress_interval_s)
    reporter = loop.create_task(progress.run())
    encode = msgspec.json.encode

    async def one(record: ReplayRecord, body: bytes) -> None:
        record.start = now()
        try:
            async with asyncio.timeout(config.timeout_s):
                await _post_stream(app, "/v1/completions", body, record)
        except TimeoutError:
            record.error = f"timeout after {config.timeout_s}s"
        except Exception as exc:  # any failure is this request's error, not the run's
            record.error = f"{type(exc).__name__}: {exc}"
        record.end = now()
        progress.done += 1
        if record.error is not None:
            progress.errors += 1

    tasks: list[asyncio.Task[None]] = []
    lags: list[float] = []
    cpu0 = time.process_time()
    real0 = time.perf_counter()
    t0 = now() + 0.05  # a little lead so the first sends are on time
    loop_t0 = loop.time() + 0.05
    try:
        for record, req in zip(records, requests, strict=True):
            # Synthesise before waiting: the body is ready when the request is due.
            body = encode(
                {
                    "model": "replay",
                    "prompt": synth.request_prompt(req, record.index),
                    "max_tokens": req.output_length,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "ignore_eos": True,
                }
            )
            delay = t0 + record.arrival_s - now()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, now() - t0 - record.arrival_s))
            progress.sent += 1
            tasks.append(loop.create_task(one(record, body)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        reporter.cancel()
    wall = max((r.end for r in records), default=t0) - t0
    cpu = time.process_time() - cpu0
    if progress.enabled:
        print(progress.line(), file=sys.stderr, flush=True)
    result = _aggregate(config, records, wall, cpu, lags)
    result.summary["real_s"] = time.perf_counter() - real0
    result.window = (loop_t0, loop_t0 + wall)
    return result


def _aggregate(
    config: ReplayConfig,
    records: list[ReplayRecord],
    wall_s: float,
    cpu_s: float,
    lags: list[float],
) -> ReplayResult:
    s = config.speedup  # wall seconds -> trace seconds
    bench_records: list[RequestRecord] = []
    per_request: list[dict[str, Any]] = []
    for r in records:
        ttft = (r.times[0] - r.start) * s if r.ok and r.times else None
        gaps = [(b - a) * s for a, b in zip(r.times, r.times[1:], strict=False)]
        bench_records.append(
            RequestRecord(
                ok=r.ok,
                start=r.start * s,
                end=r.end * s,
                ttft=ttft,
                itl=gaps,
                output_tokens=r.output_tokens,
                events=len(r.times),
                error=r.error,
            )
        )
        e2e = (r.end - r.start) * s
        tpot = (
            (e2e - ttft) / (r.output_tokens - 1)
            if ttft is not None and r.output_tokens > 1
            else None
        )
        per_request.append(
            {
                "index": r.index,
                "arrival_ms": r.arrival_s * s * 1000.0,
                "ok": r.ok,
                "ttft_ms": None if ttft is None else ttft * 1000.0,
                "itl_ms": None if tpot is None else tpot * 1000.0,
                "e2e_ms": e2e * 1000.0 if r.ok else None,
                "input_length": r.input_length,
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "output_tokens": r.output_tokens,
                "error": r.error,
            }
        )
    bench_config = BenchConfig(
        url="asgi://in-process",
        model="replay",
        concurrency=len(records),
        requests=len(records),
        endpoint="completions",
        timeout_s=config.timeout_s,
    )
    bench = aggregate(bench_config, bench_records, wall_s * s, cpu_s).to_json_dict()
    bench.pop("config", None)
    ok = [p for p in per_request if p["ok"]]
    prompt = sum(p["prompt_tokens"] for p in ok)
    cached = sum(p["cached_tokens"] for p in ok)
    decode_ms = sum(p["e2e_ms"] - p["ttft_ms"] for p in ok if p["ttft_ms"] is not None)
    gaps_total = sum(max(p["output_tokens"] - 1, 0) for p in ok if p["ttft_ms"] is not None)
    errors = Counter(p["error"] for p in per_request if p["error"])
    summary: dict[str, Any] = {
        "kind": "replay",
        "trace": config.trace.name,
        "router": config.router,
        "workers": config.workers,
        **bench,
        "error_samples": dict(errors.most_common(_MAX_ERROR_KINDS)),
        # Per request: (e2e - ttft) / (tokens - 1); the mean is per request.
        "tpot_ms": summarize(p["itl_ms"] for p in ok if p["itl_ms"] is not None),
        # Mean gap between consecutive tokens over every token of every request.
        "itl_token_mean_ms": decode_ms / gaps_total if gaps_total else None,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cache_hit_rate": cached / prompt if prompt else None,
        "wall_s": wall_s,
        "process_cpu_s": cpu_s,
        # How late requests left their scheduled time, in trace time: a large lag means
        # the process could not keep up at this speedup and the results are not faithful.
        "dispatch_lag_ms": summarize(lags, 1000.0 * s),
    }
    return ReplayResult(config, summary, per_request)


# -- reporting -----------------------------------------------------------------------


def _fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _fleet(c: ReplayConfig) -> str:
    if c.planner is not None:
        return f"scaled by the planner ({c.planner.name}) x {c.engine}"
    if c.prefill_workers:
        return f"{c.prefill_workers} prefill + {c.decode_workers} decode x {c.engine}"
    return f"{c.workers} x {c.engine}"


def format_replay_summary(result: ReplayResult) -> str:
    """A human-readable multi-line summary."""
    c = result.config
    s = result.summary
    clock = "virtual clock" if c.virtual_clock else f"speedup={c.speedup:g}"
    lines = [
        f"trace       {c.trace}  requests={s['requests'] + s['errors']}  "
        f"arrival-speedup={c.arrival_speedup:g}  {clock}",
        f"fleet       {_fleet(c)}  router={c.router}",
        f"completed   {s['requests']} ok, {s['errors']} errors in {s['duration_s']:.1f} s "
        f"trace time ({s.get('real_s', s['wall_s']):.1f} s real, {s['process_cpu_s']:.1f} s CPU)",
        f"workers     {s['worker_seconds']:,.0f} worker-seconds"
        + (f", at most {s['planner']['max_workers']} at once" if "planner" in s else ""),
        f"throughput  {s['req_per_s']:.2f} req/s  {s['output_tok_per_s']:,.0f} output tok/s",
        f"cache       hit rate {_fmt(s['cache_hit_rate'], 3)}  "
        f"({s['cached_tokens']:,} of {s['prompt_tokens']:,} prompt tokens)",
        f"dispatch    lag p99 {_fmt(s['dispatch_lag_ms']['p99'])} ms (trace time)",
        "",
        f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, summ in (
        ("TTFT", s["ttft_ms"]),
        ("ITL (events)", s["itl_ms"]),
        ("TPOT", s["tpot_ms"]),
        ("E2E", s["e2e_ms"]),
    ):
        lines.append(
            f"{name:<14}"
            + "".join(f"{_fmt(summ.get(k)):>10}" for k in ("mean", "p50", "p90", "p99"))
        )
    lines.append(f"ITL mean over all tokens: {_fmt(s['itl_token_mean_ms'], 2)} ms")
    if "sla" in s:
        sla = s["sla"]
        lines.append(
            f"SLA         TTFT <= {sla['ttft_target_ms']:g} ms: {sla['ttft']:.1%}  "
            f"ITL <= {sla['itl_target_ms']:g} ms: {sla['itl']:.1%}  both: {sla['both']:.1%}"
        )
    if c.prefill_workers:
        lines.append(
            f"prefill     {s.get('remote_prefills', 0)} remote, "
            f"local: {s.get('local_prefills', {})}"
        )
    if s["error_samples"]:
        lines.append("errors (most common):")
        for msg, count in s["error_samples"].items():
            lines.append(f"  {count:>6} x {msg}")
    return "\n".join(lines)


def plot_ttft_cdfs(
    runs: Sequence[tuple[str, Sequence[float]]], path: str | Path, title: str = ""
) -> None:
    """Draw the TTFT CDF (ms, log x axis) of each ``(label, ttfts_ms)`` run into ``path``.

    Raises :class:`RuntimeError` when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(
            "plotting needs matplotlib, which is not installed: pip install matplotlib"
        ) from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in runs:
        data = sorted(v for v in values if v is not None and v > 0)
        if not data:
            continue
        ys = [(i + 1) / len(data) for i in range(len(data))]
        ax.step(data, ys, where="post", label=f"{label} (n={len(data)})")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, trace time)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def ttfts_from_json(data: dict[str, Any]) -> list[float]:
    """The per-request TTFTs (ms) of a replay JSON result."""
    return [p["ttft_ms"] for p in data.get("per_request", []) if p.get("ttft_ms") is not None]
