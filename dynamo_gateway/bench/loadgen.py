"""Closed-loop load generator for OpenAI-compatible servers.

``concurrency`` worker coroutines pull request indices from a shared counter until exactly
``requests`` requests have been sent, each worker owning one keep-alive connection (see
:mod:`dynamo_gateway.bench.httpclient`). Per request it records:

* TTFT - send time to the first SSE event with non-empty ``content`` / ``text``
  (non-streaming: to the complete response, which is when the first token is visible);
* ITL - gaps between successive content-bearing events (one gap per event, even when an
  event carries several tokens; events that arrive in the same socket read get a gap of 0,
  which is what a real client experiences);
* end-to-end latency, output tokens (``usage.completion_tokens`` when the server reports
  it, else the number of content events) and errors.

Prompts are ``input_tokens`` words drawn from a list of common English words; with
byte-level BPE tokenizers such a word is usually one token, so ``input_tokens`` is an
approximation (a chat template adds a few more). Every prompt starts with the request's
index so that prefix caching cannot hide the prefill of later requests.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import msgspec

from dynamo_gateway.bench.httpclient import HTTPClient, SSEDecoder, Target, parse_target
from dynamo_gateway.bench.stats import summarize

__all__ = ["BenchConfig", "BenchResult", "RequestRecord", "format_summary", "run_bench"]

Endpoint = Literal["chat", "completions"]

#: Common English words that byte-level BPE vocabularies encode as one token each
#: (with their leading space).
_WORD_TEXT = """
    the of and to in is you that it he was for on are as with his they at be this have
    from or one had by word but not what all were we when your can said there use an each
    which she do how their if will up other about out many then them these so some her would
    make like him into time has look two more write go see number no way could people my than
    first water been call who its now find long down day did get come made may part over new
    sound take only little work know place year live me back give most very after thing our
    just name good sentence man think say great where help through much before line right too
    mean old any same tell boy follow came want show also around form three small set put end
    does another well large must big even such because turn here why ask went men read need
    land different home us move try kind hand picture again change off play spell air away
    animal house point page letter mother answer found study still learn should world high
"""
_WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())

#: How many problems are kept verbatim in ``BenchResult.error_samples``.
_MAX_ERROR_KINDS = 5
#: Longest error body excerpt kept per failed request.
_ERROR_BODY_LIMIT = 300


@dataclass(slots=True)
class BenchConfig:
    """Parameters of one load-generator run."""

    url: str = "http://127.0.0.1:8000"
    model: str = "bench"
    concurrency: int = 64
    requests: int = 1000
    input_tokens: int = 128
    output_tokens: int = 100
    stream: bool = True
    endpoint: Endpoint = "chat"
    api_key: str | None = None
    warmup: int = 0
    seed: int = 0
    #: Per-request limit (seconds); a request that exceeds it counts as an error.
    timeout_s: float = 600.0
    #: Progress bar on stderr: ``True`` / ``False``, or ``None`` for "only on a TTY".
    progress: bool | None = False
    ignore_eos: bool = True

    def validate(self) -> None:
        """Raise :class:`ValueError` for impossible settings."""
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.requests < 1:
            raise ValueError("requests must be >= 1")
        if self.input_tokens < 1:
            raise ValueError("input_tokens must be >= 1")
        if self.output_tokens < 1:
            raise ValueError("output_tokens must be >= 1")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', not {self.endpoint!r}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        parse_target(self.url)


@dataclass(slots=True)
class RequestRecord:
    """What one request measured (times are ``perf_counter`` seconds)."""

    ok: bool
    start: float
    end: float
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    events: int = 0
    error: str | None = None

    @property
    def e2e(self) -> float:
        """End-to-end latency in seconds."""
        return self.end - self.start


@dataclass(slots=True)
class BenchResult:
    """Aggregated figures of a run (latencies in milliseconds)."""

    config: BenchConfig
    requests: int
    errors: int
    duration_s: float
    output_tokens: int
    events: int
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    #: CPU time the client process used during the measured phase.
    client_cpu_s: float
    error_samples: dict[str, int] = field(default_factory=dict)
    records: list[RequestRecord] = field(default_factory=list, repr=False)

    @property
    def req_per_s(self) -> float:
        """Completed (successful) requests per second."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def output_tok_per_s(self) -> float:
        """Output tokens of successful requests per second."""
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def events_per_s(self) -> float:
        """Content-bearing SSE events per second."""
        return self.events / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def client_cpu_pct(self) -> float:
        """Client CPU use during the run, in percent of one core."""
        return 100.0 * self.client_cpu_s / self.duration_s if self.duration_s > 0 else 0.0

    def to_json_dict(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict (per-request records are left out)."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "duration_s": self.duration_s,
            "req_per_s": self.req_per_s,
            "output_tok_per_s": self.output_tok_per_s,
            "events_per_s": self.events_per_s,
            "output_tokens": self.output_tokens,
            "events": self.events,
            "ttft_ms": dict(self.ttft_ms),
            "itl_ms": dict(self.itl_ms),
            "e2e_ms": dict(self.e2e_ms),
            "client_cpu_s": self.client_cpu_s,
            "client_cpu_pct": self.client_cpu_pct,
            "error_samples": dict(self.error_samples),
            "config": _config_json(self.config),
        }


def _config_json(config: BenchConfig) -> dict[str, Any]:
    out = asdict(config)
    if out.get("api_key"):
        out["api_key"] = "***"  # never echo secrets into result files
    return out


# -- response decoding ------------------------------------------------------------------
# Only the fields the measurements need are declared; msgspec skips everything else fast.


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    message: _Delta | None = None
    text: str | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


class _StreamRecorder:
    """Consumes an SSE response, timestamping content-bearing events."""

    __slots__ = ("_err_body", "_sse", "done", "error", "status", "times", "usage_tokens")

    def __init__(self) -> None:
        self._sse = SSEDecoder()
        self._err_body = b""
        self.status = 0
        self.times: list[float] = []
        self.usage_tokens: int | None = None
        self.done = False
        self.error: str | None = None

    def on_head(self, status: int, headers: Mapping[str, str]) -> None:
        self.status = status
        if not 200 <= status < 300:
            self.error = f"HTTP {status}"

    def on_body(self, data: bytes, t: float) -> None:
        if self.error is not None:
            if self.status >= 300 and len(self._err_body) < _ERROR_BODY_LIMIT:
                self._err_body += data[:_ERROR_BODY_LIMIT]
            return
        times = self.times
        for payload in self._sse.feed(data):
            if payload == b"[DONE]":
                self.done = True
                continue
            try:
                chunk = _decode_chunk(payload)
            except msgspec.DecodeError as exc:
                self.error = f"malformed SSE event ({exc}): {payload[:80]!r}"
                return
            if chunk.error is not None:
                self.error = f"error event: {payload[:200].decode('utf-8', 'replace')}"
                return
            choices = chunk.choices
            if choices:
                c = choices[0]
                d = c.delta
                if c.text or (d is not None and (d.content or d.reasoning_content)):
                    times.append(t)
            usage = chunk.usage
            if usage is not None and usage.completion_tokens is not None:
                self.usage_tokens = usage.completion_tokens

    def finish(self, start: float, end: float) -> RequestRecord:
        if self.error is None and not self.done:
            self.error = "stream ended without data: [DONE]"
        if self.error is not None:
            return RequestRecord(False, start, end, error=self._describe_error())
        times = self.times
        itl = [b - a for a, b in itertools.pairwise(times)]
        tokens = self.usage_tokens if self.usage_tokens is not None else len(times)
        ttft = times[0] - start if times else None
        return RequestRecord(True, start, end, ttft, itl, tokens, len(times))

    def _describe_error(self) -> str:
        assert self.error is not None
        if self._err_body:
            body = self._err_body[:_ERROR_BODY_LIMIT].decode("utf-8", "replace").strip()
            return f"{self.error}: {body}"
        return self.error


class _JSONRecorder:
    """Consumes a non-streaming JSON response."""

    __slots__ = ("_parts", "status")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.status = 0

    def on_head(self, status: int, headers: Mapping[str, str]) -> None:
        self.status = status

    def on_body(self, data: bytes, t: float) -> None:
        self._parts.append(data)

    def finish(self, start: float, end: float) -> RequestRecord:
        body = b"".join(self._parts)
        if not 200 <= self.status < 300:
            text = body[:_ERROR_BODY_LIMIT].decode("utf-8", "replace").strip()
            return RequestRecord(False, start, end, error=f"HTTP {self.status}: {text}")
        try:
            resp = _decode_chunk(body)
        except msgspec.DecodeError as exc:
            return RequestRecord(False, start, end, error=f"malformed JSON body ({exc})")
        if resp.error is not None or not resp.choices:
            text = body[:200].decode("utf-8", "replace")
            return RequestRecord(False, start, end, error=f"no choices in response: {text}")
        c = resp.choices[0]
        content = c.text if c.text is not None else (c.message.content if c.message else None)
        if resp.usage is not None and resp.usage.completion_tokens is not None:
            tokens = resp.usage.completion_tokens
        else:
            tokens = len(content.split()) if content else 0  # rough: whitespace words
        # No SSE events without streaming: events_per_s stays an SSE-only figure.
        return RequestRecord(True, start, end, end - start, [], tokens, 0)


# -- request construction ----------------------------------------------------------------

_MARKER = "@@REQ@@"


class _RequestFactory:
    """Serializes requests cheaply: the JSON body is encoded once with a marker where the
    per-request index goes, so building a request is two byte concatenations."""

    def __init__(self, config: BenchConfig, target: Target) -> None:
        rng = random.Random(config.seed)
        words = rng.choices(_WORDS, k=max(config.input_tokens - 1, 0))
        prompt = " ".join([_MARKER, *words])
        body: dict[str, Any] = {"model": config.model}
        if config.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = prompt
            path = "/v1/completions"
        body["max_tokens"] = config.output_tokens
        body["stream"] = config.stream
        if config.stream:
            body["stream_options"] = {"include_usage": True}
        if config.ignore_eos:
            body["ignore_eos"] = True
        encoded = msgspec.json.encode(body)
        self._pre, self._post = encoded.split(_MARKER.encode(), 1)
        base = target.base_path
        if base.endswith("/v1"):  # accept base URLs given the OpenAI-SDK way (".../v1")
            base = base[:-3]
        self.path = base + path
        head = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {target.host_header}",
            "Content-Type: application/json",
            "Accept: text/event-stream" if config.stream else "Accept: application/json",
        ]
        if config.api_key:
            head.append(f"Authorization: Bearer {config.api_key}")
        head.append("Content-Length: ")
        self._head = "\r\n".join(head).encode("latin-1")

    def build(self, tag: str) -> bytes:
        body = self._pre + tag.encode() + self._post
        return b"".join((self._head, str(len(body)).encode(), b"\r\n\r\n", body))


# -- the run -----------------------------------------------------------------------------


class _Progress:
    """Thin wrapper so the hot path does not care whether tqdm is on."""

    def __init__(self, total: int, enabled: bool | None, desc: str) -> None:
        self._bar: Any = None
        if enabled is False:
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            disable=None if enabled is None else not enabled,
            file=sys.stderr,
            unit="req",
            desc=desc,
            mininterval=0.5,
            dynamic_ncols=True,
        )

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def _one_request(
    client: HTTPClient, factory: _RequestFactory, tag: str, stream: bool, timeout: float
) -> RequestRecord:
    data = factory.build(tag)
    recorder: _StreamRecorder | _JSONRecorder = _StreamRecorder() if stream else _JSONRecorder()
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            end = await client.request(data, recorder)
    except TimeoutError:
        return RequestRecord(False, start, time.perf_counter(), error=f"timeout after {timeout}s")
    except Exception as exc:  # connection refused/reset, protocol errors: all count as errors
        msg = str(exc) or type(exc).__name__
        return RequestRecord(
            False, start, time.perf_counter(), error=f"{type(exc).__name__}: {msg}"
        )
    return recorder.finish(start, end)


async def _run_phase(
    clients: list[HTTPClient],
    factory: _RequestFactory,
    config: BenchConfig,
    total: int,
    tag_prefix: str,
    progress: _Progress | None,
) -> list[RequestRecord]:
    """Send exactly ``total`` requests with at most ``len(clients)`` in flight."""
    records: list[RequestRecord | None] = [None] * total
    next_index = 0

    async def worker(client: HTTPClient) -> None:
        nonlocal next_index
        while next_index < total:
            i = next_index
            next_index += 1
            records[i] = await _one_request(
                client, factory, f"{tag_prefix}{i}", config.stream, config.timeout_s
            )
            if progress is not None:
                progress.update()

    await asyncio.gather(*(worker(c) for c in clients[: min(len(clients), total)]))
    return [r for r in records if r is not None]


async def run_bench(config: BenchConfig) -> BenchResult:
    """Run the benchmark described by ``config`` and return its aggregated result."""
    config.validate()
    target = parse_target(config.url)
    factory = _RequestFactory(config, target)
    clients = [HTTPClient(target) for _ in range(config.concurrency)]
    try:
        # Open every slot's connection up front so no measured request pays for a TCP
        # handshake; failures are ignored here and surface as per-request errors.
        await asyncio.gather(*(c.connect() for c in clients), return_exceptions=True)
        if config.warmup:
            await _run_phase(clients, factory, config, config.warmup, "w", None)
        progress = _Progress(config.requests, config.progress, "bench")
        try:
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            records = await _run_phase(clients, factory, config, config.requests, "", progress)
            t1 = time.perf_counter()
            cpu1 = time.process_time()
        finally:
            progress.close()
    finally:
        for c in clients:
            c.close()
        # Let the transports' close callbacks run before a caller tears down the loop.
        await asyncio.sleep(0)
    return aggregate(config, records, t1 - t0, cpu1 - cpu0)


def aggregate(
    config: BenchConfig, records: list[RequestRecord], duration_s: float, client_cpu_s: float
) -> BenchResult:
    """Reduce per-request records to a :class:`BenchResult`."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error or "unknown error" for r in records if not r.ok)
    itl: list[float] = []
    for r in ok:
        itl.extend(r.itl)
    return BenchResult(
        config=config,
        requests=len(ok),
        errors=len(records) - len(ok),
        duration_s=duration_s,
        output_tokens=sum(r.output_tokens for r in ok),
        events=sum(r.events for r in ok),
        ttft_ms=summarize((r.ttft for r in ok if r.ttft is not None), 1000.0),
        itl_ms=summarize(itl, 1000.0),
        e2e_ms=summarize((r.e2e for r in ok), 1000.0),
        client_cpu_s=client_cpu_s,
        error_samples=dict(errors.most_common(_MAX_ERROR_KINDS)),
        records=records,
    )


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def format_summary(result: BenchResult) -> str:
    """A human-readable multi-line summary of ``result``."""
    c = result.config
    lines = [
        f"target      {c.url}  model={c.model}  endpoint={c.endpoint}  stream={c.stream}",
        f"load        concurrency={c.concurrency}  requests={c.requests}  "
        f"input~{c.input_tokens} tok  output={c.output_tokens} tok  warmup={c.warmup}",
        f"completed   {result.requests} ok, {result.errors} errors in {result.duration_s:.2f} s",
        f"throughput  {result.req_per_s:,.1f} req/s  {result.output_tok_per_s:,.0f} output tok/s"
        f"  {result.events_per_s:,.0f} SSE events/s",
        f"client cpu  {result.client_cpu_s:.2f} s ({result.client_cpu_pct:.0f}% of one core)",
        "",
        f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, summary in (
        ("TTFT", result.ttft_ms),
        ("ITL", result.itl_ms),
        ("E2E", result.e2e_ms),
    ):
        digits = 3 if name == "ITL" else 2
        lines.append(
            f"{name:<14}"
            + "".join(f"{_fmt(summary.get(k), digits):>10}" for k in ("mean", "p50", "p90", "p99"))
        )
    if result.error_samples:
        lines.append("")
        lines.append("errors (most common):")
        for msg, count in result.error_samples.items():
            lines.append(f"  {count:>6} x {msg}")
    return "\n".join(lines)
