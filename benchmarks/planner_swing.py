"""The planner against a fixed fleet sized for the peak, on a trace with a daily swing.

The Mooncake conversation trace's arrivals are re-timed so that its request rate
follows a day squeezed into the trace's hour: ``rate(t) ∝ floor + (1 - floor) *
((1 - cos(2πt/D)) / 2) ** 2`` (quiet "night" at both ends, one "afternoon" peak;
the mean rate is about 44% of the peak), keeping every request and their order.
Then, side by side in one run, on mocker fleets (Dynamo 1.6.1's timing) on a
virtual clock (`bench replay --virtual-clock`):

* ``fixed N``: N aggregated workers all the time, N the smallest fleet (of those
  tried) whose SLA attainment holds at the peak;
* ``planner (load)`` / ``planner (sla)``: the fleet starts with one worker and the
  planner scales it (each new worker takes ``--worker-startup`` seconds to start).

Prints worker-seconds and SLA attainment (share of requests with TTFT and mean ITL
within the targets), writes JSON and draws load and worker count over time::

    python benchmarks/planner_swing.py --json benchmarks/results/planner_swing.json \\
        --plot benchmarks/results/planner_swing.png
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dynamo_gateway.bench.replay import ReplayConfig, default_model_dir, replay

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "conversation_trace.jsonl"


def swing_rate(x: float, floor: float) -> float:
    """Relative request rate at `x` in [0, 1] of the day (peak 1 at x = 0.5)."""
    return floor + (1 - floor) * ((1 - math.cos(2 * math.pi * x)) / 2) ** 2


def retime(rows: list[dict[str, Any]], floor: float, steps: int = 10_000) -> list[dict[str, Any]]:
    """Move each request to the time where the swing's cumulative rate reaches the
    share of requests before it in the original trace (order kept, duration kept)."""
    t0 = rows[0]["timestamp"]
    duration = rows[-1]["timestamp"] - t0
    cumulative = [0.0]
    for i in range(steps):
        cumulative.append(cumulative[-1] + swing_rate((i + 0.5) / steps, floor))
    total = cumulative[-1]
    out = []
    for k, row in enumerate(rows):
        share = k / max(1, len(rows) - 1) * total
        i = min(max(bisect.bisect_left(cumulative, share), 1), steps)
        lo, hi = cumulative[i - 1], cumulative[i]
        x = (i - 1 + ((share - lo) / (hi - lo) if hi > lo else 0.0)) / steps
        out.append({**row, "timestamp": int(x * duration)})
    return out


def planner_toml(
    policy: str, target_requests: float, args: argparse.Namespace, profile: Path | None
) -> str:
    lines = [
        f"interval_s = {args.interval}",
        f"cooldown_s = {args.cooldown}",
        f'policy = "{policy}"',
        "[load]",
        f"target_requests = {target_requests}",
        "up_intervals = 1",
        "down_intervals = 3",
        "max_step = 3",
        "[sla]",
        'predictor = "holt"',
        "[[models]]",
        f"ttft_ms = {args.ttft_ms}",
        f"itl_ms = {args.itl_ms}",
        f"pools = {{ aggregated = {{ min = 1, max = {args.max_workers} }} }}",
    ]
    if profile is not None:
        lines.append(f'profile = "{profile}"')
    return "\n".join(lines) + "\n"


def run(label: str, trace: Path, args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    config = ReplayConfig(
        trace=trace, router="kv", virtual_clock=True, arrival_speedup=args.arrival_speedup,
        limit=args.limit, ttft_target_ms=args.ttft_ms, itl_target_ms=args.itl_ms,
        sample_interval_s=args.sample_interval, worker_startup_s=args.worker_startup,
        block_size=16, progress=args.progress, **kw,
    )  # fmt: skip
    started = time.perf_counter()
    result = replay(config, uvloop=False)
    s = result.summary
    row: dict[str, Any] = {
        "label": label,
        "requests": s["requests"],
        "errors": s["errors"],
        "duration_s": s["duration_s"],
        "worker_seconds": s["worker_seconds"],
        "sla": s["sla"],
        "hit_rate": s["cache_hit_rate"],
        "ttft_ms": s["ttft_ms"],
        "tpot_ms": s["tpot_ms"],
        "real_s": time.perf_counter() - started,
        "arrivals_s": [round(p["arrival_ms"] / 1000, 3) for p in result.per_request],
    }
    if "planner" in s:
        row["max_workers"] = s["planner"]["max_workers"]
        row["timeline"] = s["planner"]["timeline"]
        row["decisions"] = len(s["planner"]["decisions"])
    else:
        row["max_workers"] = kw["workers"]
    sla = s["sla"]
    print(
        f"{label:<16} worker-s {row['worker_seconds']:>9,.0f}  SLA both {sla['both']:6.1%} "
        f"(TTFT {sla['ttft']:6.1%}, ITL {sla['itl']:6.1%})  hit {s['cache_hit_rate']:.3f}  "
        f"max workers {row['max_workers']}  errors {s['errors']}  ({row['real_s']:.0f} s real)",
        flush=True,
    )
    return row


def plot(rows: list[dict[str, Any]], path: Path, bin_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (load, workers) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    arrivals = next(r["arrivals_s"] for r in rows if "arrivals_s" in r)
    end = max(arrivals)
    bins = int(end // bin_s) + 1
    counts = [0] * bins
    for t in arrivals:
        counts[int(t // bin_s)] += 1
    load.step([i * bin_s / 60 for i in range(bins)], [c / bin_s for c in counts], where="post")
    load.set_ylabel("requests / s")
    load.set_title("daily-like swing of the conversation trace")
    styles = iter(["dotted", "dashed", "dashdot", (0, (1, 4))])
    for row in rows:
        ratio = row.get("worker_seconds_vs_baseline")
        label = row["label"] + (f" ({ratio:.2f}x worker-s)" if ratio is not None else "")
        if "timeline" in row:
            xs = [t / 60 for t, *_ in row["timeline"]]
            ys = [live + starting for _, live, starting, _ in row["timeline"]]
            workers.step(xs, ys, where="post", label=label)
        else:
            workers.hlines(row["max_workers"], 0, end / 60, colors="gray",
                           linestyles=next(styles, "dashed"), label=label)  # fmt: skip
    workers.set_xlabel("trace time (min)")
    workers.set_ylabel("workers (live + starting)")
    workers.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--floor", type=float, default=0.1, help="night rate as a share of the peak")
    p.add_argument("--arrival-speedup", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None, help="first K requests only")
    p.add_argument("--fixed", default="4,5,6", help="fixed fleet sizes to try")
    p.add_argument("--max-workers", type=int, default=8, help="the planner's pool maximum")
    p.add_argument(
        "--policies",
        default="load:8,load:12,sla",
        help="planner runs: load[:target requests per worker] or sla",
    )
    p.add_argument("--profile", type=Path, help="sla policy: a mocker profile (made if absent)")
    p.add_argument("--ttft-ms", type=float, default=2000.0)
    p.add_argument("--itl-ms", type=float, default=25.0)
    p.add_argument("--target-requests", type=float, default=8.0)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--cooldown", type=float, default=60.0)
    p.add_argument("--worker-startup", type=float, default=20.0)
    p.add_argument("--sample-interval", type=float, default=10.0)
    p.add_argument("--sla-goal", type=float, default=0.95, help="attainment a fleet must hold")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--replot", type=Path, help="only draw --plot from an earlier --json")
    args = p.parse_args()
    if args.replot is not None:
        plot(json.loads(args.replot.read_text())["runs"], args.plot, bin_s=60.0)
        return 0

    rows = [json.loads(line) for line in args.trace.read_text().splitlines() if line.strip()]
    work = Path(tempfile.mkdtemp(prefix="planner-swing-"))
    trace = work / "swing.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in retime(rows, args.floor)))
    print(f"trace {args.trace.name} re-timed to a daily swing (floor {args.floor}): {trace}")

    results: list[dict[str, Any]] = []
    for n in [int(x) for x in args.fixed.split(",") if x]:
        results.append(run(f"fixed {n}", trace, args, workers=n))
    for spec in [x for x in args.policies.split(",") if x]:
        # "load" or "load:T" (T requests per worker as the load policy's target), "sla"
        policy, _, target = spec.partition(":")
        profile = None
        if policy == "sla":
            profile = args.profile or work / "mocker-profile.json"
            if not profile.exists():
                _profile(profile)
        toml = work / f"planner-{policy}-{target or 'default'}.toml"
        toml.write_text(planner_toml(policy, float(target or args.target_requests), args, profile))
        label = f"planner ({spec})" if policy != "load" or target else f"planner ({policy})"
        results.append(run(label, trace, args, planner=toml))

    fixed = [r for r in results if "timeline" not in r]
    if not fixed:
        return _save(args, results, None)
    held = [r for r in fixed if r["sla"]["both"] >= args.sla_goal and not r["errors"]]
    baseline = (
        min(held, key=lambda r: r["worker_seconds"])
        if held
        else max(fixed, key=lambda r: r["sla"]["both"])
    )
    print(f"\nbaseline: {baseline['label']} (the smallest fixed fleet holding the SLA)")
    print(f"{'fleet':<16}{'worker-s':>10}{'x baseline':>12}{'SLA both':>10}{'TTFT p99 ms':>13}")
    for r in results:
        ratio = r["worker_seconds"] / baseline["worker_seconds"]
        r["worker_seconds_vs_baseline"] = ratio
        print(
            f"{r['label']:<16}{r['worker_seconds']:>10,.0f}{ratio:>12.2f}"
            f"{r['sla']['both']:>10.1%}{r['ttft_ms']['p99']:>13,.0f}"
        )
    return _save(args, results, baseline["label"])


def _save(args: argparse.Namespace, results: list[dict[str, Any]], baseline: str | None) -> int:
    for row in results[1:]:
        row.pop("arrivals_s", None)  # the same in every run: kept once, for the plot
    out = {
        "trace": str(args.trace),
        "floor": args.floor,
        "args": {k: str(v) for k, v in vars(args).items()},
        "baseline": baseline,
        "runs": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot, bin_s=60.0)
        print(f"plot written to {args.plot}")
    return 0


def _profile(path: Path) -> None:
    """A profile of the mocker with Dynamo's timing, as the replay runs it."""
    import subprocess

    cmd = [
        sys.executable, "-m", "dynamo_gateway.cli", "profile", "--engine", "mocker",
        "--model", str(default_model_dir()), "--out", str(path), "--block-size", "16",
        "--max-model-len", "32768", "--num-kv-blocks", "65536",
        "--isl", "256,1024,4096,8192,16384,30000",
        "--batch", "1,8,32,64", "--context", "2048,8192,16384", "--decode-tokens", "32",
        "--repeats", "1",
    ]  # fmt: skip
    print("profiling the mocker:", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    sys.exit(main())
