"""Prometheus metrics of the frontend, in a registry per app (tests build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "dynamo_gateway"
DEFAULT_TENANT = "default"  # the tenant label when none is given (no keys, or `--api-key`)

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15,
    0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
# Whole requests (Dynamo: log-spaced 1-512 s); ours start lower for short answers.
_DURATION_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
)  # fmt: skip
# Sequence lengths in tokens (Dynamo: ISL 50-128k, OSL 50-32k, log-spaced).
_ISL_BUCKETS = tuple(float(2**i) for i in range(4, 18))  # 16 .. 131072
_OSL_BUCKETS = tuple(float(2**i) for i in range(2, 16))  # 4 .. 32768


class TokenCounter(Protocol):
    """What request code does with a token counter (a `Counter` child, or a wrapper
    that also charges the tenant's token budget)."""

    def inc(self, amount: float = 1) -> None: ...


@dataclass
class ModelMetrics:
    """Label-bound children for one model and tenant: resolved once, cheap on the hot path."""

    ttft: Histogram
    itl: Histogram
    input_tokens: TokenCounter
    output_tokens: TokenCounter
    cached_tokens: TokenCounter
    inflight: Gauge
    # Shaped like Dynamo's frontend (docs/operations.md#metrics):
    queued: Gauge  # admitted, no first token yet
    duration: Histogram  # arrival -> last byte
    isl: Histogram  # prompt tokens per request
    osl: Histogram  # completion tokens per request
    cached_per_request: Histogram  # prompt tokens served from the prefix cache


_C = TypeVar("_C", bound="TenantCounter")


class TenantCounter(Counter):
    """A counter whose last label is ``tenant``, defaulting to ``default``: code
    written before tenants (``labels(model, endpoint, status)``) keeps working."""

    def labels(self: _C, *labelvalues: object, **labelkwargs: object) -> _C:
        if len(labelvalues) == len(self._labelnames) - 1:  # labels(m, e, s[, tenant=t])
            labelvalues = (*labelvalues, labelkwargs.pop("tenant", DEFAULT_TENANT))
        elif labelkwargs:
            labelkwargs.setdefault("tenant", DEFAULT_TENANT)
        return super().labels(*labelvalues, **labelkwargs)


@dataclass
class FrontendMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = TenantCounter(
            f"{PREFIX}_requests",
            "HTTP requests handled, by model, endpoint, status code and tenant",
            ["model", "endpoint", "status", "tenant"],
            registry=r,
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "Requests that ended in an error, by error type",
            ["type"],
            registry=r,
        )
        self.inflight = Gauge(
            f"{PREFIX}_inflight_requests", "Requests in flight, by model", ["model"], registry=r
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between streamed chunks, divided by the tokens in the chunk",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        tokens = ["model", "tenant"]
        self.input_tokens = Counter(f"{PREFIX}_input_tokens", "Prompt tokens", tokens, registry=r)
        self.output_tokens = Counter(
            f"{PREFIX}_output_tokens", "Generated tokens", tokens, registry=r
        )
        self.cached_tokens = Counter(
            f"{PREFIX}_cached_tokens",
            "Prompt tokens served from the prefix cache",
            tokens,
            registry=r,
        )
        self.queued = Gauge(
            f"{PREFIX}_queued_requests",
            "Requests admitted and waiting for their first token, by model",
            ["model"],
            registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Generation requests from arrival to the last byte sent",
            ["model"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.isl = Histogram(
            f"{PREFIX}_input_sequence_tokens",
            "Prompt tokens per request",
            ["model"],
            buckets=_ISL_BUCKETS,
            registry=r,
        )
        self.osl = Histogram(
            f"{PREFIX}_output_sequence_tokens",
            "Completion tokens per request (all choices)",
            ["model"],
            buckets=_OSL_BUCKETS,
            registry=r,
        )
        self.cached_per_request = Histogram(
            f"{PREFIX}_cached_tokens_per_request",
            "Prompt tokens per request served from the prefix cache",
            ["model"],
            buckets=(0.0, *_ISL_BUCKETS),
            registry=r,
        )
        self._models: dict[tuple[str, str], ModelMetrics] = {}

    def model(self, name: str, tenant: str = DEFAULT_TENANT) -> ModelMetrics:
        m = self._models.get((name, tenant))
        if m is None:
            m = self._models[name, tenant] = ModelMetrics(
                ttft=self.ttft.labels(name),
                itl=self.itl.labels(name),
                input_tokens=self.input_tokens.labels(name, tenant),
                output_tokens=self.output_tokens.labels(name, tenant),
                cached_tokens=self.cached_tokens.labels(name, tenant),
                inflight=self.inflight.labels(name),
                queued=self.queued.labels(name),
                duration=self.duration.labels(name),
                isl=self.isl.labels(name),
                osl=self.osl.labels(name),
                cached_per_request=self.cached_per_request.labels(name),
            )
        return m

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add metrics computed at scrape time (worker load, worker counts)."""
        self.registry.register(_FnCollector(collect))


class _FnCollector(Collector):
    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self._fn = fn

    def collect(self) -> Iterable[Metric]:
        return self._fn()


def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    """A counter kept elsewhere (read at scrape time); `name` without ``_total``."""
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


# Our family (without PREFIX) -> Dynamo's frontend family (without "dynamo_frontend"):
# the series whose type and meaning match Dynamo's (docs/operations.md#metrics).
DYNAMO_NAMES = {
    "requests": "requests",
    "inflight_requests": "inflight_requests",
    "queued_requests": "queued_requests",
    "request_duration_seconds": "request_duration_seconds",
    "input_sequence_tokens": "input_sequence_tokens",
    "output_sequence_tokens": "output_sequence_tokens",
    "cached_tokens_per_request": "cached_tokens",
    "output_tokens": "output_tokens",
    "time_to_first_token_seconds": "time_to_first_token_seconds",
    "inter_token_latency_seconds": "inter_token_latency_seconds",
    "model_context_length": "model_context_length",
    "model_kv_cache_block_size": "model_kv_cache_block_size",
    "model_migration_limit": "model_migration_limit",
    "migrations": "model_migration",
}
DYNAMO_PREFIX = "dynamo_frontend"


class DynamoNames(Collector):
    """The families of `DYNAMO_NAMES` again, under Dynamo's own names
    (``dynamo_frontend_*``), for dashboards written for Dynamo's frontend
    (``frontend.dynamo_metric_names``). Same samples and labels, collected from
    `registry` at each scrape: nothing is counted twice."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._names = {
            f"{PREFIX}_{ours}": f"{DYNAMO_PREFIX}_{d}" for ours, d in DYNAMO_NAMES.items()
        }

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            name = self._names.get(family.name)
            if name is None:
                continue
            copy = Metric(name, family.documentation, family.type, family.unit)
            for s in family.samples:
                copy.samples.append(s._replace(name=name + s.name[len(family.name) :]))
            yield copy
