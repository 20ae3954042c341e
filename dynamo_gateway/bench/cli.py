"""Command-line glue for ``dynamo-gateway bench`` (also ``python -m dynamo_gateway.bench.cli``).

The top-level ``dynamo-gateway`` command calls :func:`configure_parser` on its ``bench``
sub-parser and :func:`main` with the parsed namespace. Plain ``bench --url ...`` runs the
load generator; ``bench replay ...`` replays a trace against an in-process fleet
(:mod:`dynamo_gateway.bench.replay`) and ``bench replay-plot ...`` draws the TTFT CDFs
of saved replay results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path

from dynamo_gateway.bench.loadgen import BenchConfig, BenchResult, format_summary, run_bench

__all__ = ["build_parser", "config_from_args", "configure_parser", "main"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the load-generator flags to ``parser`` (a top-level parser or a sub-parser)."""
    d = BenchConfig()
    parser.add_argument(
        "--url", default=d.url, help=f"server base URL (default {d.url}); '/v1' is optional"
    )
    parser.add_argument("--model", default=d.model, help="model name sent in requests")
    parser.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight")
    parser.add_argument("--requests", type=int, default=d.requests, help="requests to measure")
    parser.add_argument(
        "--input-tokens",
        type=int,
        default=d.input_tokens,
        help="approximate prompt length (words from a common-word list, ~1 token each)",
    )
    parser.add_argument(
        "--output-tokens", type=int, default=d.output_tokens, help="max_tokens (with ignore_eos)"
    )
    parser.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=d.stream,
        help="stream responses over SSE (default: on)",
    )
    parser.add_argument("--endpoint", choices=("chat", "completions"), default=d.endpoint)
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--warmup", type=int, default=d.warmup, help="requests sent first and not measured"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="prompt word-sampling seed")
    parser.add_argument(
        "--timeout", type=float, default=d.timeout_s, help="per-request timeout in seconds"
    )
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="write results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    # Optional sub-commands: without one, the flags above run the load generator.
    sub = parser.add_subparsers(dest="bench_command", metavar="{replay,replay-plot}")
    from dynamo_gateway.bench import replay_cli

    replay_cli.configure_replay_parser(
        sub.add_parser("replay", help="replay a Mooncake trace against an in-process fleet")
    )
    replay_cli.configure_plot_parser(
        sub.add_parser("replay-plot", help="plot TTFT CDFs of saved replay JSON results")
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Build (and validate) a :class:`BenchConfig` from parsed arguments."""
    config = BenchConfig(
        url=args.url,
        model=args.model,
        concurrency=args.concurrency,
        requests=args.requests,
        input_tokens=args.input_tokens,
        output_tokens=args.output_tokens,
        stream=args.stream,
        endpoint=args.endpoint,
        api_key=args.api_key,
        warmup=args.warmup,
        seed=args.seed,
        timeout_s=args.timeout,
        # None: a bar only when stderr is a terminal.
        progress=False if args.no_progress else None,
    )
    config.validate()
    return config


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 on completion (even with request errors), 2 on bad arguments."""
    command = getattr(args, "bench_command", None)
    if command is not None:
        from dynamo_gateway.bench import replay_cli

        return replay_cli.main(args)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=_loop_factory(not args.no_uvloop)) as runner:
        result: BenchResult = runner.run(run_bench(config))
    print(format_summary(result), flush=True)
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_json_dict(), indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser (for ``python -m dynamo_gateway.bench.cli``)."""
    parser = argparse.ArgumentParser(
        prog="python -m dynamo_gateway.bench.cli",
        description="Load generator for OpenAI-compatible servers.",
    )
    configure_parser(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
