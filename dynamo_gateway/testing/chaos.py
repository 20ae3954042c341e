"""Chaos runs: steady streaming load, checked token for token, while faults hit a cluster.

A `ChaosRun` drives a `Cluster` of mocker workers (aggregated, or prefill and decode
with a KV transport, with or without a shared Redis tier) and one frontend over real
etcd and NATS. `SteadyLoad` keeps `concurrency` greedy streaming chats in flight; each answer is
compared with the answer the same request got before any fault (the mocker's greedy
output is a function of the whole token context, so a migrated stream must continue
exactly as an uninterrupted one). Meanwhile `ChaosRun.inject` applies faults in turn:

- ``kill_worker``: SIGKILL a worker (no drain, no deregistration) and start another;
- ``pause_worker``: SIGSTOP a worker until its lease has run out, then SIGCONT;
- ``restart_etcd`` / ``restart_nats``: stop the server and start it on the same port;
- ``restart_redis``: restart the workers' shared KV store (empty: nothing persists);
- ``restart_frontend``: SIGTERM the frontend (it drains) and start one on the same port.

Counted from the client side (`Outcome`): completed, failed (with the reason) and
corrupted (text or token count not the fault-free answer). A request the gateway never
accepted (connection refused while the frontend restarts, or a 429/503 before any
byte of the stream, or a kept-alive connection closed by a draining frontend before
any answer) is sent again after a pause, as the openai SDK does, and counted as a
retry, not a failure; one still not accepted after `LoadConfig.retry_for_s`
fails. `report()` adds TTFT during and outside faults, the KV hit rate's dip after each
fault and the time until it is back within 90% of its level before the faults
(3-second windows of completed requests), and the processes' RSS over time
(`RssSampler`).

Used by ``tests/chaos`` (the CI-sized run) and ``benchmarks/chaos_soak.py`` (the soak).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from dynamo_gateway.servers.etcd import EtcdServer
from dynamo_gateway.servers.nats import NatsServer
from dynamo_gateway.servers.redis import RedisServer
from dynamo_gateway.testing.cluster import Cluster, ClusterProcess

__all__ = [
    "FAULT_KINDS",
    "ChaosRun",
    "FaultRecord",
    "LoadConfig",
    "Outcome",
    "RssSampler",
    "Schedule",
    "SteadyLoad",
    "chaos_prompts",
    "report",
    "run_chaos",
]

FAULT_KINDS = (
    "kill_worker",
    "restart_etcd",
    "pause_worker",
    "restart_nats",
    "restart_frontend",
)

# Made-up words: 36 of them, each likely a token or two of any BPE vocabulary.
_WORDS = [
    a + b
    for a in ("ka", "lo", "mi", "ra", "su", "te")
    for b in ("ban", "dor", "fel", "gin", "mar", "sol")
]


def chaos_prompts(documents: int, questions: int, words: int = 160) -> list[list[dict[str, str]]]:
    """Chats that share long prefixes: `documents` texts, `questions` about each, so
    that routing to the worker holding a document's KV blocks pays off."""
    rng = random.Random(17)
    chats = []
    for d in range(documents):
        text = " ".join(rng.choice(_WORDS) for _ in range(words))
        for q in range(questions):
            chats.append(
                [
                    {"role": "system", "content": f"You answer questions about document {d}."},
                    {"role": "user", "content": f"{text}\n\nQuestion {q}: what comes next?"},
                ]
            )
    return chats


@dataclass
class LoadConfig:
    url: str
    model: str = "demo"
    concurrency: int = 12
    max_tokens: int = 32
    retry_for_s: float = 30.0  # how long a request the gateway never accepted is retried
    timeout_s: float = 60.0  # one request, end to end


@dataclass
class Outcome:
    """One request as the client saw it (times: `time.monotonic()`)."""

    prompt: int
    start: float
    end: float
    status: str  # "ok", "failed" or "corrupted"
    reason: str = ""
    ttft: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    retries: int = 0


class _NotAccepted(Exception):
    """The gateway refused the request before it started (retried)."""


class _Failed(Exception):
    """The request failed after it was accepted, or could not be sent at all."""


@dataclass
class _Answer:
    text: str
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int
    ttft: float | None


async def _stream_chat(
    client: httpx.AsyncClient, cfg: LoadConfig, messages: list[dict[str, str]]
) -> _Answer:
    body = {
        "model": cfg.model,
        "messages": messages,
        "max_tokens": cfg.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.monotonic()
    answered = False
    try:
        async with client.stream("POST", f"{cfg.url}/v1/chat/completions", json=body) as resp:
            answered = True
            if resp.status_code in (429, 503):
                await resp.aread()
                raise _NotAccepted(f"{resp.status_code} {resp.text[:200]}")
            if resp.status_code != 200:
                await resp.aread()
                raise _Failed(f"HTTP {resp.status_code}: {resp.text[:300]}")
            return await _read_events(resp, start)
    except httpx.ConnectError as exc:  # nothing was sent: the frontend is restarting
        raise _NotAccepted(f"connect: {exc}") from exc
    except httpx.RemoteProtocolError as exc:
        if answered:
            raise _Failed(f"{type(exc).__name__}: {exc}") from exc
        # A pooled keep-alive connection that a draining frontend closed as the
        # request went out on it: the request was never answered, hence never run.
        raise _NotAccepted(f"closed before answering: {exc}") from exc
    except httpx.HTTPError as exc:
        raise _Failed(f"{type(exc).__name__}: {exc}") from exc


async def _read_events(resp: httpx.Response, start: float) -> _Answer:
    pieces: list[str] = []
    ttft: float | None = None
    usage: dict[str, Any] | None = None
    finish: str | None = None
    done = False
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            raise _Failed(f"stream error: {event['error'].get('message', event['error'])}")
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices", ()):
            content = choice.get("delta", {}).get("content")
            if content:
                if ttft is None:
                    ttft = time.monotonic() - start
                pieces.append(content)
            finish = choice.get("finish_reason") or finish
    if not done or finish is None or usage is None:
        raise _Failed(f"stream cut short (done={done}, finish={finish}, usage={usage is not None})")
    details = usage.get("prompt_tokens_details") or {}
    return _Answer(
        "".join(pieces),
        int(usage["completion_tokens"]),
        int(usage["prompt_tokens"]),
        int(details.get("cached_tokens") or 0),
        ttft,
    )


class SteadyLoad:
    """`concurrency` clients, each sending the prompts round-robin from its own offset,
    until `stop` is set; every answer is checked against `expected`."""

    def __init__(
        self,
        cfg: LoadConfig,
        prompts: list[list[dict[str, str]]],
        expected: list[str],
        *,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.prompts = prompts
        self.expected = expected
        self.outcomes: list[Outcome] = []
        self._progress = progress

    @staticmethod
    async def answers(cfg: LoadConfig, prompts: list[list[dict[str, str]]]) -> list[str]:
        """Fault-free answers to `prompts` (the reference each chaos answer must equal)."""
        limits = httpx.Limits(max_connections=cfg.concurrency)
        async with httpx.AsyncClient(timeout=cfg.timeout_s, limits=limits) as client:
            gate = asyncio.Semaphore(cfg.concurrency)

            async def one(messages: list[dict[str, str]]) -> str:
                async with gate:
                    answer = await _stream_chat(client, cfg, messages)
                if answer.completion_tokens != cfg.max_tokens:
                    raise AssertionError(f"reference answer of {answer.completion_tokens} tokens")
                return answer.text

            return list(await asyncio.gather(*(one(m) for m in prompts)))

    async def run(self, stop: asyncio.Event) -> list[Outcome]:
        limits = httpx.Limits(max_connections=self.cfg.concurrency * 2)
        async with httpx.AsyncClient(timeout=self.cfg.timeout_s, limits=limits) as client:
            clients = [self._client(client, i, stop) for i in range(self.cfg.concurrency)]
            await asyncio.gather(*clients)
        return self.outcomes

    async def _client(self, client: httpx.AsyncClient, index: int, stop: asyncio.Event) -> None:
        n = len(self.prompts)
        turn = index * max(1, n // self.cfg.concurrency)
        while not stop.is_set():
            p = turn % n
            turn += 1
            self.outcomes.append(await self._request(client, p))
            if self._progress is not None and len(self.outcomes) % 500 == 0:
                self._progress(f"{len(self.outcomes)} requests, {self.failures()} failed")

    async def _request(self, client: httpx.AsyncClient, p: int) -> Outcome:
        start = time.monotonic()
        retries = 0
        while True:
            try:
                answer = await _stream_chat(client, self.cfg, self.prompts[p])
                break
            except _NotAccepted as exc:
                if time.monotonic() - start > self.cfg.retry_for_s:
                    return Outcome(p, start, time.monotonic(), "failed", f"not accepted: {exc}")
                retries += 1
                await asyncio.sleep(0.25)
            except _Failed as exc:
                return Outcome(p, start, time.monotonic(), "failed", str(exc), retries=retries)
        end = time.monotonic()
        status, reason = "ok", ""
        if answer.completion_tokens != self.cfg.max_tokens:
            status, reason = "corrupted", f"{answer.completion_tokens} tokens"
        elif answer.text != self.expected[p]:
            status, reason = "corrupted", f"text {answer.text[:80]!r}"
        return Outcome(
            p, start, end, status, reason, answer.ttft,
            answer.prompt_tokens, answer.cached_tokens, retries,
        )  # fmt: skip

    def failures(self) -> int:
        return sum(o.status != "ok" for o in self.outcomes)


@dataclass
class FaultRecord:
    kind: str
    start: float
    end: float  # when the fault was over (the process back, the server up)
    detail: str = ""


class RssSampler:
    """Samples the resident memory of the cluster's live processes every `interval` s."""

    def __init__(self, processes: Callable[[], dict[str, int]], interval: float = 1.0) -> None:
        self._processes = processes
        self._interval = interval
        self.samples: list[dict[str, Any]] = []  # {"t": monotonic, "frontend": MiB, ...}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            sample: dict[str, Any] = {"t": time.monotonic()}
            for name, pid in self._processes().items():
                with contextlib.suppress(psutil.Error):
                    sample[name] = psutil.Process(pid).memory_info().rss / 2**20
            self.samples.append(sample)
            self._stop.wait(self._interval)


class ChaosRun:
    """The cluster under test and the faults applied to it (blocking methods: run them in
    a thread, `asyncio.to_thread`, while the load runs on the loop)."""

    def __init__(
        self,
        cluster: Cluster,
        etcd: EtcdServer,
        nats: NatsServer,
        workers: Sequence[tuple[str, ...]],
        *,
        redis: RedisServer | None = None,
        frontend_args: tuple[str, ...] = ("--migration-limit", "3"),
        lease_ttl_s: float = 2.0,
        seed: int = 7,
    ) -> None:
        """`workers`: each worker's own flags (its role, engine knobs, tiers); a killed
        worker is replaced by one with the same flags. `redis`: the shared KV store the
        workers use, for ``restart_redis``."""
        self.cluster = cluster
        self.etcd = etcd
        self.nats = nats
        self.redis = redis
        self.specs = [(*args, "--lease-ttl", str(lease_ttl_s)) for args in workers]
        self.frontend_args = frontend_args
        self.lease_ttl_s = lease_ttl_s
        self.size = len(self.specs)
        self.rng = random.Random(seed)
        self.workers: list[tuple[ClusterProcess, tuple[str, ...]]] = []  # with its flags
        self.frontend: ClusterProcess | None = None
        self.faults: list[FaultRecord] = []

    def start(self) -> str:
        """Start the workers and the frontend; returns the frontend's URL."""
        self.workers = [(self.cluster.worker(*spec), spec) for spec in self.specs]
        self.frontend = self.cluster.frontend(*self.frontend_args)
        self.cluster.wait_workers(self.frontend, self.size)
        return self.frontend.url

    def pids(self) -> dict[str, int]:
        out = {f"worker-{i}": w.process.pid for i, (w, _) in enumerate(self.workers)}
        if self.frontend is not None:
            out["frontend"] = self.frontend.process.pid
        return out

    def inject(self, kind: str) -> FaultRecord:
        start = time.monotonic()
        detail = getattr(self, f"_{kind}")()
        record = FaultRecord(kind, start, time.monotonic(), detail)
        self.faults.append(record)
        return record

    def _wait_size(self, timeout: float = 30.0) -> None:
        assert self.frontend is not None
        self.cluster.wait_workers(self.frontend, self.size, timeout=timeout)

    def _kill_worker(self) -> str:
        victim, spec = self.workers.pop(self.rng.randrange(len(self.workers)))
        victim.kill()
        new = self.cluster.worker(*spec)
        self.workers.append((new, spec))
        self._wait_size()
        role = spec[spec.index("--role") + 1] if "--role" in spec else "aggregated"
        return f"killed {victim.worker_id} ({role}), started {new.worker_id}"

    def _pause_worker(self) -> str:
        victim, _ = self.rng.choice(self.workers)
        victim.signal(signal.SIGSTOP)
        try:
            time.sleep(self.lease_ttl_s * 2 + 1)  # well past its lease
        finally:
            victim.signal(signal.SIGCONT)
        self._wait_size()  # thawed, it registers again
        return f"paused {victim.worker_id} for {self.lease_ttl_s * 2 + 1:.0f} s"

    def _restart_etcd(self) -> str:
        self.etcd.restart()
        return "etcd restarted"

    def _restart_nats(self) -> str:
        self.nats.restart()
        return "nats restarted"

    def _restart_redis(self) -> str:
        assert self.redis is not None, "restart_redis needs the cluster's RedisServer"
        self.redis.restart()  # empty again: nothing persists
        return "redis restarted (empty)"

    def _restart_frontend(self) -> str:
        assert self.frontend is not None
        old = self.frontend
        port = int(old.url.rsplit(":", 1)[1])
        code = old.stop()
        self.frontend = self.cluster.frontend(*self.frontend_args, port=port)
        self._wait_size()
        return f"frontend drained (exit {code}) and started again on port {port}"


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _percentiles(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": _p(values, 0.5), "p99": _p(values, 0.99)}


def _hit_rate(outcomes: list[Outcome]) -> float | None:
    prompt = sum(o.prompt_tokens for o in outcomes)
    return sum(o.cached_tokens for o in outcomes) / prompt if prompt else None


def _kv_dip(
    done: list[Outcome],
    ends: list[float],
    fault: FaultRecord,
    until: float,
    baseline: float,
    window: float,
) -> tuple[float | None, float | None]:
    """The KV hit rate's dip after `fault` and its recovery, over `window`-second windows
    of completed requests (`done`, sorted by end time, and their `ends`) sliding by
    0.5 s from the fault's start to `until` (the next fault or the end of the run).

    Returns (the lowest window's hit rate, seconds from the fault's start to the end
    of the last window below 90% of `baseline`: 0 if none was). The recovery is None
    when the last window before `until` is still below: not recovered in time."""
    lowest: float | None = None
    last_low: float | None = None
    still_low = False
    t = fault.start
    while t + window <= until:
        lo, hi = bisect.bisect_left(ends, t), bisect.bisect_left(ends, t + window)
        hit = _hit_rate(done[lo:hi])
        if hit is not None:
            lowest = hit if lowest is None else min(lowest, hit)
            still_low = hit < 0.9 * baseline
            if still_low:
                last_low = t + window
        t += 0.5
    if still_low:
        return lowest, None
    return lowest, 0.0 if last_low is None else round(last_low - fault.start, 2)


def report(
    outcomes: list[Outcome],
    faults: list[FaultRecord],
    *,
    started: float,
    ended: float,
    rss: list[dict[str, Any]] | None = None,
    settle_s: float = 2.0,
    window_s: float = 3.0,
) -> dict[str, Any]:
    """Counts, failures by reason, TTFT in and out of faults, KV recovery, RSS."""
    first_fault = min((f.start for f in faults), default=ended)
    baseline = _hit_rate([o for o in outcomes if o.status == "ok" and o.end < first_fault])
    spans = [(f.start, f.end + settle_s) for f in faults]

    def during(o: Outcome) -> bool:
        return any(o.start < b and o.end > a for a, b in spans)

    ok = [o for o in outcomes if o.status == "ok" and o.ttft is not None]
    ttft_in = [o.ttft for o in ok if o.ttft is not None and during(o)]
    ttft_out = [o.ttft for o in ok if o.ttft is not None and not during(o)]
    reasons: dict[str, int] = {}
    for o in outcomes:
        if o.status != "ok":
            key = f"{o.status}: {o.reason[:120]}"
            reasons[key] = reasons.get(key, 0) + 1
    done = sorted((o for o in outcomes if o.status == "ok"), key=lambda o: o.end)
    ends = [o.end for o in done]
    dips: list[tuple[float | None, float | None]] = []
    for i, f in enumerate(faults):
        until = faults[i + 1].start if i + 1 < len(faults) else ended
        dips.append(
            (None, None) if baseline is None else _kv_dip(done, ends, f, until, baseline, window_s)
        )
    by_kind: dict[str, int] = {}
    for f in faults:
        by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
    return {
        "duration_s": round(ended - started, 1),
        "requests": len(outcomes),
        "completed": sum(o.status == "ok" for o in outcomes),
        "failed": sum(o.status == "failed" for o in outcomes),
        "corrupted": sum(o.status == "corrupted" for o in outcomes),
        "retried_before_accept": sum(o.retries > 0 for o in outcomes),
        "failures": reasons,
        "faults_by_kind": by_kind,
        "faults": [
            {
                **asdict(f),
                "start": round(f.start - started, 2),
                "end": round(f.end - started, 2),
                "kv_hit_rate_lowest": None if low is None else round(low, 3),
                "kv_recovery_s": recovery,
            }
            for f, (low, recovery) in zip(faults, dips, strict=True)
        ],
        "kv_hit_rate_before_faults": baseline,
        "kv_hit_rate_overall": _hit_rate([o for o in outcomes if o.status == "ok"]),
        # The last 5 s: after the last fault's recovery, if it had time to recover.
        "kv_hit_rate_final": _hit_rate(done[bisect.bisect_left(ends, ended - 5.0) :]),
        "ttft_s": {
            "outside_faults": _percentiles(ttft_out),
            "during_faults": _percentiles(ttft_in),
            "max": max((o.ttft for o in ok if o.ttft is not None), default=None),
        },
        "mean_request_s": statistics.fmean(o.end - o.start for o in outcomes) if outcomes else None,
        "rss_mib": [
            {k: (round(v - started, 1) if k == "t" else round(v, 1)) for k, v in s.items()}
            for s in (rss or [])
        ],
    }


@dataclass
class Schedule:
    """When faults happen: `warmup_s` of clean load, then `kinds` in turn, each followed
    by `interval_s` of clean load (the KV hit rate's recovery is measured there), until
    `duration_s` has passed and every kind has run once; then `tail_s` more."""

    duration_s: float
    interval_s: float = 7.0
    warmup_s: float = 8.0
    kinds: tuple[str, ...] = FAULT_KINDS
    tail_s: float = 8.0  # more clean load after the last fault's interval


async def run_chaos(
    chaos: ChaosRun,
    load: SteadyLoad,
    schedule: Schedule,
    *,
    progress: Callable[[str], None] = print,
) -> tuple[list[Outcome], float, float]:
    """Run `load` while `chaos` injects `schedule`'s faults; returns (outcomes, start, end)."""
    stop = asyncio.Event()
    started = time.monotonic()
    load_task = asyncio.create_task(load.run(stop))
    await asyncio.sleep(schedule.warmup_s)
    i = 0
    while i < len(schedule.kinds) or time.monotonic() - started < schedule.duration_s:
        kind = schedule.kinds[i % len(schedule.kinds)]
        i += 1
        record = await asyncio.to_thread(chaos.inject, kind)
        progress(
            f"[{record.start - started:6.1f} s] {kind}: {record.detail} "
            f"({record.end - record.start:.1f} s); {len(load.outcomes)} requests, "
            f"{load.failures()} failed"
        )
        if load_task.done():
            break
        await asyncio.sleep(schedule.interval_s)
    await asyncio.sleep(schedule.tail_s)
    stop.set()
    outcomes = await load_task
    return outcomes, started, time.monotonic()
