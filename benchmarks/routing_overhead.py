"""Routing overhead per request of the `kv` router for long prompts.

Builds a `KvRouter` over N workers whose index already holds a realistic mix of
cached prefixes (a shared system prompt, then per-conversation histories), then
times the whole per-request router work the pool does - ``select()`` (hashing,
index match, cost, choice) plus ``on_routed()`` / ``on_first_token()`` /
``on_finished()`` - for prompts of a given length that share a cached prefix.
Prints p50/p99 per phase and writes JSON.

    python benchmarks/routing_overhead.py                       # 32k tokens, 8 and 64 workers
    python benchmarks/routing_overhead.py --tokens 131072 --workers 64
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dynamo_gateway.kv.hashing import sequence_hashes  # noqa: E402
from dynamo_gateway.protocol.engine import LoadMetrics  # noqa: E402
from dynamo_gateway.protocol.kv_events import BlockStored, KvEvent  # noqa: E402
from dynamo_gateway.router.base import RouteRequest, WorkerView  # noqa: E402
from dynamo_gateway.router.kv import KvRouter  # noqa: E402

DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "routing_overhead.json"


def log(msg: str) -> None:
    print(f"[routing_overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def populate(
    router: KvRouter, workers: list[str], system: list[int], histories: int, rng: random.Random
) -> list[list[int]]:
    """Every worker caches the system prompt; `histories` conversations of 2-16k
    tokens are cached on one or two workers each. Returns the conversations."""
    bs = router.block_size
    conversations: list[list[int]] = []
    event_ids = dict.fromkeys(workers, 0)

    def store(worker: str, tokens: list[int]) -> None:
        event_ids[worker] += 1
        n = len(tokens) // bs * bs
        data = BlockStored(
            block_hashes=sequence_hashes(tokens[:n], bs),
            parent_block_hash=None,
            token_ids=tokens[:n],
            block_size=bs,
        )
        router.on_kv_event(KvEvent(worker_id=worker, event_id=event_ids[worker], data=data))

    for w in workers:
        store(w, system)
    for _ in range(histories):
        conv = system + [rng.randrange(1, 150_000) for _ in range(rng.randrange(2048, 16384))]
        conversations.append(conv)
        for w in rng.sample(workers, rng.choice((1, 2))):
            store(w, conv)
    return conversations


def run(num_workers: int, tokens: int, requests: int, block_size: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    router = KvRouter(block_size)
    names = [f"w{i}" for i in range(num_workers)]
    views = [
        WorkerView(n, block_size=block_size, load=LoadMetrics(kv_blocks_total=100_000))
        for n in names
    ]
    system = [rng.randrange(1, 150_000) for _ in range(2000)]
    log(f"{num_workers} workers: populating the index")
    conversations = populate(router, names, system, histories=8 * num_workers, rng=rng)
    st = router.stats()
    log(f"index: {st.indexer_blocks:,} blocks, {st.indexer_entries:,} entries")
    select_s: list[float] = []
    lifecycle_s: list[float] = []
    for i in range(requests):
        base = rng.choice(conversations)
        extra = [rng.randrange(1, 150_000) for _ in range(max(tokens - len(base), 0))]
        prompt = (base + extra)[:tokens]
        req = RouteRequest(f"r{i}", prompt)
        t0 = time.perf_counter()
        chosen = router.select(req, views)
        t1 = time.perf_counter()
        router.on_routed(req, chosen)
        router.on_first_token(req.request_id)
        router.on_finished(req.request_id)
        t2 = time.perf_counter()
        select_s.append(t1 - t0)
        lifecycle_s.append(t2 - t1)
    st = router.stats()
    total = [a + b for a, b in zip(select_s, lifecycle_s, strict=True)]
    return {
        "workers": num_workers,
        "prompt_tokens": tokens,
        "requests": requests,
        "indexer_blocks": st.indexer_blocks,
        "indexer_entries": st.indexer_entries,
        "indexer_bytes": st.indexer_bytes,
        "hit_rate": st.hit_rate,
        "total_ms": {"p50": percentile(total, 0.5) * 1e3, "p99": percentile(total, 0.99) * 1e3},
        "select_ms": {
            "p50": percentile(select_s, 0.5) * 1e3,
            "p99": percentile(select_s, 0.99) * 1e3,
        },
        "lifecycle_ms": {
            "p50": percentile(lifecycle_s, 0.5) * 1e3,
            "p99": percentile(lifecycle_s, 0.99) * 1e3,
        },
        "phase_mean_ms": {
            "hashing": st.hashing_s / st.decisions * 1e3,
            "matching": st.matching_s / st.decisions * 1e3,
            "selection": st.selection_s / st.decisions * 1e3,
        },
        "mean_total_ms": statistics.fmean(total) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    results = [run(n, args.tokens, args.requests, args.block_size, args.seed) for n in args.workers]
    print(
        "| workers | prompt tokens | index blocks | total p50 ms | total p99 ms "
        "| select p50 ms | hashing ms | matching ms | selection ms | lifecycle p50 ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ph = r["phase_mean_ms"]
        print(
            f"| {r['workers']} | {r['prompt_tokens']:,} | {r['indexer_blocks']:,} "
            f"| {r['total_ms']['p50']:.2f} | {r['total_ms']['p99']:.2f} "
            f"| {r['select_ms']['p50']:.2f} | {ph['hashing']:.2f} | {ph['matching']:.2f} "
            f"| {ph['selection']:.2f} | {r['lifecycle_ms']['p50']:.2f} |"
        )
    out = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
