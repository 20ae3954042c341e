"""Command-line glue for ``dynamo-gateway bench replay`` and ``bench replay-plot``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dynamo_gateway.bench.replay import (
    ReplayConfig,
    ReplayResult,
    format_replay_summary,
    plot_ttft_cdfs,
    replay,
    ttfts_from_json,
)
from dynamo_gateway.bench.trace import DEFAULT_TRACE_BLOCK_SIZE
from dynamo_gateway.errors import ConfigError

__all__ = ["configure_plot_parser", "configure_replay_parser", "main"]


def configure_replay_parser(p: argparse.ArgumentParser) -> None:
    d = ReplayConfig(trace=Path())
    p.add_argument("--trace", type=Path, required=True, help="Mooncake-format JSONL trace")
    p.add_argument("--engine", default=d.engine, help=f"engine plugin (default {d.engine})")
    p.add_argument(
        "--model", type=Path, default=None, help="model directory (default: the demo model)"
    )
    p.add_argument("--workers", type=int, default=d.workers, help="engine workers")
    p.add_argument("--router", default=d.router, help=f"routing policy (default {d.router})")
    p.add_argument(
        "--prefill-workers",
        type=int,
        default=d.prefill_workers,
        help="disaggregated fleet: prefill workers (default 0: --workers aggregated ones)",
    )
    p.add_argument(
        "--decode-workers",
        type=int,
        default=d.decode_workers,
        help="with --prefill-workers: decode workers",
    )
    p.add_argument(
        "--disagg-min-prefill-tokens",
        type=int,
        default=None,
        help="prefill on the decode worker below this many uncached tokens (0: always remote)",
    )
    p.add_argument(
        "--kv-transfer-gbps", type=float, default=None, help="mocker: simulated KV bandwidth"
    )
    p.add_argument(
        "--arrival-speedup",
        type=float,
        default=d.arrival_speedup,
        help="divide the trace's inter-arrival gaps by this (a heavier load)",
    )
    p.add_argument(
        "--speedup",
        type=float,
        default=d.speedup,
        help="run everything this many times faster than real time; results are "
        "reported in trace time",
    )
    p.add_argument(
        "--trace-block-size",
        type=int,
        default=DEFAULT_TRACE_BLOCK_SIZE,
        help=f"tokens per hash id (default {DEFAULT_TRACE_BLOCK_SIZE})",
    )
    p.add_argument("--limit", type=int, default=None, help="replay only the first K requests")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context window (default: fits the trace)"
    )
    p.add_argument("--block-size", type=int, default=None, help="engine KV block size")
    p.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV capacity per worker in blocks (default: 1M tokens, like Dynamo's mocker)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="token synthesis seed")
    p.add_argument(
        "--timing",
        choices=("dynamo", "settings"),
        default=d.timing,
        help="mocker timing: Dynamo 1.6.1's polynomials (default) or our MockerSettings",
    )
    p.add_argument(
        "--timeout", type=float, default=d.timeout_s, help="per-request limit, wall seconds"
    )
    p.add_argument(
        "--virtual-clock",
        action="store_true",
        help="run on a simulated clock: hours of trace in the CPU time they need",
    )
    p.add_argument(
        "--planner",
        type=Path,
        metavar="TOML",
        help="scale the fleet with the planner (its settings, pools and SLA targets)",
    )
    p.add_argument(
        "--worker-startup",
        type=float,
        default=d.worker_startup_s,
        help="seconds a worker the planner adds takes to start (trace time)",
    )
    p.add_argument(
        "--sample-interval",
        type=float,
        default=d.sample_interval_s,
        help="seconds between samples of the worker count",
    )
    p.add_argument("--ttft-target-ms", type=float, help="SLA: TTFT target for the attainment")
    p.add_argument("--itl-target-ms", type=float, help="SLA: mean ITL target for the attainment")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write results as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw the TTFT CDF (with any --plot-with runs)")
    p.add_argument(
        "--plot-with",
        metavar="JSON",
        action="append",
        default=[],
        help="earlier replay result to draw beside this run (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")


def configure_plot_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", type=Path, help="replay JSON result files")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--title", default="", help="plot title")


def _label(data: dict[str, Any], path: Path) -> str:
    if "label" in data:
        return str(data["label"])
    if "router" in data:
        return f"{data['router']} ({data.get('workers', '?')} workers)"
    return path.stem


def _load_results(paths: list[Path]) -> list[tuple[str, list[float]]]:
    runs = []
    for path in paths:
        data = json.loads(path.read_text())
        runs.append((_label(data, path), ttfts_from_json(data)))
    return runs


def _plot(runs: list[tuple[str, list[float]]], out: str, title: str) -> int:
    try:
        plot_ttft_cdfs(runs, out, title)
    except RuntimeError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    print(f"plot written to {out}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.bench_command == "replay-plot":
        return _plot(_load_results(args.results), args.out, args.title)
    config = ReplayConfig(
        trace=args.trace,
        model=args.model,
        engine=args.engine,
        workers=args.workers,
        router=args.router,
        prefill_workers=args.prefill_workers,
        decode_workers=args.decode_workers,
        disagg_min_prefill_tokens=args.disagg_min_prefill_tokens,
        kv_transfer_gbps=args.kv_transfer_gbps,
        arrival_speedup=args.arrival_speedup,
        speedup=args.speedup,
        trace_block_size=args.trace_block_size,
        limit=args.limit,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        seed=args.seed,
        timing=args.timing,
        timeout_s=args.timeout,
        virtual_clock=args.virtual_clock,
        planner=args.planner,
        worker_startup_s=args.worker_startup,
        sample_interval_s=args.sample_interval,
        ttft_target_ms=args.ttft_target_ms,
        itl_target_ms=args.itl_target_ms,
        progress=not args.no_progress,
    )
    try:
        config.validate()
    except ValueError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    try:
        result: ReplayResult = replay(config, uvloop=not args.no_uvloop)
    except ConfigError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    print(format_replay_summary(result), flush=True)
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_json_dict(), indent=1) + "\n")
    if args.plot:
        runs = _load_results([Path(p) for p in args.plot_with])
        runs.append((_label(result.summary, config.trace), ttfts_from_json(result.to_json_dict())))
        return _plot(runs, args.plot, config.trace.name)
    return 0
