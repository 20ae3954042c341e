"""End to end: tenants from a keys file, per-tenant 429s, fair queueing, the admin
port (status, reload, drain), and no secret in the server's log at debug level."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from dynamo_gateway.frontend.tenants import hash_key
from dynamo_gateway.testing import GatewayProcess, free_port

KEY_A = "dg-e2e-tenant-a-4f1c9b7e2d"
KEY_B = "dg-e2e-tenant-b-8a3e6d0c5f"
KEY_C = "dg-e2e-tenant-c-1b2d3f4a5c"
BAD_KEY = "dg-e2e-wrong-9e8d7c6b5a"
ADMIN_KEY = "dg-e2e-admin-0f1e2d3c4b"
SECRETS = (KEY_A, KEY_B, KEY_C, BAD_KEY, ADMIN_KEY)


def _keys_file(path: Path, tenants: list[dict[str, object]]) -> Path:
    path.write_text(json.dumps({"tenants": tenants}))
    return path


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def _chat(key: str, url: str) -> int:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers=_auth(key),
        timeout=30,
    )
    return r.status_code


def test_tenants_admin_port_reload_and_drain(
    gateway_server: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    keys = _keys_file(tmp_path / "keys.json", [
        {"name": "a", "key_hashes": [hash_key(KEY_A)], "requests_per_minute": 2},
        {"name": "b", "key_hashes": [hash_key(KEY_B)], "tokens_per_minute": 100000},
    ])  # fmt: skip
    admin_port = free_port()
    gw = gateway_server(
        "--api-keys-file", str(keys), "--admin-port", str(admin_port), "--speedup", "100",
        "--served-model-name", "demo",
        env={"DYNAMO_GATEWAY_FRONTEND__ADMIN_KEY": ADMIN_KEY},
    )  # fmt: skip
    admin = f"http://127.0.0.1:{admin_port}/admin"
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}

    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY_A, max_retries=0) as a:
        for _ in range(2):
            a.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        with pytest.raises(openai.RateLimitError) as info:
            a.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
    assert info.value.response.headers["retry-after"] == "30"
    assert info.value.code == "rate_limit_exceeded"
    assert _chat(KEY_B, gw.url) == 200
    assert _chat(BAD_KEY, gw.url) == 401
    assert _chat(KEY_C, gw.url) == 401  # not a tenant yet

    # The admin port answers only with the admin key; the main port has no /admin.
    assert httpx.get(f"{admin}/status").status_code == 401
    assert httpx.get(f"{gw.url}/admin/status", headers=auth).status_code == 404
    status = httpx.get(f"{admin}/status", headers=auth).json()
    assert status["tenants"]["a"]["admitted"] == 2
    assert status["tenants"]["a"]["rejected"] == {"requests_per_minute": 1}
    assert status["tenants"]["b"]["prompt_tokens"] > 0
    assert status["tenants"]["b"]["completion_tokens"] == 2
    assert status["models"]["demo"]["workers"] == 1

    _keys_file(keys, [
        {"name": "a", "key_hashes": [hash_key(KEY_A)], "requests_per_minute": 2},
        {"name": "c", "key_hashes": [hash_key(KEY_C)]},
    ])  # fmt: skip
    r = httpx.post(f"{admin}/reload", headers=auth)
    assert r.status_code == 200 and r.json()["tenants"] == ["a", "c", "default"]
    assert _chat(KEY_C, gw.url) == 200
    assert _chat(KEY_B, gw.url) == 401  # removed

    assert httpx.post(f"{admin}/drain", headers=auth).json()["draining"] is True
    assert httpx.get(f"{gw.url}/ready").status_code == 503
    assert _chat(KEY_C, gw.url) == 503
    httpx.post(f"{admin}/resume", headers=auth)
    assert httpx.get(f"{gw.url}/ready").status_code == 200
    assert _chat(KEY_C, gw.url) == 200

    text = httpx.get(f"{gw.url}/metrics").text
    series = 'requests_total{endpoint="chat",model="demo",status="200",tenant="c"}'
    assert f"dynamo_gateway_{series}" in text


async def test_a_flooding_tenant_does_not_shut_out_another(
    gateway_server: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """One slot, queues of 8. The flood holds the slot, fills its queue and is
    refused beyond it; the quiet tenant arrives after all that and still gets
    every other freed slot (first come first served would put it 9th)."""
    keys = _keys_file(tmp_path / "keys.json", [
        {"name": "flood", "key_hashes": [hash_key(KEY_A)]},
        {"name": "quiet", "key_hashes": [hash_key(KEY_B)]},
    ])  # fmt: skip
    admin_port = free_port()
    gw = gateway_server(
        "--api-keys-file", str(keys), "--admin-port", str(admin_port), "--speedup", "1",
        "--max-inflight", "1", "--max-queued-per-tenant", "8", "--queue-timeout", "60",
        "--served-model-name", "demo",
    )  # fmt: skip
    body = {"model": "demo", "messages": [{"role": "user", "content": "go"}], "max_tokens": 60}
    finished: list[tuple[str, int]] = []  # (tenant, status) in the order responses came

    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:

        async def send(name: str, key: str) -> None:
            r = await client.post(
                "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
            )
            finished.append((name, r.status_code))

        async def tenant(name: str) -> dict[str, int]:
            r = await client.get(f"http://127.0.0.1:{admin_port}/admin/status")
            return r.json()["tenants"][name]  # type: ignore[no-any-return]

        flood = [asyncio.ensure_future(send("flood", KEY_A)) for _ in range(12)]
        for _ in range(300):  # the flood holds the slot and fills its queue
            a = await tenant("flood")
            if a["inflight"] == 1 and a["queued"] == 8:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail(f"the flood never filled its queue: {a}\n{gw.log()}")
        quiet = [asyncio.ensure_future(send("quiet", KEY_B)) for _ in range(2)]
        await asyncio.gather(*flood, *quiet)
    codes = Counter(finished)
    assert codes[("quiet", 200)] == 2 and codes[("flood", 429)] >= 1, (finished, gw.log())
    assert codes[("flood", 200)] + codes[("flood", 429)] == 12
    served = [name for name, status in finished if status == 200]
    # Turns: flood, quiet, flood, quiet (one more flood first if the slot changed hands
    # while the quiet requests were on their way); first come first served: 9 floods.
    assert served[:6].count("quiet") == 2, served


def test_no_secret_in_the_log_at_debug_level(
    gateway_server: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    keys = _keys_file(tmp_path / "keys.json", [{"name": "c", "key_hashes": [hash_key(KEY_C)]}])
    gw = gateway_server(
        "--api-key", KEY_A, "--api-keys-file", str(keys), "--admin-key", ADMIN_KEY,
        "--log-level", "debug", "--speedup", "100", "--served-model-name", "demo",
    )  # fmt: skip
    for key in (KEY_A, KEY_C, BAD_KEY, ADMIN_KEY, ""):
        _chat(key, gw.url)
        httpx.get(f"{gw.url}/v1/models", headers=_auth(key))
        for path in ("/admin/status", "/admin/reload"):
            r = httpx.request(
                "GET" if path.endswith("status") else "POST",
                f"{gw.url}{path}",
                headers=_auth(key),
            )
            assert all(s not in r.text for s in SECRETS)
    with httpx.stream(
        "POST", f"{gw.url}/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "x"}], "stream": True,
              "max_tokens": 3},
        headers={"authorization": f"Bearer {KEY_A}"},
    ) as r:  # fmt: skip
        assert r.status_code == 200 and "[DONE]" in r.read().decode()
    # A bad keys file on reload: its error names the field, never the value.
    keys.write_text(json.dumps({"tenants": [{"name": "c", "key_hashes": [KEY_C]}]}))
    r = httpx.post(f"{gw.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 400 and KEY_C not in r.text
    gw.stop()
    log = gw.log()
    assert "DEBUG" in log, log  # debug logging was on
    leaked = [s for s in SECRETS if s in log]
    assert not leaked, log
