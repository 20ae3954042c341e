"""What the planner sees each interval, as plain values (no I/O here).

`PoolLoad` sums the load reports of one model's workers of one role; `Traffic`
is one model's request stream over the last interval, computed from two scrapes
of the frontends' Prometheus metrics (`traffic_between`). The planner loop
(`dynamo_gateway.planner.loop`) gathers both; the policies only read them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from dynamo_gateway.protocol.engine import LoadMetrics, WorkerRole


@dataclass(frozen=True, order=True)
class PoolKey:
    """One pool of workers: a served model and a role."""

    model: str
    role: WorkerRole

    def __str__(self) -> str:
        return f"{self.model}/{self.role.value}"


@dataclass(frozen=True)
class PoolLoad:
    """A pool's size and load now."""

    live: int = 0  # registered, not draining
    starting: int = 0  # asked for, not registered yet
    draining: int = 0  # leaving: finishing their requests
    active_requests: int = 0  # summed over the live workers
    waiting_requests: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0

    @property
    def size(self) -> int:
        """Workers that count towards the pool: live and starting."""
        return self.live + self.starting

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def requests(self) -> int:
        return self.active_requests + self.waiting_requests


def pool_load(reports: Iterable[LoadMetrics], *, starting: int = 0, draining: int = 0) -> PoolLoad:
    """Sum the load reports of a pool's live workers."""
    live = active = waiting = used = total = 0
    for m in reports:
        live += 1
        active += m.active_requests
        waiting += m.waiting_requests
        used += m.kv_blocks_used
        total += m.kv_blocks_total
    return PoolLoad(live, starting, draining, active, waiting, used, total)


@dataclass(frozen=True)
class Traffic:
    """One model's requests over an interval (from the frontends' counters)."""

    seconds: float = 0.0
    requests: float = 0.0  # finished HTTP requests
    input_tokens: float = 0.0
    output_tokens: float = 0.0
    ttft_s: float | None = None  # mean over the interval; None: no sample
    itl_s: float | None = None
    ttft_attainment: float | None = None  # share within the model's target, from buckets
    itl_attainment: float | None = None

    @property
    def request_rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_isl(self) -> float:
        return self.input_tokens / self.requests if self.requests else 0.0

    @property
    def mean_osl(self) -> float:
        return self.output_tokens / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Observation:
    """Everything one decision is taken on."""

    time: float  # seconds on the planner's clock
    pools: Mapping[PoolKey, PoolLoad]
    traffic: Mapping[str, Traffic] = field(default_factory=dict)


# -- frontend metrics ---------------------------------------------------------------------

# Samples of one scrape: (metric sample name, sorted label items) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

PREFIX = "dynamo_gateway"
_GENERATION_ENDPOINTS = frozenset({"chat", "completions", "responses"})


def parse_samples(text: str) -> Samples:
    """Prometheus text exposition -> samples (comments and malformed lines skipped)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def merge_samples(scrapes: Iterable[Samples]) -> Samples:
    """Several frontends' samples added together (each frontend counts its own requests)."""
    out: Samples = {}
    for scrape in scrapes:
        for key, value in scrape.items():
            out[key] = out.get(key, 0.0) + value
    return out


def _sum(samples: Samples, name: str, model: str, **match: str) -> float:
    total = 0.0
    for (sample, labels), value in samples.items():
        if sample != name:
            continue
        d = dict(labels)
        if d.get("model") != model or any(d.get(k) != v for k, v in match.items()):
            continue
        total += value
    return total


def _requests(samples: Samples, model: str) -> float:
    total = 0.0
    for (sample, labels), value in samples.items():
        d = dict(labels)
        if (
            sample == f"{PREFIX}_requests_total"
            and d.get("model") == model
            and d.get("endpoint") in _GENERATION_ENDPOINTS
        ):
            total += value
    return total


def _within(samples: Samples, name: str, model: str, target_s: float) -> float:
    """Observations at or under the largest bucket bound <= target (a lower bound)."""
    best_le, best = -math.inf, 0.0
    for (sample, labels), value in samples.items():
        if sample != f"{name}_bucket":
            continue
        d = dict(labels)
        if d.get("model") != model:
            continue
        le = float(d.get("le", "inf"))
        if best_le < le <= target_s * (1 + 1e-9):
            best_le, best = le, value
    return best


def traffic_between(
    before: Samples,
    after: Samples,
    model: str,
    seconds: float,
    *,
    ttft_target_s: float | None = None,
    itl_target_s: float | None = None,
) -> Traffic:
    """One model's traffic between two scrapes `seconds` apart.

    A counter that went down (a frontend restarted) counts from zero.
    """

    def delta(value: float, old: float) -> float:
        return value - old if value >= old else value

    def hist(name: str, target: float | None) -> tuple[float | None, float | None]:
        count = delta(_sum(after, f"{name}_count", model), _sum(before, f"{name}_count", model))
        if count <= 0:
            return None, None
        total = delta(_sum(after, f"{name}_sum", model), _sum(before, f"{name}_sum", model))
        share = None
        if target is not None:
            ok = delta(_within(after, name, model, target), _within(before, name, model, target))
            share = min(1.0, ok / count)
        return total / count, share

    ttft, ttft_ok = hist(f"{PREFIX}_time_to_first_token_seconds", ttft_target_s)
    itl, itl_ok = hist(f"{PREFIX}_inter_token_latency_seconds", itl_target_s)
    return Traffic(
        seconds=seconds,
        requests=delta(_requests(after, model), _requests(before, model)),
        input_tokens=delta(
            _sum(after, f"{PREFIX}_input_tokens_total", model),
            _sum(before, f"{PREFIX}_input_tokens_total", model),
        ),
        output_tokens=delta(
            _sum(after, f"{PREFIX}_output_tokens_total", model),
            _sum(before, f"{PREFIX}_output_tokens_total", model),
        ),
        ttft_s=ttft,
        itl_s=itl,
        ttft_attainment=ttft_ok,
        itl_attainment=itl_ok,
    )
