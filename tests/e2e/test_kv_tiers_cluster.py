"""KV tiers across processes: reference workers with host tiers and one shared Redis,
behind a frontend with the kv router; the conversation is compared, text for text,
with a worker of the same model that has no tiers (served under another name)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
from test_disagg_cluster import worker_metric

from dynamo_gateway.servers.redis import RedisServer
from dynamo_gateway.testing import Cluster, ClusterProcess

MakeCluster = Callable[[str, str], Cluster]
ENGINE = ("--block-size", "4", "--num-kv-blocks", "96", "--device", "cpu")


def complete(url: str, model: str, prompt: str) -> tuple[str, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    details = data["usage"].get("prompt_tokens_details") or {}
    return data["choices"][0]["text"], int(details.get("cached_tokens") or 0)


def onboarded(workers: list[ClusterProcess], tier: str) -> float:
    name = "dynamo_gateway_worker_kv_tier_blocks_total"
    return sum(worker_metric(w, name, tier=tier, direction="onboarded") for w in workers)


def test_a_conversation_keeps_its_cache_through_host_and_redis(
    cluster: MakeCluster, tmp_path: Path, redis_server: RedisServer
) -> None:
    c = cluster(f"file://{tmp_path}/d", f"zmq://{tmp_path}/e")
    tiers = ("--kv-host-cache-gb", "0.005", "--kv-remote-url", redis_server.url)
    workers = [c.worker(*ENGINE, *tiers, engine="reference") for _ in range(2)]
    c.worker(*ENGINE, "--served-model-name", "demo-cold", engine="reference")
    front = c.frontend("--router", "kv")
    c.wait_workers(front, 2)
    c.wait_workers(front, 1, model="demo-cold")

    history = " ".join(f"fact {i}: the {i}th moon of planet {i % 7} is blue." for i in range(12))
    flood = [" ".join(f"noise {j} {i} again" for i in range(18)) for j in range(6)]
    cached: list[int] = []
    for turn in range(3):
        if turn == 2:
            redis_server.kill()  # the shared tier goes away: nothing may fail
        text, hit = complete(front.url, "demo", history)
        cold, _ = complete(front.url, "demo-cold", history)
        assert text == cold, f"turn {turn}: tiers changed the output"
        cached.append(hit)
        history += text + f" Question {turn}: and then?"
        for prompt in flood:  # push the conversation out of both device caches
            complete(front.url, "demo", prompt)
            complete(front.url, "demo-cold", prompt)
    assert cached[0] == 0
    assert cached[1] > 0 and cached[2] > 0, cached  # onboarded, not recomputed
    assert onboarded(workers, "host") + onboarded(workers, "redis") > 0
    errors = "dynamo_gateway_worker_kv_tier_problems_total"
    assert sum(worker_metric(w, errors, tier="redis", kind="error") for w in workers) > 0
