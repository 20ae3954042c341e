"""Trace replay, side by side: NVIDIA Dynamo's mocker replay vs ours, per router.

Runs on the same trace slice and worker count:

* Dynamo 1.6.1's offline replay (``dynamo.replay.run_trace_replay``, a simulated clock)
  with ``kv_router`` and ``round_robin``, in a separate virtualenv through a
  subprocess (``--dynamo-python``; skipped with a message when it is missing);
* ours (``dynamo-gateway bench replay``: the real frontend, router and mocker engines on a
  wall clock, ``--speedup`` times faster) with round_robin, random, least_loaded and kv
  (kv only when a router of that name is registered).

Prints one table (TTFT p50/p99/mean, ITL, throughput, cache hit rate, wall time per run)
with the slice's hit-rate ceiling (:func:`cache_hit_ceiling`), writes
``benchmarks/results/replay_<trace>.json`` and a TTFT-CDF plot next to it::

    python benchmarks/replay_compare.py ../shared/traces/conversation_trace.jsonl \\
        --workers 8 --limit 1000 --speedup 10

Dynamo's venv: ``python3.11 -m venv /tmp/dynamo-venv && /tmp/dynamo-venv/bin/pip install
--no-deps ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1 typing_extensions``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dynamo_gateway.bench.replay import ReplayConfig, plot_ttft_cdfs, run_replay

RESULTS = Path(__file__).resolve().parent / "results"
OUR_ROUTERS = ("round_robin", "random", "least_loaded", "kv")
DYNAMO_ROUTERS = ("kv_router", "round_robin")

# Runs inside Dynamo's venv: argv = trace, router, workers, block size, arrival speedup.
_DYNAMO_SCRIPT = """
import json, sys
from dynamo.replay import run_trace_replay
trace, router, workers, block, speedup = sys.argv[1:6]
r = run_trace_replay(trace, router_mode=router, num_workers=int(workers),
                     trace_block_size=int(block), arrival_speedup_ratio=float(speedup),
                     capture_per_request=True)
ttft = [p["ttft_ms"] for p in (r.per_request or []) if p.get("ttft_ms") is not None]
json.dump({"summary": r.summary, "ttft_ms": ttft}, sys.stdout)
"""


def _run_dynamo(python: str, trace: Path, router: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [python, "-c", _DYNAMO_SCRIPT, str(trace), router, str(args.workers)]
    argv += [str(args.trace_block_size), str(args.arrival_speedup)]
    t0 = time.perf_counter()
    env = {**os.environ, "RUST_LOG": "warn", "DYN_LOG": "warn"}  # its router logs every pick
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-2000:])
    out = json.loads(proc.stdout)
    s = out["summary"]
    return {
        "label": f"dynamo {router}",
        "system": "dynamo-1.6.1",
        "router": router,
        "requests": s["completed_requests"] if "completed_requests" in s else s.get("num_requests"),
        "ttft_ms": {
            "mean": s["mean_ttft_ms"],
            "p50": s["median_ttft_ms"],
            "p90": s["p90_ttft_ms"],
            "p99": s["p99_ttft_ms"],
        },
        "itl_token_mean_ms": s["mean_itl_ms"],
        "itl_p50_ms": s["median_itl_ms"],
        "itl_p99_ms": s["p99_itl_ms"],
        "e2e_mean_ms": s["mean_e2e_latency_ms"],
        "req_per_s": s["request_throughput_rps"],
        "output_tok_per_s": s["output_throughput_tok_s"],
        "cache_hit_rate": s["prefix_cache_reused_ratio"],
        "run_s": time.perf_counter() - t0,
        "per_request_ttft_ms": out["ttft_ms"],
        "raw_summary": {k: v for k, v in s.items() if isinstance(v, (int, float, str))},
    }


def _run_ours(trace: Path, router: str, args: argparse.Namespace) -> dict[str, Any]:
    config = ReplayConfig(
        trace=trace,
        workers=args.workers,
        router=router,
        arrival_speedup=args.arrival_speedup,
        speedup=args.speedup,
        trace_block_size=args.trace_block_size,
        limit=args.limit,
        timing=args.timing,
        progress=not args.quiet,
        progress_interval_s=15.0,
    )
    t0 = time.perf_counter()
    result = asyncio.run(run_replay(config))
    s = result.summary
    return {
        "label": f"ours {router}{' ' + args.label if args.label else ''}",
        "system": "dynamo-gateway",
        "router": router,
        "requests": s["requests"],
        "errors": s["errors"],
        "ttft_ms": s["ttft_ms"],
        "itl_token_mean_ms": s["itl_token_mean_ms"],
        "itl_p50_ms": s["itl_ms"]["p50"],
        "itl_p99_ms": s["itl_ms"]["p99"],
        "e2e_mean_ms": s["e2e_ms"]["mean"],
        "req_per_s": s["req_per_s"],
        "output_tok_per_s": s["output_tok_per_s"],
        "cache_hit_rate": s["cache_hit_rate"],
        "dispatch_lag_p99_ms": s["dispatch_lag_ms"]["p99"],
        "run_s": time.perf_counter() - t0,
        "per_request_ttft_ms": [p["ttft_ms"] for p in result.per_request if p["ttft_ms"]],
    }


def cache_hit_ceiling(trace: Path, block_size: int = 512, limit: int | None = None) -> float:
    """The hit rate of one infinite prefix cache on the first ``limit`` requests of ``trace``.

    Token-weighted, prefix semantics: a request reuses the leading run of its hash blocks
    seen before (by any earlier request); every block holds ``block_size`` tokens but the
    last, which holds what is left of ``input_length``. A block seen before only as a
    shorter partial last block is reused up to that length and ends the run. Returns
    reused tokens / prompt tokens (0.374 on the whole conversation trace, 0.651 on the
    synthetic one, as Dynamo's docs report).
    """
    longest: dict[int, int] = {}  # hash id -> most tokens of it any request held
    reused = total = 0
    with trace.open() as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            if not line.strip():
                continue
            req = json.loads(line)
            ids: list[int] = req["hash_ids"]
            length = int(req["input_length"])
            total += length
            sizes = [block_size] * len(ids)
            if ids:
                sizes[-1] = max(0, length - block_size * (len(ids) - 1))
            for h, n in zip(ids, sizes, strict=True):
                have = longest.get(h, 0)
                reused += min(have, n)
                if have < n:
                    break
            for h, n in zip(ids, sizes, strict=True):
                if n > longest.get(h, 0):
                    longest[h] = n
    return reused / total if total else 0.0


def _registered_routers() -> set[str]:
    from dynamo_gateway.plugins import load_plugins

    return set(load_plugins().registry.routers.names())


def _f(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def format_table(rows: list[dict[str, Any]], ceiling: float | None = None) -> str:
    head = (
        f"{'run':<24}{'TTFT p50':>10}{'p99':>10}{'mean':>10}{'ITL mean':>10}"
        f"{'req/s':>8}{'out tok/s':>11}{'hit rate':>10}{'ceiling':>9}{'wall s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        t = r["ttft_ms"]
        lines.append(
            f"{r['label']:<24}{_f(t['p50']):>10}{_f(t['p99']):>10}{_f(t['mean']):>10}"
            f"{_f(r['itl_token_mean_ms'], 2):>10}{_f(r['req_per_s'], 2):>8}"
            f"{_f(r['output_tok_per_s'], 0):>11}{_f(r['cache_hit_rate'], 3):>10}"
            f"{_f(ceiling, 3):>9}{_f(r.get('run_s'), 0):>8}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--speedup", type=float, default=10.0, help="ours: wall-clock speedup")
    parser.add_argument("--arrival-speedup", type=float, default=1.0)
    parser.add_argument("--trace-block-size", type=int, default=512)
    parser.add_argument("--routers", default=",".join(OUR_ROUTERS), help="ours, comma-separated")
    parser.add_argument("--dynamo-python", default="/tmp/dynamo-venv/bin/python")
    parser.add_argument("--no-dynamo", action="store_true")
    parser.add_argument("--tag", default="", help="suffix for the result file names")
    parser.add_argument("--label", default="", help="suffix for our runs' labels (a variant)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--timing", choices=("dynamo", "settings"), default="dynamo", help="ours: mocker timing"
    )
    args = parser.parse_args()

    name = args.trace.stem.removesuffix("_trace")
    stem = f"replay_{name}{'_' + args.tag if args.tag else ''}"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        # The same slice for both systems: the first `limit` lines.
        sliced = Path(tmp) / args.trace.name
        with args.trace.open() as src, sliced.open("w") as dst:
            for i, line in enumerate(src):
                if i >= args.limit:
                    break
                dst.write(line)
        if args.no_dynamo:
            pass
        elif not Path(args.dynamo_python).exists():
            print(f"skipping Dynamo: no interpreter at {args.dynamo_python}", file=sys.stderr)
        else:
            for router in DYNAMO_ROUTERS:
                try:
                    rows.append(_run_dynamo(args.dynamo_python, sliced, router, args))
                except Exception as exc:  # a broken venv skips Dynamo, not the comparison
                    print(f"skipping Dynamo {router}: {exc}", file=sys.stderr)
                    break
        registered = _registered_routers()
        for router in args.routers.split(","):
            if router not in registered:
                print(f"skipping ours {router}: not registered", file=sys.stderr)
                continue
            print(f"ours {router} ...", file=sys.stderr, flush=True)
            rows.append(_run_ours(sliced, router, args))

    ceiling = cache_hit_ceiling(args.trace, args.trace_block_size, args.limit)
    table = format_table(rows, ceiling)
    print(
        f"\n{args.trace.name}: first {args.limit} requests, {args.workers} workers, "
        f"arrival speedup {args.arrival_speedup:g}, ours at speedup {args.speedup:g}, "
        f"timing {args.timing}\n"
    )
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "trace": args.trace.name,
        "limit": args.limit,
        "workers": args.workers,
        "speedup": args.speedup,
        "arrival_speedup": args.arrival_speedup,
        "timing": args.timing,
        "cache_hit_ceiling": ceiling,
        "env": {k: v for k, v in os.environ.items() if k.startswith("DYNAMO_GATEWAY_")},
        "command": " ".join(sys.argv),
        "table": table,
        "runs": rows,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    try:
        plot_ttft_cdfs(
            [(r["label"], r["per_request_ttft_ms"]) for r in rows],
            RESULTS / f"{stem}.png",
            f"{args.trace.name}: {args.limit} requests, {args.workers} workers",
        )
    except RuntimeError as exc:
        print(f"no plot: {exc}", file=sys.stderr)
    print(f"\nwrote {RESULTS / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
