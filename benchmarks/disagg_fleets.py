"""Aggregated vs disaggregated fleets of equal size.

Three experiments, each printing a table and writing JSON (and a plot):

``timeline``  long prompts arriving while short requests decode, through the
              real frontend in-process: 2 aggregated workers vs 1 prefill + 1
              decode. Plots the short streams' inter-token latency against
              time with the long arrivals marked: the point of disaggregation
              is that this line stays flat.
``trace``     a Mooncake trace replayed (``bench replay``) on 4 aggregated
              mocker workers vs 2 prefill + 2 decode, always-remote and
              conditional.
``shape``     Dynamo's headline shape (3k tokens in, 150 out, Poisson
              arrivals) at several rates on the same fleets.

    python benchmarks/disagg_fleets.py timeline --out benchmarks/results/disagg_itl_timeline
    python benchmarks/disagg_fleets.py trace ../shared/traces/conversation_trace.jsonl --limit 300
    python benchmarks/disagg_fleets.py shape --rates 6,10,14
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from dynamo_gateway.bench.replay import (
    ReplayConfig,
    ReplayRecord,
    _post_stream,
    default_model_dir,
    run_replay,
)

RESULTS = Path(__file__).parent / "results"

FLEETS: dict[str, dict[str, Any]] = {
    "aggregated": {"workers": 4},
    "disagg_always": {"prefill_workers": 2, "decode_workers": 2, "disagg_min_prefill_tokens": 0},
    "disagg_conditional": {"prefill_workers": 2, "decode_workers": 2},
    "disagg_1p3d": {"prefill_workers": 1, "decode_workers": 3},
}


def _args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "func"}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- timeline -------------------------------------------------------------------------


async def timeline_run(
    fleet: str, *, engine: str, model: Path, args: argparse.Namespace
) -> dict[str, Any]:
    from dynamo_gateway.frontend.app import build_app
    from dynamo_gateway.server import embedded
    from dynamo_gateway.settings import load_settings

    extra: dict[str, Any] = (
        {"workers": 2}
        if fleet == "aggregated"
        else {"prefill_workers": 1, "decode_workers": 1, "disagg": {"min_prefill_tokens": 256}}
    )
    settings = load_settings(
        models=[{"path": model, "name": "m"}],
        engine=engine,
        router="kv",
        log_level="warning",
        max_model_len=args.long_tokens + 2048,
        cache={"block_size": 16, "num_kv_blocks": args.kv_blocks},
        reference={"num_threads": 1},
        frontend={"max_inflight": 4096, "max_body_bytes": 64 << 20},
        **extra,
    )
    vocab = 2000
    rng = random.Random(1)
    encode = msgspec.json.encode
    shorts = [
        ReplayRecord(i, i * 0.02, args.short_tokens, args.short_output) for i in range(args.streams)
    ]
    longs = [
        ReplayRecord(
            1000 + j, args.long_start + j * args.long_every, args.long_tokens, args.long_output
        )
        for j in range(args.longs)
    ]

    def body(record: ReplayRecord) -> bytes:
        prompt = [rng.randrange(10, vocab) for _ in range(record.input_length)]
        return encode(
            {
                "model": "m",
                "prompt": prompt,
                "max_tokens": record.max_tokens,
                "stream": True,
                "ignore_eos": True,
                "temperature": 0,
            }
        )

    async with embedded(settings) as gateway:
        app = build_app(gateway)
        pool = gateway.manager.get("m")
        bodies = {r.index: body(r) for r in [*shorts, *longs]}
        t0 = time.perf_counter() + 0.05

        async def one(record: ReplayRecord) -> None:
            delay = t0 + record.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            record.start = time.perf_counter()
            await _post_stream(app, "/v1/completions", bodies[record.index], record)
            record.end = time.perf_counter()

        await asyncio.gather(*(one(r) for r in [*shorts, *longs]))
        remote, local = pool.remote_prefills, dict(pool.local_prefills)

    gaps: list[tuple[float, float]] = []  # (time since t0, gap ms)
    for r in shorts:
        for a, b in zip(r.times, r.times[1:], strict=False):
            gaps.append((b - t0, (b - a) * 1000.0))
    gaps.sort()
    window = [
        g for t, g in gaps if args.long_start <= t <= args.long_start + args.longs * args.long_every
    ]
    long_ttft = [(r.times[0] - r.start) * 1000.0 for r in longs if r.times]
    return {
        "fleet": fleet,
        "engine": engine,
        "remote_prefills": remote,
        "local_prefills": {str(k): v for k, v in local.items()},
        "itl_ms_p50": pct(window, 0.5),
        "itl_ms_p99": pct(window, 0.99),
        "itl_ms_max": max(window) if window else None,
        "long_ttft_ms_p50": pct(long_ttft, 0.5),
        "long_ttft_ms_max": max(long_ttft) if long_ttft else None,
        "long_arrivals_s": [r.arrival_s + 0.0 for r in longs],
        "gaps": gaps,
        "errors": [r.error for r in [*shorts, *longs] if r.error],
    }


def plot_timeline(runs: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = {"aggregated": "tab:red", "disagg": "tab:blue"}
    for run in runs:
        ts = [t for t, _ in run["gaps"]]
        gs = [g for _, g in run["gaps"]]
        # Rolling p99 over 100 ms buckets.
        buckets: dict[int, list[float]] = {}
        for t, g in zip(ts, gs, strict=True):
            buckets.setdefault(int(t * 10), []).append(g)
        xs = sorted(buckets)
        color = colors["aggregated" if run["fleet"] == "aggregated" else "disagg"]
        label = "2 aggregated" if run["fleet"] == "aggregated" else "1 prefill + 1 decode"
        ax.scatter(ts, gs, s=2, alpha=0.15, color=color)
        ax.plot(
            [x / 10 for x in xs],
            [pct(buckets[x], 0.99) for x in xs],
            color=color,
            label=f"{label}: p99 per 100 ms",
        )
    for t in runs[0]["long_arrivals_s"]:
        ax.axvline(t, color="grey", alpha=0.3, linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("seconds (grey lines: a long prompt arrives)")
    ax.set_ylabel("inter-token latency of the short streams (ms)")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def cmd_timeline(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else default_model_dir()
    runs = []
    for fleet in ("aggregated", "disagg"):
        print(f"timeline: {args.engine} {fleet} ...", file=sys.stderr, flush=True)
        runs.append(asyncio.run(timeline_run(fleet, engine=args.engine, model=model, args=args)))
    print(
        f"{'fleet':<14}{'ITL p50':>10}{'ITL p99':>10}{'ITL max':>10}{'long TTFT p50':>16}  prefill"
    )
    for r in runs:
        print(
            f"{r['fleet']:<14}{r['itl_ms_p50']:>10.1f}{r['itl_ms_p99']:>10.1f}"
            f"{r['itl_ms_max']:>10.1f}{r['long_ttft_ms_p50']:>16.1f}"
            f"  remote={r['remote_prefills']} local={r['local_prefills']}"
        )
        if r["errors"]:
            print(f"  errors: {r['errors'][:3]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = [{k: v for k, v in r.items() if k != "gaps"} for r in runs]
    out.with_suffix(".json").write_text(
        json.dumps({"args": _args(args), "runs": summary}, indent=2)
    )
    plot_timeline(
        runs,
        out.with_suffix(".png"),
        f"{args.engine}: {args.streams} short streams decoding, a {args.long_tokens}-token "
        f"prompt every {args.long_every:g} s",
    )
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


# -- trace replays --------------------------------------------------------------------


def replay(trace: Path, fleet: str, args: argparse.Namespace) -> dict[str, Any]:
    # "Always": no saturation rule either (settings come from the environment too).
    key = "DYNAMO_GATEWAY_DISAGG__MAX_QUEUED_PREFILL_TOKENS"
    if fleet == "disagg_always":
        os.environ[key] = str(1 << 40)
    else:
        os.environ.pop(key, None)
    config = ReplayConfig(
        trace=trace,
        router="kv",
        limit=args.limit,
        speedup=args.speedup,
        arrival_speedup=args.arrival_speedup,
        progress=False,
        **FLEETS[fleet],
    )
    result = asyncio.run(run_replay(config))
    s = result.summary
    return {
        "fleet": fleet,
        "requests": s["requests"],
        "errors": s["errors"],
        "req_per_s": s["req_per_s"],
        "output_tok_per_s": s["output_tok_per_s"],
        "ttft_p50": s["ttft_ms"]["p50"],
        "ttft_p99": s["ttft_ms"]["p99"],
        "tpot_p50": s["tpot_ms"]["p50"],
        "tpot_p99": s["tpot_ms"]["p99"],
        "itl_mean": s["itl_token_mean_ms"],
        "dispatch_lag_p99": s["dispatch_lag_ms"]["p99"],
        "remote": s.get("remote_prefills", 0),
        "local": {str(k): v for k, v in s.get("local_prefills", {}).items()},
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    base = rows[0]
    print(
        f"{'fleet':<20}{'ok':>5}{'tok/s':>9}{'x agg':>7}{'TTFT p50':>10}{'p99':>9}"
        f"{'TPOT p50':>10}{'p99':>8}{'lag p99':>9}  prefill"
    )
    for r in rows:
        ratio = r["output_tok_per_s"] / base["output_tok_per_s"] if base["output_tok_per_s"] else 0
        print(
            f"{r['fleet']:<20}{r['requests']:>5}{r['output_tok_per_s']:>9.0f}{ratio:>7.2f}"
            f"{r['ttft_p50']:>10.0f}{r['ttft_p99']:>9.0f}{r['tpot_p50']:>10.1f}{r['tpot_p99']:>8.1f}"
            f"{r['dispatch_lag_p99']:>9.0f}  remote={r['remote']} local={r['local']}"
        )


def cmd_trace(args: argparse.Namespace) -> int:
    rows = []
    for fleet in args.fleets.split(","):
        print(f"trace: {fleet} ...", file=sys.stderr, flush=True)
        rows.append(replay(Path(args.trace), fleet, args))
    print_table(rows)
    out = Path(args.json) if args.json else RESULTS / f"disagg_trace_{Path(args.trace).stem}.json"
    out.write_text(json.dumps({"args": _args(args), "rows": rows}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def synth_trace(path: Path, rate: float, count: int, isl: int, osl: int, seed: int) -> None:
    rng = random.Random(seed)
    t = 0.0
    next_hash = 0
    with path.open("w") as fh:
        for _ in range(count):
            t += rng.expovariate(rate)
            n = -(-isl // 512)
            ids = list(range(next_hash, next_hash + n))
            next_hash += n
            fh.write(
                json.dumps(
                    {
                        "timestamp": int(t * 1000),
                        "input_length": isl,
                        "output_length": osl,
                        "hash_ids": ids,
                    }
                )
                + "\n"
            )


def cmd_shape(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {"args": _args(args), "rates": {}}
    for rate in [float(r) for r in args.rates.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / f"shape_{rate:g}.jsonl"
            synth_trace(trace, rate, args.count, args.isl, args.osl, seed=3)
            rows = []
            for fleet in args.fleets.split(","):
                print(f"shape {rate:g} req/s: {fleet} ...", file=sys.stderr, flush=True)
                rows.append(replay(trace, fleet, args))
        print(f"\n{args.isl} in / {args.osl} out, {rate:g} req/s Poisson, {args.count} requests")
        print_table(rows)
        out["rates"][str(rate)] = rows
    path = Path(args.json) if args.json else RESULTS / "disagg_shape.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True)
    t = sub.add_parser("timeline")
    t.add_argument("--engine", default="mocker")
    t.add_argument("--model", default=None, help="model dir (default: the demo model)")
    t.add_argument("--streams", type=int, default=16)
    t.add_argument("--short-tokens", type=int, default=64)
    t.add_argument("--short-output", type=int, default=900)
    t.add_argument("--long-tokens", type=int, default=8192)
    t.add_argument("--long-output", type=int, default=4)
    t.add_argument("--longs", type=int, default=10)
    t.add_argument("--long-start", type=float, default=1.0)
    t.add_argument("--long-every", type=float, default=0.5)
    t.add_argument("--kv-blocks", type=int, default=16384)
    t.add_argument("--out", default=str(RESULTS / "disagg_itl_timeline"))
    t.set_defaults(func=cmd_timeline)
    for name, func in (("trace", cmd_trace), ("shape", cmd_shape)):
        q = sub.add_parser(name)
        if name == "trace":
            q.add_argument("trace")
            q.add_argument("--limit", type=int, default=300)
        else:
            q.add_argument("--rates", default="6,10,14")
            q.add_argument("--count", type=int, default=400)
            q.add_argument("--isl", type=int, default=3000)
            q.add_argument("--osl", type=int, default=150)
            q.set_defaults(limit=None)
        q.add_argument("--speedup", type=float, default=2.0)
        q.add_argument("--arrival-speedup", type=float, default=1.0)
        q.add_argument("--fleets", default="aggregated,disagg_always,disagg_conditional")
        q.add_argument("--json", default=None)
        q.set_defaults(func=func)
    args = p.parse_args()
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
