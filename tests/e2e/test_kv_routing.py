"""KV-aware routing end to end: a real gateway process, mocker workers, a real client.

Two prompts that share a long prefix (exact token ids, so the shared blocks are
exact) go one after the other. With `kv` the second lands where the first left
its KV blocks and reports them as cached; with `round_robin` it does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from dynamo_gateway.testing import Cluster, GatewayProcess, read_metric

PREFIX = [100 + (i % 500) for i in range(160)]  # 10 blocks of 16 tokens


def _complete(url: str, prompt: list[int], session: str | None = None) -> dict[str, Any]:
    headers = {"X-Session-Id": session} if session else {}
    body = {"model": "demo", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _cached(response: dict[str, Any]) -> int:
    details = response["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def _wait_for_kv_events(url: str, timeout: float = 10.0) -> None:
    """Until the router has indexed the whole shared prefix (not just a first event:
    a prefill's blocks may arrive in several, and a loaded machine delays them)."""
    deadline = time.monotonic() + timeout
    blocks = len(PREFIX) // 16
    while (
        read_metric(url, "dynamo_gateway_kv_events_total", model="demo") <= 0
        or read_metric(url, "dynamo_gateway_router_indexer_blocks", model="demo") < blocks
    ):
        if time.monotonic() > deadline:
            raise TimeoutError("the shared prefix never reached the router's index")
        time.sleep(0.05)


def _shared_prefix_pair(url: str, *, wait_events: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    first = _complete(url, [*PREFIX, 7, 8, 9])
    if wait_events:
        _wait_for_kv_events(url)
    second = _complete(url, [*PREFIX, 11, 12, 13, 14, 15])
    return first, second


def test_kv_router_sends_a_shared_prefix_to_the_worker_that_caches_it(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    gw = gateway_server("--workers", "2", "--router", "kv", "--speedup", "100")
    first, second = _shared_prefix_pair(gw.url, wait_events=True)
    assert _cached(first) == 0
    assert _cached(second) >= 160, second["usage"]
    # The router's own view, on /metrics: 2 decisions, the second a prefix hit.
    assert read_metric(gw.url, "dynamo_gateway_router_decisions_total", model="demo") == 2
    assert read_metric(gw.url, "dynamo_gateway_router_matched_blocks_total", model="demo") >= 10
    assert 0 < read_metric(gw.url, "dynamo_gateway_router_prefix_hit_rate", model="demo") < 1
    assert read_metric(gw.url, "dynamo_gateway_router_indexer_blocks", model="demo") >= 10


def test_round_robin_sends_the_second_request_elsewhere(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    gw = gateway_server("--workers", "2", "--router", "round_robin", "--speedup", "100")
    first, second = _shared_prefix_pair(gw.url, wait_events=False)
    assert _cached(first) == 0 and _cached(second) == 0, second["usage"]


def test_approximate_mode_without_kv_events(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    gw = gateway_server(
        "--workers", "3", "--router", "kv", "--no-kv-events", "--speedup", "100"
    )  # fmt: skip
    for _ in range(3):  # the routing decision alone keeps the prefix on one worker
        _, second = _shared_prefix_pair(gw.url, wait_events=False)
        assert _cached(second) >= 160, second["usage"]


def test_session_header_keeps_a_conversation_on_one_worker(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    # Overlap weight 0: the cost sees load only, so an idle fleet is a tie broken
    # at random, and only the session header ties a conversation's turns together.
    gw = gateway_server(
        "--workers", "3", "--router", "kv", "--kv-overlap-weight", "0", "--speedup", "100"
    )  # fmt: skip
    for s in range(4):
        turn1 = [1000 + s, *PREFIX]  # no block shared across sessions
        _complete(gw.url, turn1, session=f"s{s}")
        turn2 = _complete(gw.url, [*turn1, 5, 6, 7], session=f"s{s}")
        assert _cached(turn2) >= 160, turn2["usage"]


def test_kv_routing_across_a_distributed_cluster(
    cluster: Callable[[str, str], Cluster], tmp_path: Path
) -> None:
    c = cluster(f"file://{tmp_path}/d", f"zmq://{tmp_path}/e")
    c.worker("--speedup", "100")
    c.worker("--speedup", "100")
    fe = c.frontend("--router", "kv")
    c.wait_workers(fe, 2)
    for _ in range(2):
        _first, second = _shared_prefix_pair(fe.url, wait_events=True)
        assert _cached(second) >= 160, (second["usage"], c.logs())


def test_router_replica_sync_shares_decisions_between_frontends(
    cluster: Callable[[str, str], Cluster], tmp_path: Path
) -> None:
    """Approximate mode (no KV events): frontend B only knows where frontend A sent
    a prefix through replica sync, yet routes the same prefix there."""
    c = cluster(f"file://{tmp_path}/d", f"zmq://{tmp_path}/e")
    for _ in range(3):
        c.worker("--speedup", "100")
    flags = ("--router", "kv", "--no-kv-events", "--router-replica-sync")
    a, b = c.frontend(*flags), c.frontend(*flags)
    c.wait_workers(a, 3)
    c.wait_workers(b, 3)
    time.sleep(0.5)  # ZMQ subscriptions settle (slow joiner)
    for i in range(3):
        prefix = [600 + 7 * i + (j % 300) for j in range(160)]
        first = _complete(a.url, [*prefix, 1, 2, 3])
        assert _cached(first) == 0
        time.sleep(0.5)  # A's RouterSync crosses the event plane to B
        # No retry: a second try would hit B's own approximate record instead.
        second = _complete(b.url, [*prefix, 4, 5, 6, 7])
        assert _cached(second) >= 160, (second["usage"], c.logs())
