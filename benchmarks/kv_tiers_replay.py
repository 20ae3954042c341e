"""Tier-aware routing at trace scale: a mocker fleet with small device caches and host tiers.

Replays a Mooncake trace (default: the conversation trace) through the
in-process frontend and `kv` router onto ``--workers`` mocker workers whose
device caches hold ``--device-tokens`` each (a fraction of the trace's working
set), three ways, side by side in one run:

* ``no tiers``: evicted blocks are gone;
* ``host, tier-blind``: each worker has a simulated ``--host-gb`` host tier
  (``[mocker] host_tier_gbps``), but the router credits device blocks only
  (``tier_weights = {"GPU": 1}``);
* ``host, tier-aware``: the same tiers, the router's default weights (host 0.75).

Prints hit rate (cached prompt tokens, onboarded ones included, over prompt
tokens) and TTFT, writes JSON::

    python benchmarks/kv_tiers_replay.py --json benchmarks/results/kv_tiers_replay.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dynamo_gateway.bench.replay import ReplayConfig, replay
from dynamo_gateway.kvbm.tiers.sim import SimTier

CONFIGS: dict[str, dict[str, Any]] = {
    "no tiers": {},
    "host, tier-blind": {"tiers": True, "kv_router": {"tier_weights": {"GPU": 1.0}}},
    "host, tier-aware": {"tiers": True},
}


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = CONFIGS[name]
    SimTier.forget_shared()
    config = ReplayConfig(
        trace=args.trace,
        router="kv",
        workers=args.workers,
        limit=args.limit or None,
        speedup=1.0 if args.virtual_clock else args.speedup,
        virtual_clock=args.virtual_clock,
        arrival_speedup=args.arrival_speedup,
        num_kv_blocks=args.device_tokens // 16,
        block_size=16,
        kvbm={"host_cache_gb": args.host_gb} if spec.get("tiers") else {},
        kv_router=spec.get("kv_router", {}),
        progress=False,
    )
    result = replay(config, uvloop=False)
    s = result.summary
    row = {
        "config": name,
        "requests": s["requests"],
        "errors": s["errors"],
        "hit_rate": s.get("cache_hit_rate"),
        "ttft_p50": s["ttft_ms"]["p50"],
        "ttft_p99": s["ttft_ms"]["p99"],
        "ttft_mean": s["ttft_ms"]["mean"],
        "output_tok_per_s": s["output_tok_per_s"],
        "dispatch_lag_p99": s["dispatch_lag_ms"]["p99"],
    }
    print(
        f"  {name:<18} hit {row['hit_rate']:.1%}  TTFT p50 {row['ttft_p50']:.0f} ms  "
        f"p99 {row['ttft_p99']:.0f} ms  dispatch lag p99 {row['dispatch_lag_p99']:.0f} ms  "
        f"errors {row['errors']}",
        flush=True,
    )
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", type=Path, default=Path("../shared/traces/conversation_trace.jsonl"))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--limit", type=int, default=300, help="first K requests (0: all)")
    p.add_argument("--speedup", type=float, default=4.0)
    p.add_argument("--arrival-speedup", type=float, default=1.0)
    p.add_argument("--device-tokens", type=int, default=131072)
    p.add_argument("--host-gb", type=float, default=160.0)
    p.add_argument(
        "--virtual-clock",
        action="store_true",
        help="replay on a simulated clock (no dispatch lag; --speedup unused)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    print(
        f"{args.trace.name}: {args.limit or 'all'} requests on {args.workers} mocker workers, "
        f"{args.device_tokens} device tokens each, host tiers {args.host_gb} GiB",
        flush=True,
    )
    rows = [run(name, args) for name in CONFIGS]
    base = rows[0]
    print(f"\n{'config':<20}{'hit rate':>9}{'TTFT p50':>10}{'p99':>9}{'x p50':>7}{'x p99':>7}")
    for r in rows:
        print(
            f"{r['config']:<20}{r['hit_rate']:>9.1%}{r['ttft_p50']:>10.0f}{r['ttft_p99']:>9.0f}"
            f"{base['ttft_p50'] / r['ttft_p50']:>7.2f}{base['ttft_p99'] / r['ttft_p99']:>7.2f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
