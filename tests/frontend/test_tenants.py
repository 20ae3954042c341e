"""Tenants: token buckets and the fair queue step by step (pure, clock passed in),
the `Gate` over them on a fake clock, keys files, and the in-process app
(tenant metrics, 429s, admin routes behind the admin key, drain)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynamo_gateway.errors import AuthenticationError, ConfigError, OverloadedError
from dynamo_gateway.frontend.app import build_app
from dynamo_gateway.frontend.limits import Arrival, FairQueue, TokenBucket, retry_after_s
from dynamo_gateway.frontend.tenants import Gate, hash_key, load_keys_file, tenant_configs
from dynamo_gateway.server import embedded
from dynamo_gateway.settings import FrontendSettings, TenantConfig, load_settings

KEY_A = "dg-key-of-tenant-a-0123456789"
KEY_B = "dg-key-of-tenant-b-0123456789"


# -- token bucket -------------------------------------------------------------------


def test_bucket_takes_until_empty_then_says_when() -> None:
    b = TokenBucket.per_minute(6, now=0.0)  # 0.1 per second, burst 6
    assert [b.take(1, 0.0) for _ in range(6)] == [0.0] * 6
    assert b.take(1, 0.0) == pytest.approx(10.0)  # one unit takes 10 s to refill
    assert b.take(1, 4.0) == pytest.approx(6.0)  # nothing taken while waiting
    assert b.take(1, 10.0) == 0.0
    assert b.available(10.0) == pytest.approx(0.0)
    assert b.available(1000.0) == 6  # never above the burst


def test_bucket_charged_after_the_fact_goes_into_debt() -> None:
    b = TokenBucket.per_minute(600, now=0.0)  # 10 tokens per second
    assert b.ready_in(1, 0.0) == 0.0
    b.charge(900, 0.0)  # a request used more than the whole minute's budget
    assert b.available(0.0) == pytest.approx(-300)
    assert b.ready_in(1, 0.0) == pytest.approx(30.1)
    assert b.ready_in(1, 30.1) == pytest.approx(0.0)


def test_bucket_update_keeps_what_was_used() -> None:
    b = TokenBucket.per_minute(60, now=0.0)
    b.charge(50, 0.0)
    b.update(120 / 60, 120, 0.0)
    assert b.available(0.0) == pytest.approx(70)


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    assert [retry_after_s(s) for s in (0.01, 1.0, 1.2, 29.9)] == [1, 1, 2, 30]


# -- fair queue ---------------------------------------------------------------------


def test_queue_admits_up_to_capacity_then_queues_then_rejects() -> None:
    q: FairQueue[int] = FairQueue(capacity=2, max_queue=2)
    assert [q.arrive("a", i) for i in range(5)] == [
        Arrival.ADMITTED, Arrival.ADMITTED, Arrival.QUEUED, Arrival.QUEUED, Arrival.FULL,
    ]  # fmt: skip
    assert (q.inflight, q.queued) == (2, 2)
    assert q.release("a") == [2]  # first come, first served within a tenant
    assert q.release("a") == [3]
    assert q.release("a") == [] and q.inflight == 1


def test_no_queue_rejects_at_once_like_a_plain_limit() -> None:
    q: FairQueue[int] = FairQueue(capacity=1, max_queue=0)
    assert q.arrive("a", 1) is Arrival.ADMITTED
    assert q.arrive("b", 2) is Arrival.FULL


def test_a_flooding_tenant_does_not_starve_another() -> None:
    q: FairQueue[tuple[str, int]] = FairQueue(capacity=4, max_queue=1000)
    for i in range(4):
        assert q.arrive("flood", ("flood", i)) is Arrival.ADMITTED
    for i in range(4, 200):
        q.arrive("flood", ("flood", i))
    for i in range(10):  # the quiet tenant comes after 196 queued flood requests
        assert q.arrive("quiet", ("quiet", i)) is Arrival.QUEUED
    running = [("flood", i) for i in range(4)]
    order: list[str] = []
    while running and len(order) < 20:
        tenant, _ = running.pop(0)
        granted = q.release(tenant)
        running += granted
        order += [t for t, _ in granted]
    # Alternating turns: all 10 quiet requests among the first 20 slots freed.
    assert Counter(order) == {"flood": 10, "quiet": 10}
    assert order[:4] == ["flood", "quiet", "flood", "quiet"]


def test_weights_share_freed_slots() -> None:
    q: FairQueue[str] = FairQueue(capacity=1, max_queue=100)
    q.set_policy("gold", None, weight=3)
    assert q.arrive("x", "x") is Arrival.ADMITTED
    for _ in range(30):
        q.arrive("gold", "gold")
        q.arrive("std", "std")
    order, current = [], "x"
    for _ in range(40):
        (current,) = q.release(current)
        order.append(current)
    assert Counter(order) == {"gold": 30, "std": 10}


def test_max_concurrent_holds_a_tenant_back_without_blocking_others() -> None:
    q: FairQueue[str] = FairQueue(capacity=10, max_queue=10)
    q.set_policy("small", max_concurrent=1)
    assert q.arrive("small", "s1") is Arrival.ADMITTED
    assert q.arrive("small", "s2") is Arrival.QUEUED  # slots free, but not for it
    assert q.arrive("other", "o1") is Arrival.ADMITTED
    assert q.release("other") == []
    assert q.release("small") == ["s2"]
    assert q.set_policy("small", max_concurrent=None) == []
    q.arrive("small", "s3")
    assert q.queued_of("small") == 0 and q.inflight_of("small") == 2


def test_cancel_withdraws_a_waiter_but_not_a_granted_one() -> None:
    q: FairQueue[str] = FairQueue(capacity=1, max_queue=5)
    q.arrive("a", "a1")
    q.arrive("b", "b1")
    q.arrive("c", "c1")
    assert q.cancel("b", "b1") is True
    assert q.release("a") == ["c1"]  # b left the ring
    assert q.cancel("c", "c1") is False  # granted: the caller owns the slot
    assert q.cancel("nobody", "x") is False


# -- the gate: keys, rates, waiting ----------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _fe(**kw: Any) -> FrontendSettings:
    return load_settings(frontend=kw).frontend


def _tenant(name: str, key: str, **limits: Any) -> dict[str, Any]:
    return {"name": name, "key_hashes": [hash_key(key)], **limits}


def test_authenticate_maps_keys_to_tenants() -> None:
    gate = Gate(_fe(tenants=[_tenant("a", KEY_A)], api_keys=[KEY_B]))
    assert gate.authenticate(f"Bearer {KEY_A}") == "a"
    assert gate.authenticate(f"bearer  {KEY_B} ") == "default"  # --api-key: the default tenant
    for bad in ("", f"Basic {KEY_A}", "Bearer nope", f"Bearer {KEY_A}x"):
        with pytest.raises(AuthenticationError) as info:
            gate.authenticate(bad)
        assert KEY_A not in info.value.message


def test_without_keys_everyone_is_the_default_tenant() -> None:
    gate = Gate(_fe())
    assert not gate.auth_required and gate.authenticate("") == "default"


def test_peppered_hashes() -> None:
    pepper = "a-secret-pepper"
    fe = _fe(api_key_pepper=pepper, tenants=[
        {"name": "a", "key_hashes": [hash_key(KEY_A, pepper)]},
    ])  # fmt: skip
    assert hash_key(KEY_A, pepper).startswith("hmac-sha256:")
    assert hash_key(KEY_A, pepper) != hash_key(KEY_A, "other")
    assert Gate(fe).authenticate(f"Bearer {KEY_A}") == "a"
    with pytest.raises(ConfigError, match="api_key_pepper"):
        Gate(_fe(tenants=[{"name": "a", "key_hashes": [hash_key(KEY_A, pepper)]}]))


def test_requests_per_minute_429_with_retry_after_from_the_bucket() -> None:
    clock = FakeClock()
    gate = Gate(_fe(tenants=[_tenant("a", KEY_A, requests_per_minute=2)]), now=clock)
    gate.check_rates("a")
    gate.check_rates("a")
    with pytest.raises(OverloadedError) as info:
        gate.check_rates("a")
    err = info.value
    assert (err.status, err.code, err.type) == (429, "rate_limit_exceeded", "rate_limit_error")
    assert err.retry_after == 30  # 2 per minute: one every 30 s
    clock.t += 30
    gate.check_rates("a")
    assert gate.snapshot()["tenants"]["a"]["rejected"] == {"requests_per_minute": 1}


def test_tokens_per_minute_charged_when_known() -> None:
    clock = FakeClock()
    gate = Gate(_fe(tenants=[_tenant("a", KEY_A, tokens_per_minute=600)]), now=clock)
    gate.check_rates("a")
    gate.charge("a", prompt=100, completion=800)  # 300 over the minute's 600
    with pytest.raises(OverloadedError) as info:
        gate.check_rates("a")
    assert info.value.code == "rate_limit_exceeded" and info.value.retry_after == 31
    clock.t += 31
    gate.check_rates("a")
    usage = gate.snapshot()["tenants"]["a"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (100, 800)


async def test_queue_timeout_is_429_and_a_freed_slot_goes_to_the_waiter() -> None:
    gate = Gate(_fe(max_inflight=1, queue_timeout_s=0.05))
    held = await gate.enter("default")
    with pytest.raises(OverloadedError) as info:
        await gate.enter("default")
    assert info.value.code == "too_many_requests" and info.value.retry_after == 1
    waiter = asyncio.ensure_future(gate.enter("default"))
    await asyncio.sleep(0)
    held.release()
    held.release()  # a second release does nothing
    (await waiter).release()
    assert gate.queue.inflight == 0


async def test_queue_full_is_429_at_once() -> None:
    gate = Gate(_fe(max_inflight=1, max_queued_per_tenant=0))
    await gate.enter("default")
    with pytest.raises(OverloadedError):
        await gate.enter("default")
    assert gate.snapshot()["tenants"]["default"]["rejected"] == {"queue_full": 1}


async def test_a_cancelled_waiter_leaves_no_slot_behind() -> None:
    gate = Gate(_fe(max_inflight=1, queue_timeout_s=10))
    held = await gate.enter("default")
    waiter = asyncio.ensure_future(gate.enter("default"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    held.release()
    assert (gate.queue.inflight, gate.queue.queued) == (0, 0)


async def test_fair_share_through_the_gate_under_contention() -> None:
    fe = _fe(tenants=[_tenant("flood", KEY_A), _tenant("quiet", KEY_B)], max_inflight=2,
             max_queued_per_tenant=100, queue_timeout_s=30)  # fmt: skip
    gate = Gate(fe)
    served: list[str] = []

    async def one(tenant: str) -> None:
        ticket = await gate.enter(tenant)
        served.append(tenant)
        await asyncio.sleep(0)  # hold the slot for a moment
        ticket.release()

    flood = [asyncio.ensure_future(one("flood")) for _ in range(60)]
    await asyncio.sleep(0)  # the flood is in line first
    quiet = [asyncio.ensure_future(one("quiet")) for _ in range(10)]
    await asyncio.gather(*flood, *quiet)
    assert Counter(served[:24]) == {"flood": 14, "quiet": 10}  # 2 first, then turns


# -- keys files ---------------------------------------------------------------------


def test_keys_file_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "keys.toml"
    toml.write_text(
        f'[[tenants]]\nname = "a"\nkey_hashes = ["{hash_key(KEY_A)}"]\n'
        "requests_per_minute = 60\ntokens_per_minute = 10000\nmax_concurrent = 4\n"
    )
    (a,) = load_keys_file(toml)
    assert (a.name, a.requests_per_minute, a.max_concurrent) == ("a", 60, 4)
    js = tmp_path / "keys.json"
    js.write_text(json.dumps({"tenants": [_tenant("b", KEY_B, weight=2)]}))
    assert load_keys_file(js)[0].weight == 2


def test_keys_file_errors_never_echo_a_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[[tenants]]\nname = "a"\nkey_hashes = ["{KEY_A}"]\n')
    with pytest.raises(ConfigError) as info:
        load_keys_file(path)
    assert "key_hashes" in str(info.value) and KEY_A not in str(info.value)
    with pytest.raises(ConfigError, match="invalid settings") as settings_info:
        load_settings(frontend={"tenants": [{"name": "a", "key_hashes": [KEY_A]}]})
    assert KEY_A not in str(settings_info.value)
    path.write_text("tenants = 3")
    with pytest.raises(ConfigError, match="list of tenants"):
        load_keys_file(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_keys_file(tmp_path / "missing.toml")


def test_api_keys_join_a_configured_default_tenant_and_hashes_are_unique() -> None:
    fe = _fe(api_keys=[KEY_B], tenants=[{"name": "default", "requests_per_minute": 5}])
    (default,) = tenant_configs(fe)
    assert default.key_hashes == [hash_key(KEY_B)] and default.requests_per_minute == 5
    with pytest.raises(ConfigError, match="key hash"):
        tenant_configs(_fe(tenants=[_tenant("a", KEY_A), _tenant("b", KEY_A)]))
    with pytest.raises(ConfigError, match="share a name"):
        tenant_configs(_fe(tenants=[_tenant("a", KEY_A), _tenant("a", KEY_B)]))


def test_reload_keeps_usage_of_tenants_that_stay(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tenants": [_tenant("a", KEY_A, requests_per_minute=2)]}))
    clock = FakeClock()
    gate = Gate(_fe(api_keys_file=str(path)), now=clock)
    gate.check_rates("a")
    gate.check_rates("a")
    path.write_text(json.dumps({"tenants": [
        _tenant("a", KEY_A, requests_per_minute=3), _tenant("b", KEY_B),
    ]}))  # fmt: skip
    assert gate.reload() == ["a", "b", "default"]
    gate.check_rates("a")  # the raised limit left one request
    with pytest.raises(OverloadedError):
        gate.check_rates("a")
    assert gate.authenticate(f"Bearer {KEY_B}") == "b"
    path.write_text("not toml {")
    with pytest.raises(ConfigError):
        gate.reload()
    assert gate.authenticate(f"Bearer {KEY_B}") == "b"  # the old table stays


def test_tenant_config_validates_names_and_hashes() -> None:
    with pytest.raises(ValueError):
        TenantConfig(name="has space")
    with pytest.raises(ValueError):
        TenantConfig(name="a", key_hashes=["sha256:xyz"])


# -- the app in-process -------------------------------------------------------------

ADMIN_KEY = "dg-admin-key-0123456789"
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture
async def client(demo_model: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(
        engine="mocker",
        models=[{"path": demo_model, "name": "demo"}],
        mocker={"speedup": 100},
        frontend={
            "admin_key": ADMIN_KEY,
            "tenants": [_tenant("a", KEY_A, requests_per_minute=3), _tenant("b", KEY_B)],
        },
    )
    async with embedded(settings) as gateway:
        transport = httpx.ASGITransport(app=build_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_app_limits_and_labels_by_tenant(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        ok = await client.post("/v1/chat/completions", json=CHAT, headers=_auth(KEY_A))
        assert ok.status_code == 200
    over = await client.post("/v1/chat/completions", json=CHAT, headers=_auth(KEY_A))
    assert over.status_code == 429 and over.headers["retry-after"] == "20"
    assert over.json()["error"]["code"] == "rate_limit_exceeded"
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=_auth(KEY_B))).is_success
    bad = await client.post("/v1/chat/completions", json=CHAT, headers=_auth("wrong"))
    assert bad.status_code == 401
    assert (await client.get("/v1/models")).status_code == 401
    metrics = (await client.get("/metrics")).text
    for line in (
        'requests_total{endpoint="chat",model="demo",status="200",tenant="a"} 3.0',
        'requests_total{endpoint="chat",model="-",status="429",tenant="a"} 1.0',
        'requests_total{endpoint="chat",model="demo",status="200",tenant="b"} 1.0',
        'requests_total{endpoint="chat",model="-",status="401",tenant="-"} 1.0',
        'output_tokens_total{model="demo",tenant="a"} 9.0',
        'rate_limited_total{reason="requests_per_minute",tenant="a"} 1.0',
    ):
        assert f"dynamo_gateway_{line}" in metrics, line


async def test_admin_routes_need_the_admin_key(client: httpx.AsyncClient) -> None:
    for key in (None, KEY_A, "wrong"):
        headers = _auth(key) if key else {}
        r = await client.get("/admin/status", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"
        assert ADMIN_KEY not in r.text
    await client.post("/v1/chat/completions", json=CHAT, headers=_auth(KEY_B))
    status = (await client.get("/admin/status", headers=_auth(ADMIN_KEY))).json()
    assert status["models"]["demo"]["workers"] == 1 and status["draining"] is False
    assert status["tenants"]["b"]["admitted"] == 1 and status["tenants"]["b"]["keys"] == 1
    assert status["tenants"]["b"]["completion_tokens"] == 3
    assert "key_hashes" not in json.dumps(status)
    assert status["workers"]["demo"][0]["role"] == "aggregated"
    r = await client.post("/admin/reload", headers=_auth(ADMIN_KEY))
    assert r.status_code == 400 and r.json()["error"]["code"] == "reload_failed"


async def test_drain_a_model_then_everything(client: httpx.AsyncClient) -> None:
    admin = _auth(ADMIN_KEY)
    nope = await client.post("/admin/drain?model=other", headers=admin)
    assert nope.status_code == 404
    r = await client.post("/admin/drain?model=demo", headers=admin)
    assert r.json()["draining_models"] == ["demo"]
    refused = await client.post("/v1/chat/completions", json=CHAT, headers=_auth(KEY_B))
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    ready = await client.get("/ready")  # its only model drains: out of the load balancer
    assert ready.status_code == 503 and ready.json()["draining"] == ["demo"]
    await client.post("/admin/resume?model=demo", headers=admin)
    assert (await client.get("/ready")).status_code == 200
    await client.post("/admin/drain", headers=admin)
    assert (await client.get("/ready")).json()["status"] == "draining"
    refused = await client.post("/v1/completions", json={"model": "demo", "prompt": "x"},
                                headers=_auth(KEY_B))  # fmt: skip
    assert refused.status_code == 503
    await client.post("/admin/resume", headers=admin)
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=_auth(KEY_B))).is_success
