"""KV tiers on a multi-turn workload: TTFT with no tiers, host, host+disk, host+disk+Redis.

Two experiments, one run, printed as tables and written as JSON (and a plot):

* **multi-turn**: ``--sessions`` conversations of ``--turns`` turns on the
  reference engine serving a real model (SmolLM2-135M-Instruct on CPU), the
  sessions interleaved turn by turn so that the device cache (``--device-share``
  of the working set) has evicted a session's history by the time it speaks
  again. Each turn re-sends the whole history (a system prompt, every earlier
  question and greedy answer) plus a new ~``--turn-tokens`` question and asks for
  ``--output-tokens``. Requests go one at a time, so TTFT is the engine's own
  prefill (or onboarding) time. Configurations, each on a fresh engine: device
  only; + host (large); + a small host and a large disk; + a small host, a
  small disk and Redis. Greedy outputs must be identical across them.
* **bandwidth**: onboarding ``--mib`` of blocks from each tier into a KV cache
  (lookup, read, checksum, copy), beside a plain numpy copy of the same bytes,
  a plain read of the same bytes from files, and plain Redis GETs of them.

    python benchmarks/kv_tiers.py --model models/smollm2-135m-instruct \\
        --json benchmarks/results/kv_tiers.json

Starts its own redis-server on 127.0.0.1 (Debian's redis-server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynamo_gateway.disagg.layout import KvLayout
from dynamo_gateway.engines.base import EngineContext
from dynamo_gateway.engines.reference.config import ModelConfig
from dynamo_gateway.engines.reference.engine import ReferenceEngine
from dynamo_gateway.engines.reference.kv_cache import PagedKVCache
from dynamo_gateway.kvbm.build import build_tiered_cache
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.protocol.engine import EngineRequest, SamplingParams
from dynamo_gateway.servers.redis import RedisServer
from dynamo_gateway.settings import load_settings

GIB = 1 << 30
BLOCK = 16


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else 0.0


# -- multi-turn --------------------------------------------------------------------------


def sessions(args: argparse.Namespace, vocab: int) -> list[list[list[int]]]:
    """Per session, the new tokens of each turn (the first one holds a system prompt)."""
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.sessions):
        turns = []
        for t in range(args.turns):
            n = args.turn_tokens + (args.system_tokens if t == 0 else 0)
            turns.append([rng.randrange(100, vocab - 100) for _ in range(n)])
        out.append(turns)
    return out


async def run_config(
    name: str,
    kvbm: dict[str, Any],
    card: ModelCard,
    plan: list[list[list[int]]],
    args: argparse.Namespace,
    device_blocks: int,
) -> dict[str, Any]:
    settings = load_settings(
        None,
        reference={"device": "cpu", "num_threads": args.threads},
        cache={"num_kv_blocks": device_blocks, "block_size": BLOCK},
        kvbm=kvbm,
    )
    engine = ReferenceEngine(EngineContext(settings=settings, model=card, worker_id=name))
    await engine.start()
    histories: list[list[int]] = [[] for _ in plan]
    ttft: list[float] = []
    per_turn: dict[int, list[float]] = {}
    cached: list[int] = []
    outputs: list[list[int]] = []
    later_prompt_tokens = 0
    t_run = time.perf_counter()
    try:
        for turn in range(args.turns):
            for s, session in enumerate(plan):
                prompt = histories[s] + session[turn]
                request = EngineRequest(
                    request_id=f"{name}-{s}-{turn}",
                    prompt_token_ids=prompt,
                    sampling=SamplingParams(
                        max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True
                    ),
                )
                t0 = time.perf_counter()
                first: float | None = None
                tokens: list[int] = []
                hit = 0
                async for out in engine.generate(request):
                    if first is None:
                        first = time.perf_counter() - t0
                        hit = out.cached_tokens or 0
                    tokens.extend(out.token_ids)
                assert first is not None
                if turn:  # the first turn is cold everywhere
                    ttft.append(first)
                    cached.append(hit)
                    later_prompt_tokens += len(prompt)
                per_turn.setdefault(turn, []).append(first)
                outputs.append(tokens)
                histories[s] = prompt + tokens
            print(
                f"  {name:<16} turn {turn + 1}/{args.turns}: TTFT mean "
                f"{statistics.mean(per_turn[turn]) * 1000:7.0f} ms",
                flush=True,
            )
        tiers = engine.kv_tiers
        stats: dict[str, Any] = {}
        if tiers is not None:
            tiers.flush()
            stats = {
                t.name: {
                    "onboarded_blocks": tiers.stats[t.name].onboarded_blocks,
                    "offloaded_blocks": tiers.stats[t.name].offloaded_blocks,
                    "capacity_blocks": t.capacity_blocks,
                    "hit_rate": tiers.stats[t.name].hit_rate,
                    "dropped_writes": tiers.stats[t.name].dropped_writes,
                    "errors": tiers.stats[t.name].errors,
                    "rejected_blocks": tiers.stats[t.name].rejected_blocks,
                }
                for t in tiers.tiers
            }
    finally:
        await engine.aclose()
    return {
        "name": name,
        "kvbm": {k: str(v) for k, v in kvbm.items()},
        "ttft_ms": {
            "mean": statistics.mean(ttft) * 1000,
            "p50": percentile(ttft, 0.5) * 1000,
            "p99": percentile(ttft, 0.99) * 1000,
        },
        "ttft_by_turn_ms": {t + 1: statistics.mean(v) * 1000 for t, v in per_turn.items()},
        "cached_token_share": sum(cached) / max(later_prompt_tokens, 1),
        "cached_tokens": sum(cached),
        "wall_s": time.perf_counter() - t_run,
        "tiers": stats,
        "outputs": outputs,
    }


# -- bandwidth ---------------------------------------------------------------------------


def bandwidth(args: argparse.Namespace, card: ModelCard, redis_url: str, tmp: Path) -> list[Any]:
    import redis

    cfg = ModelConfig.from_dir(card.path)
    layout = KvLayout(
        num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        block_size=BLOCK,
        dtype="float32",
    )
    n = max(1, args.mib * (1 << 20) // layout.block_bytes)
    cache = PagedKVCache.for_model(
        cfg, num_blocks=n, block_size=BLOCK, dtype=torch.float32, device=torch.device("cpu")
    )
    host = cache.host_bytes()
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 256, layout.block_bytes, dtype=np.uint8) for _ in range(n)]
    nbytes = n * layout.block_bytes
    rows = []
    registry = load_plugins().registry
    for tier_name, kvbm in (
        ("host", {"host_cache_gb": nbytes * 2 / GIB}),
        ("disk", {"disk_cache_dir": str(tmp / "bw-disk"), "disk_cache_gb": nbytes * 2 / GIB}),
        ("redis", {"remote_url": redis_url}),
    ):
        settings = load_settings(None, kvbm=kvbm)
        tiers = build_tiered_cache(settings, registry, worker_id="bw", model="bw", layout=layout)
        assert tiers is not None
        tier = tiers.tier(tier_name)
        for h, p in enumerate(payloads):
            tier.put(h + 1, memoryview(p.data))
        hashes = list(range(1, n + 1))

        def write(i: int, payload: memoryview) -> None:
            host[:, i, :] = np.frombuffer(payload, np.uint8).reshape(host.shape[0], -1)

        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            plan = tiers.lookup(hashes, 0)
            assert plan is not None and plan.end == n
            assert tiers.onboard(plan, 0, n, write) == n
            times.append(time.perf_counter() - t0)
        tiers.close()
        # The baseline for the same bytes.
        base = []
        if tier_name == "host":
            for _ in range(args.reps):
                t0 = time.perf_counter()
                for i, p in enumerate(payloads):
                    host[:, i, :] = p.reshape(host.shape[0], -1)
                base.append(time.perf_counter() - t0)
            baseline = "numpy copy into the cache"
        elif tier_name == "disk":
            files = []
            for i, p in enumerate(payloads):
                path = tmp / f"plain-{i}.bin"
                path.write_bytes(p.tobytes())
                files.append(path)
            for _ in range(args.reps):
                t0 = time.perf_counter()
                for i, path in enumerate(files):
                    data = path.read_bytes()
                    host[:, i, :] = np.frombuffer(data, np.uint8).reshape(host.shape[0], -1)
                base.append(time.perf_counter() - t0)
            baseline = "read_bytes of plain files + copy"
        else:
            client = redis.Redis.from_url(redis_url)
            for i, p in enumerate(payloads):
                client.set(f"plain:{i}", p.tobytes())
            for _ in range(args.reps):
                t0 = time.perf_counter()
                for i in range(n):
                    value = client.get(f"plain:{i}")
                    assert isinstance(value, bytes)
                    host[:, i, :] = np.frombuffer(value, np.uint8).reshape(host.shape[0], -1)
                base.append(time.perf_counter() - t0)
            client.close()
            baseline = "plain Redis GETs + copy"
        tier_s = statistics.median(times)
        base_s = statistics.median(base)
        rows.append(
            {
                "tier": tier_name,
                "mib": nbytes / (1 << 20),
                "blocks": n,
                "onboard_gb_s": nbytes / tier_s / 1e9,
                "baseline": baseline,
                "baseline_gb_s": nbytes / base_s / 1e9,
                "ratio": base_s / tier_s,
            }
        )
    return rows


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["name"] for r in results]
    p50 = [r["ttft_ms"]["p50"] for r in results]
    p99 = [r["ttft_ms"]["p99"] for r in results]
    x = np.arange(len(names))
    ax1.bar(x - 0.2, p50, 0.4, label="p50")
    ax1.bar(x + 0.2, p99, 0.4, label="p99")
    ax1.set_xticks(x, names, rotation=15)
    ax1.set_ylabel("TTFT, ms (turns 2+)")
    ax1.set_title("Multi-turn TTFT by KV tiers")
    ax1.legend()
    for r in results:
        turns = sorted(r["ttft_by_turn_ms"], key=int)
        ax2.plot(
            [int(t) for t in turns], [r["ttft_by_turn_ms"][t] for t in turns], "o-", label=r["name"]
        )
    ax2.set_xlabel("turn")
    ax2.set_ylabel("mean TTFT, ms")
    ax2.set_title("TTFT as the history grows")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    card = ModelCard.load(args.model)
    plan = sessions(args, card.vocab_size)
    # Working set: every session's final history, in blocks.
    per_session = args.system_tokens + args.turns * (args.turn_tokens + args.output_tokens)
    working = args.sessions * -(-per_session // BLOCK)
    device_blocks = max(int(working * args.device_share), 2 * -(-per_session // BLOCK))
    cfg = ModelConfig.from_dir(card.path)
    block_bytes = cfg.num_layers * 2 * BLOCK * cfg.num_kv_heads * cfg.head_dim * 4  # fp32
    big = working * block_bytes * 2 / GIB
    small = working * block_bytes * args.small_share / GIB
    print(
        f"{args.sessions} sessions x {args.turns} turns, working set {working} blocks "
        f"({working * block_bytes / (1 << 20):.0f} MiB), device {device_blocks} blocks, "
        f"small tiers {small * 1024:.0f} MiB",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="dgw-kv-tiers-") as tmp_name:
        tmp = Path(tmp_name)
        with RedisServer(tmp / "redis") as server:
            configs: list[tuple[str, dict[str, Any]]] = [
                ("device only", {}),
                ("host", {"host_cache_gb": big}),
                (
                    "host+disk",
                    {
                        "host_cache_gb": small,
                        "disk_cache_dir": str(tmp / "disk1"),
                        "disk_cache_gb": big,
                    },
                ),
                (
                    "host+disk+redis",
                    {
                        "host_cache_gb": small,
                        "disk_cache_dir": str(tmp / "disk2"),
                        "disk_cache_gb": small,
                        "remote_url": server.url,
                    },
                ),
            ]
            results = []
            for name, kvbm in configs:
                if args.only and name not in args.only:
                    continue
                print(f"{name}:", flush=True)
                results.append(await run_config(name, kvbm, card, plan, args, device_blocks))
            bw = bandwidth(args, card, server.url, tmp)
    same = all(r["outputs"] == results[0]["outputs"] for r in results)
    base = results[0]["ttft_ms"]
    print(f"\n{'config':<18}{'TTFT p50':>10}{'p99':>10}{'x p50':>8}{'x p99':>8}{'cached':>9}")
    for r in results:
        t = r["ttft_ms"]
        print(
            f"{r['name']:<18}{t['p50']:>10.0f}{t['p99']:>10.0f}{base['p50'] / t['p50']:>8.2f}"
            f"{base['p99'] / t['p99']:>8.2f}{r['cached_token_share']:>9.0%}"
        )
    print(f"greedy outputs identical across configurations: {same}")
    print(f"\n{'tier':<8}{'MiB':>6}{'onboard GB/s':>14}{'baseline GB/s':>15}  baseline")
    for row in bw:
        print(
            f"{row['tier']:<8}{row['mib']:>6.0f}{row['onboard_gb_s']:>14.2f}"
            f"{row['baseline_gb_s']:>15.2f}  {row['baseline']}"
        )
    for r in results:
        r.pop("outputs")
    return {
        "config": {k: str(v) for k, v in vars(args).items()},
        "device_blocks": device_blocks,
        "working_set_blocks": working,
        "outputs_identical": same,
        "multi_turn": results,
        "bandwidth": bw,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--system-tokens", type=int, default=256)
    p.add_argument("--turn-tokens", type=int, default=96)
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--device-share", type=float, default=0.25)
    p.add_argument("--small-share", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", action="append", help="run only this configuration (repeatable)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    report = asyncio.run(main_async(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        plot(report["multi_turn"], args.json.with_suffix(".png"))
        print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0 if report["outputs_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
