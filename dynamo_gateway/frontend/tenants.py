"""Tenants: who sent a request (its API key), what it may use, and its place in line.

A request's bearer token is hashed and looked up in a table of key hashes;
the table maps each hash to a tenant. Keys themselves are never stored:
``--api-keys-file`` and ``[[frontend.tenants]]`` hold ``sha256:<hex>`` of each
key, or ``hmac-sha256:<hex>`` keyed by a pepper kept outside the file (see
docs/operations.md for why that is enough for generated keys). ``--api-key``
keys are hashed at start and form the ``default`` tenant; with no key at all,
every request is the ``default`` tenant and nothing is checked.

Per tenant: requests per minute and tokens per minute (token buckets; tokens
are charged when known: the prompt after tokenization, the completion at the
end) answer 429 ``rate_limit_exceeded`` with the bucket's Retry-After; its
``max_concurrent`` and the global ``--max-inflight`` are enforced by the fair
queue (`dynamo_gateway.frontend.limits.FairQueue`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from prometheus_client.core import Metric
from pydantic import TypeAdapter, ValidationError

from dynamo_gateway import clock
from dynamo_gateway.errors import AuthenticationError, ConfigError, OverloadedError
from dynamo_gateway.frontend.limits import Arrival, FairQueue, TokenBucket, retry_after_s
from dynamo_gateway.frontend.metrics import (
    DEFAULT_TENANT,
    ModelMetrics,
    TokenCounter,
    counter,
    gauge,
)
from dynamo_gateway.settings import FrontendSettings, TenantConfig

__all__ = [
    "DEFAULT_TENANT",
    "UNAUTHENTICATED",
    "Gate",
    "Ticket",
    "hash_key",
    "load_keys_file",
    "tenant_configs",
]

UNAUTHENTICATED = "-"  # the tenant label of requests refused before a key matched


def hash_key(key: str, pepper: str | None = None) -> str:
    """What a keys file stores for `key`: ``sha256:<hex>``, or with a pepper
    ``hmac-sha256:<hex>`` (HMAC-SHA256 keyed by the pepper)."""
    if pepper:
        return "hmac-sha256:" + hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _problems(exc: ValidationError) -> str:
    # Never the input values: a key may have been pasted where its hash belongs.
    return "; ".join(
        f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
    )


def load_keys_file(path: Path) -> list[TenantConfig]:
    """The tenants of a TOML (``[[tenants]]``) or JSON (``{"tenants": [...]}``) file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read keys file {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            data: Any = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        # TOML/JSON errors quote a position, not the content.
        raise ConfigError(f"keys file {path} is not valid {_kind(path)}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tenants"), list):
        raise ConfigError(f"keys file {path} needs a list of tenants ({_kind(path)} 'tenants')")
    try:
        return TypeAdapter(list[TenantConfig]).validate_python(data["tenants"])
    except ValidationError as exc:
        raise ConfigError(f"keys file {path}: {_problems(exc)}") from None


def _kind(path: Path) -> str:
    return "JSON" if path.suffix.lower() == ".json" else "TOML"


def tenant_configs(fe: FrontendSettings) -> list[TenantConfig]:
    """Inline tenants, then the keys file's; ``--api-key`` keys join ``default``."""
    configs = list(fe.tenants)
    if fe.api_keys_file is not None:
        configs += load_keys_file(fe.api_keys_file)
    plain = [hash_key(k) for k in fe.api_keys if k]
    if plain:
        for i, c in enumerate(configs):
            if c.name == DEFAULT_TENANT:
                configs[i] = c.model_copy(update={"key_hashes": [*c.key_hashes, *plain]})
                break
        else:
            configs.append(TenantConfig(name=DEFAULT_TENANT, key_hashes=plain))
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two tenants share a name: {sorted(names)}")
    seen: set[str] = set()
    for c in configs:
        for h in c.key_hashes:
            if h in seen:
                raise ConfigError(f"tenant {c.name!r} has a key hash another tenant also has")
            seen.add(h)
    return configs


@dataclass
class _Usage:
    """A tenant's limits and what it used (kept across reloads)."""

    config: TenantConfig
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    admitted: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # by reason

    def configure(self, config: TenantConfig, now: float) -> None:
        self.config = config
        self.requests = _bucket(self.requests, config.requests_per_minute, now)
        self.tokens = _bucket(self.tokens, config.tokens_per_minute, now)


def _bucket(old: TokenBucket | None, per_minute: float | None, now: float) -> TokenBucket | None:
    if per_minute is None:
        return None
    if old is None:
        return TokenBucket.per_minute(per_minute, now)
    old.update(per_minute / 60.0, per_minute, now)
    return old


class Ticket:
    """A slot in flight for `tenant`; `release()` once (more calls do nothing)."""

    __slots__ = ("_gate", "tenant")

    def __init__(self, gate: Gate, tenant: str) -> None:
        self._gate: Gate | None = gate
        self.tenant = tenant

    def release(self) -> None:
        if self._gate is not None:
            self._gate.release(self.tenant)
            self._gate = None


class Gate:
    """Authentication, per-tenant rate limits and fair admission for one frontend.

    `clock` is injected (seconds, monotonic) so the limits run on a virtual
    clock in replays and on a fake one in tests.
    """

    def __init__(self, fe: FrontendSettings, *, now: Callable[[], float] = clock.now) -> None:
        self._fe = fe
        self._now = now
        self._pepper = fe.api_key_pepper.get_secret_value() if fe.api_key_pepper else None
        self.queue: FairQueue[asyncio.Future[None]] = FairQueue(
            fe.max_inflight, fe.max_queued_per_tenant
        )
        self._usage: dict[str, _Usage] = {}
        self._by_hash: dict[str, str] = {}
        self.load(tenant_configs(fe))

    # -- configuration ------------------------------------------------------------

    def load(self, configs: Sequence[TenantConfig]) -> None:
        """Install a tenant table; tenants that stay keep their usage and buckets."""
        by_hash: dict[str, str] = {}
        for c in configs:
            for h in c.key_hashes:
                if h.startswith("hmac-sha256:") and not self._pepper:
                    raise ConfigError(
                        f"tenant {c.name!r} has hmac-sha256 key hashes but no api_key_pepper "
                        "is set (DYNAMO_GATEWAY_FRONTEND__API_KEY_PEPPER)"
                    )
                by_hash[h] = c.name
        now = self._now()
        usage: dict[str, _Usage] = {}
        for c in [*configs, *self._implicit_default(configs)]:
            u = self._usage.get(c.name) or _Usage(c)
            u.configure(c, now)
            usage[c.name] = u
            for granted in self.queue.set_policy(c.name, c.max_concurrent, c.weight):
                _wake(granted)
        self._usage, self._by_hash = usage, by_hash

    @staticmethod
    def _implicit_default(configs: Sequence[TenantConfig]) -> list[TenantConfig]:
        if any(c.name == DEFAULT_TENANT for c in configs):
            return []
        return [TenantConfig(name=DEFAULT_TENANT)]

    def reload(self) -> list[str]:
        """Re-read the settings' keys file; returns the tenant names now known."""
        if self._fe.api_keys_file is None:
            raise ConfigError("no keys file to reload (start with --api-keys-file FILE)")
        self.load(tenant_configs(self._fe))
        return sorted(self._usage)

    @property
    def auth_required(self) -> bool:
        return bool(self._by_hash)

    # -- per request --------------------------------------------------------------

    def authenticate(self, authorization: str) -> str:
        """The tenant of an ``Authorization`` header value, or AuthenticationError."""
        if not self._by_hash:
            return DEFAULT_TENANT
        scheme, _, token = authorization.partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else ""
        if key:
            tenant = self._by_hash.get(hash_key(key))
            if tenant is None and self._pepper:
                tenant = self._by_hash.get(hash_key(key, self._pepper))
            if tenant is not None:
                return tenant
        # The message never quotes what was sent.
        raise AuthenticationError(
            "Incorrect or missing API key. Pass it as 'Authorization: Bearer <key>'."
        )

    def check_rates(self, tenant: str) -> None:
        """Take one request from the tenant's request bucket; 429 if a bucket is empty."""
        u = self._usage[tenant]
        now = self._now()
        if u.tokens is not None and (wait := u.tokens.ready_in(1, now)) > 0:
            self._over(u, "tokens", u.config.tokens_per_minute, wait)
        if u.requests is not None and (wait := u.requests.take(1, now)) > 0:
            self._over(u, "requests", u.config.requests_per_minute, wait)

    def _over(self, u: _Usage, what: str, limit: float | None, wait: float) -> NoReturn:
        self._reject(u, f"{what}_per_minute")
        raise OverloadedError(
            f"tenant {u.config.name!r} is over its limit of {limit:g} {what} per minute; "
            "retry later",
            code="rate_limit_exceeded",
            retry_after=retry_after_s(wait),
        )

    async def enter(self, tenant: str) -> Ticket:
        """A slot: at once, after a wait in the tenant's queue, or 429."""
        u = self._usage[tenant]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        arrival = self.queue.arrive(tenant, waiter)
        if arrival is Arrival.FULL:
            self._reject(u, "queue_full")
            raise self._overloaded("its queue is full")
        if arrival is Arrival.QUEUED:
            try:
                # shield: a timeout must not cancel the future a release may resolve.
                await asyncio.wait_for(asyncio.shield(waiter), self._fe.queue_timeout_s)
            except TimeoutError:
                if self.queue.cancel(tenant, waiter):
                    self._reject(u, "queue_timeout")
                    raise self._overloaded("it waited too long") from None
                # Granted in the same instant: the slot is ours.
            except asyncio.CancelledError:
                if not self.queue.cancel(tenant, waiter):
                    self.release(tenant)
                raise
        u.admitted += 1
        return Ticket(self, tenant)

    def _overloaded(self, why: str) -> OverloadedError:
        return OverloadedError(
            f"the gateway is at its limit of {self.queue.capacity} requests in flight and "
            f"this request could not wait ({why}); retry later",
            retry_after=self._fe.retry_after_s,
        )

    def release(self, tenant: str) -> None:
        for granted in self.queue.release(tenant):
            _wake(granted)

    def charge(self, tenant: str, *, prompt: int = 0, completion: int = 0) -> None:
        u = self._usage.get(tenant)
        if u is None:  # removed by a reload while the request ran
            return
        u.prompt_tokens += prompt
        u.completion_tokens += completion
        if u.tokens is not None:
            u.tokens.charge(prompt + completion, self._now())

    def metered(self, mm: ModelMetrics, tenant: str) -> ModelMetrics:
        """`mm` whose completion-token counter also charges `tenant`."""

        def charge(n: int) -> None:
            self.charge(tenant, completion=n)

        return dataclasses.replace(mm, output_tokens=_Charging(mm.output_tokens, charge))

    @staticmethod
    def _reject(u: _Usage, reason: str) -> None:
        u.rejected[reason] += 1

    # -- reporting ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Tenants, their limits and usage (never their key hashes)."""
        now = self._now()
        tenants: dict[str, Any] = {}
        for name, u in sorted(self._usage.items()):
            c = u.config
            tenants[name] = {
                "keys": len(c.key_hashes),
                "limits": {
                    "requests_per_minute": c.requests_per_minute,
                    "tokens_per_minute": c.tokens_per_minute,
                    "max_concurrent": c.max_concurrent,
                    "weight": c.weight,
                },
                "inflight": self.queue.inflight_of(name),
                "queued": self.queue.queued_of(name),
                "requests_available": _level(u.requests, now),
                "tokens_available": _level(u.tokens, now),
                "admitted": u.admitted,
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "rejected": dict(u.rejected),
            }
        return {
            "auth_required": self.auth_required,
            "max_inflight": self.queue.capacity,
            "inflight": self.queue.inflight,
            "queued": self.queue.queued,
            "tenants": tenants,
        }

    def metrics(self) -> Iterable[Metric]:
        """Scrape-time families: rejections, slots and queues by tenant."""
        rejected = counter(
            "rate_limited", "Requests refused with 429, by tenant and reason", ["tenant", "reason"]
        )
        inflight = gauge("tenant_inflight_requests", "Admitted requests, by tenant", ["tenant"])
        queued = gauge("tenant_queued_requests", "Requests waiting for a slot", ["tenant"])
        for name, u in sorted(self._usage.items()):
            for reason, n in sorted(u.rejected.items()):
                rejected.add_metric([name, reason], n)
            inflight.add_metric([name], self.queue.inflight_of(name))
            queued.add_metric([name], self.queue.queued_of(name))
        return [rejected, inflight, queued]


def _level(bucket: TokenBucket | None, now: float) -> float | None:
    return None if bucket is None else round(bucket.available(now), 3)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Charging:
    """A token counter that also charges the tenant's token bucket."""

    __slots__ = ("_charge", "_counter")

    def __init__(self, inner: TokenCounter, charge: Callable[[int], None]) -> None:
        self._counter = inner
        self._charge = charge

    def inc(self, amount: float = 1) -> None:
        self._counter.inc(amount)
        self._charge(int(amount))
