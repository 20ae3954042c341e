"""Overload rounds: many concurrent streaming clients of three kinds, and what each got.

Used by ``benchmarks/overload_memory.py`` and the overload e2e test. A round opens
one raw asyncio connection per client (no connection pool: every client is its
own socket, as thousands of independent users are) and sends one streaming chat
request. Clients come in three kinds:

* normal: reads the stream to ``[DONE]``;
* slow: sleeps after every read, so the server's writes back up;
* vanish: closes the socket after a few events, without reading the rest.

Each client ends in one `Outcome`; `tally` sorts them into served, shed (429/503
*with* a Retry-After header and an OpenAI-shaped error body) and failed (anything
else, with the reason). `worker_gauges` reads the workers' per-worker gauges from
``/metrics``, to check that nothing stays in flight after the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import re
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

from dynamo_gateway.bench.httpclient import (
    HTTPParseError,
    ResponseParser,
    SSEDecoder,
    build_request,
    parse_target,
)

__all__ = [
    "ClientKind",
    "Gate",
    "Mix",
    "Outcome",
    "RoundResult",
    "Tally",
    "classify",
    "probe",
    "run_round",
    "stream_once",
    "tally",
    "worker_gauges",
]

SHED_STATUSES = (429, 503)


class ClientKind(enum.Enum):
    NORMAL = "normal"
    SLOW = "slow"  # sleeps `Mix.slow_sleep_s` after every read
    VANISH = "vanish"  # closes the socket after `Mix.vanish_after` events


@dataclass(frozen=True)
class Mix:
    """How a round's clients split into kinds, and what each kind does."""

    slow: float = 0.2  # fraction of slow readers
    vanish: float = 0.2  # fraction of clients that vanish mid-stream
    slow_sleep_s: float = 0.05
    vanish_after: int = 3  # events read before vanishing
    max_tokens: int = 20
    model: str = "demo"

    def kind(self, i: int, n: int) -> ClientKind:
        """The kind of client `i` of `n`, spread evenly (not random: rounds repeat)."""
        x = (i * 0.618033988749895) % 1.0  # golden-ratio sequence: kinds interleave
        if x < self.vanish:
            return ClientKind.VANISH
        if x < self.vanish + self.slow:
            return ClientKind.SLOW
        return ClientKind.NORMAL


@dataclass
class Outcome:
    """What one client got."""

    kind: ClientKind
    status: int = 0  # 0: no response head
    retry_after: str | None = None
    error_type: str | None = None  # ``error.type`` of a JSON error body
    events: int = 0  # SSE data events read (``[DONE]`` included)
    done: bool = False  # ``[DONE]`` was read
    failure: str | None = None  # why the client did not finish as its kind should
    latency_s: float = 0.0  # request sent until the client stopped


@dataclass
class Tally:
    """Outcomes sorted into served / shed / failed, with the reasons for failures."""

    served: int = 0
    shed: int = 0
    failed: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "served": self.served,
            "shed": self.shed,
            "failed": self.failed,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "failures": dict(self.failures.most_common(10)),
        }


@dataclass
class RoundResult:
    clients: int
    wall_s: float
    outcomes: list[Outcome]
    probes: list[Outcome]

    @property
    def tally(self) -> Tally:
        return tally(self.outcomes)


def classify(o: Outcome) -> str:
    """``served``, ``shed``, or a failure reason."""
    if o.failure is not None:
        return o.failure
    if o.status == 200:
        if o.kind is ClientKind.VANISH or o.done:
            return "served"
        return "stream ended without [DONE]"
    if o.status in SHED_STATUSES:
        if o.retry_after is None or not o.retry_after.isdigit():
            return f"{o.status} without a Retry-After"
        if o.error_type is None:
            return f"{o.status} without an OpenAI error body"
        return "shed"
    return f"HTTP {o.status}"


def tally(outcomes: list[Outcome]) -> Tally:
    t = Tally()
    for o in outcomes:
        t.by_status[o.status] += 1
        verdict = classify(o)
        if verdict == "served":
            t.served += 1
        elif verdict == "shed":
            t.shed += 1
        else:
            t.failed += 1
            t.failures[verdict] += 1
    return t


def _chat_body(mix: Mix, i: int) -> bytes:
    return json.dumps(
        {
            "model": mix.model,
            "messages": [{"role": "user", "content": f"client {i} says hello, keep talking"}],
            "max_tokens": mix.max_tokens,
            "stream": True,
        }
    ).encode()


class Gate:
    """Holds `n` connected clients until the last one has connected (or failed to),
    so that the requests arrive as one burst instead of at the pace of connect()."""

    def __init__(self, n: int) -> None:
        self._left = n
        self._open = asyncio.Event()

    def leave(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self._open.set()

    async def arrive(self) -> None:
        self.leave()
        await self._open.wait()

    async def opened(self) -> None:
        await self._open.wait()


async def stream_once(
    url: str, kind: ClientKind, body: bytes, mix: Mix, timeout: float, gate: Gate | None = None
) -> Outcome:
    """One client: connect, (wait at `gate`,) send one streaming chat request, read as
    `kind` does. Never raises for network or protocol trouble: the outcome says."""
    out = Outcome(kind)
    start = time.perf_counter()
    try:
        await asyncio.wait_for(_stream(url, out, body, mix, gate), timeout)
    except TimeoutError:
        out.failure = "timeout"
    except (OSError, HTTPParseError) as exc:
        out.failure = f"{type(exc).__name__}"
    out.latency_s = time.perf_counter() - start
    return out


async def _stream(url: str, out: Outcome, body: bytes, mix: Mix, gate: Gate | None) -> None:
    target = parse_target(url)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    request = build_request("POST", "/v1/chat/completions", target, headers, body)
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port)
    except BaseException:  # refused, or timed out while connecting: don't hold the others
        if gate is not None:
            gate.leave()
        raise
    try:
        if gate is not None:
            await gate.arrive()
        writer.write(request)
        parser, sse = ResponseParser(), SSEDecoder()
        raw = b""
        while not parser.complete:
            data = await reader.read(65536)
            if not data:
                if out.status == 200 and not out.done:
                    out.failure = "connection closed mid-stream"
                elif out.status == 0:
                    out.failure = "connection closed before a response"
                return
            chunk = parser.feed(data)
            if parser.head_complete and out.status == 0:
                out.status = parser.status
                out.retry_after = parser.headers.get("retry-after")
            if out.status != 200:
                raw += chunk
                continue
            for payload in sse.feed(chunk):
                out.events += 1
                out.done = out.done or payload == b"[DONE]"
            if out.kind is ClientKind.VANISH and out.events >= mix.vanish_after:
                writer.transport.abort()  # gone without a word, mid-stream
                return
            if out.kind is ClientKind.SLOW:
                await asyncio.sleep(mix.slow_sleep_s)
        if out.status != 200:
            out.error_type = _error_type(raw)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _error_type(raw: bytes) -> str | None:
    """``error.type`` of an OpenAI-shaped error body with a message, else None."""
    try:
        err = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return None
    kind = err.get("type")
    return kind if isinstance(kind, str) else None


async def probe(url: str, mix: Mix, timeout: float = 60.0) -> Outcome:
    """One normal streaming request, timed (the "does anyone else stall" probe)."""
    return await stream_once(url, ClientKind.NORMAL, _chat_body(mix, -1), mix, timeout)


async def run_round(
    url: str,
    clients: int,
    mix: Mix,
    *,
    timeout: float = 120.0,
    probe_every_s: float = 0.25,
) -> RoundResult:
    """`clients` concurrent streams of `mix`'s kinds, their requests sent together
    once all are connected, with a probe request every `probe_every_s` meanwhile."""
    start = time.perf_counter()
    gate = Gate(clients)
    tasks = [
        asyncio.create_task(
            stream_once(url, mix.kind(i, clients), _chat_body(mix, i), mix, timeout, gate)
        )
        for i in range(clients)
    ]
    probes: list[asyncio.Task[Outcome]] = []

    async def probing() -> None:
        # From the burst on, each probe on its own: one that stalls does not delay the next.
        await gate.opened()
        while True:
            probes.append(asyncio.create_task(probe(url, mix, timeout)))
            await asyncio.sleep(probe_every_s)

    prober = asyncio.create_task(probing())
    try:
        outcomes = await asyncio.gather(*tasks)
    finally:
        prober.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prober
    wall_s = time.perf_counter() - start
    return RoundResult(clients, wall_s, list(outcomes), list(await asyncio.gather(*probes)))


def worker_gauges(url: str, name: str) -> list[float]:
    """Every worker's value of the gauge ``dynamo_gateway_<name>`` on ``url``/metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return [float(v) for v in re.findall(rf"^dynamo_gateway_{name}{{[^}}]*}} (\S+)$", text, re.M)]
