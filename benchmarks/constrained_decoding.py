"""Constrained decoding overhead: the reference engine with and without a JSON schema.

Decode tokens/s of B concurrent greedy requests x O output tokens (default B = 1 and
32, O = 128), once free and once under a JSON-schema constraint, on the same engine,
one mode after the other (they never share the CPU). Every request runs to exactly O
tokens in both modes, so that the two differ only in the grammar's work per token:
the free ones ignore EOS, and the schema's first field is a summary of at least
`MIN_CHARS` characters, so the grammar masks every step and is never complete before
O tokens. The grammar is compiled before the clock starts (a warm-up request); the
cost of the first constrained request (xgrammar's import, the vocabulary, the
compilation) is reported on its own.

    python benchmarks/constrained_decoding.py                      # the demo model
    python benchmarks/constrained_decoding.py --model models/smollm2-135m-instruct

Prints a table and writes JSON (``--json``). Tokens/s counts generated tokens over the
wall time from submitting the batch to the last token (prefill of the short prompts
included); "slowdown" is 1 - constrained / free. Each cell is the best of
``--repeats`` runs: the CPU may be shared with other work, which only ever makes a run
slower. ``--grammar-aside`` forces where the reference engine fills grammar bitmasks
(``always``: on a second thread during the forward pass; ``never``: in the sampler;
``auto``: the engine's own choice, see `GRAMMAR_ASIDE`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIN_CHARS = 4000
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "minLength": MIN_CHARS},
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "author": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "verified": {"type": "boolean"}},
            "required": ["name", "verified"],
        },
    },
    "required": ["summary", "sentiment", "score", "tags", "author"],
}


def log(msg: str) -> None:
    print(f"[constrained_decoding {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def measure(model: Path, batches: list[int], out_tokens: int, repeats: int) -> dict[str, Any]:
    from dynamo_gateway.engines.base import EngineContext
    from dynamo_gateway.engines.reference.engine import ReferenceEngine
    from dynamo_gateway.models.card import ModelCard
    from dynamo_gateway.preprocess.tokenizer import Tokenizer
    from dynamo_gateway.protocol.engine import Constraint, EngineRequest, SamplingParams
    from dynamo_gateway.settings import load_settings

    card = ModelCard.load(model)
    tok = Tokenizer.from_dir(model)
    settings = load_settings(
        None,
        reference={"device": "cpu", "dtype": "float32"},
        scheduler={"max_num_seqs": max(batches)},
        cache={"num_kv_blocks": 4096},
    )
    engine = ReferenceEngine(EngineContext(settings=settings, model=card, worker_id="bench"))
    await engine.start()
    constraint = Constraint(kind="json_schema", spec=json.dumps(SCHEMA))

    def requests(tag: str, n: int, constrained: bool) -> list[EngineRequest]:
        sampling = SamplingParams(
            max_tokens=out_tokens,
            temperature=0.0,
            ignore_eos=True,
            constraint=constraint if constrained else None,
        )
        return [
            EngineRequest(
                request_id=f"{tag}-{i}",
                prompt_token_ids=tok.encode(f"Review {i}: the product arrived late."),
                sampling=sampling,
            )
            for i in range(n)
        ]

    async def run(reqs: list[EngineRequest]) -> tuple[int, float]:
        async def one(req: EngineRequest) -> int:
            n = 0
            async for out in engine.generate(req):
                n += len(out.token_ids)
                if out.finish_reason is not None:
                    assert out.finish_reason.value == "length", out
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(r) for r in reqs))
        return sum(counts), time.perf_counter() - t0

    try:
        t0 = time.perf_counter()
        await run(requests("warm", 1, True))  # loads xgrammar, builds the vocabulary, compiles
        first = time.perf_counter() - t0
        await run(requests("warm-free", 2, False))
        results: dict[str, Any] = {"first_constrained_request_s": first}
        for b in batches:
            row: dict[str, Any] = {}
            for mode in ("free", "constrained"):
                best = 0.0
                for r in range(repeats):
                    tokens, seconds = await run(requests(f"{mode}{b}.{r}", b, mode != "free"))
                    assert tokens == b * out_tokens, tokens
                    best = max(best, tokens / seconds)
                row[mode] = {"tok_per_s": best}
                log(f"batch {b} {mode}: {best:,.0f} tok/s (best of {repeats})")
            row["slowdown"] = 1 - row["constrained"]["tok_per_s"] / row["free"]["tok_per_s"]
            results[str(b)] = row
        return results
    finally:
        await engine.aclose()


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="model directory (default: the demo model, built in a temp dir)")
    p.add_argument("--batches", default="1,32", help="comma list of concurrent requests")
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="runs per cell; the best one counts")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--grammar-aside", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--json", default="benchmarks/results/constrained_decoding.json")
    args = p.parse_args()

    import torch

    from dynamo_gateway.engines.reference import engine as reference_engine

    torch.set_num_threads(args.threads)
    if args.grammar_aside != "auto":
        reference_engine.GRAMMAR_ASIDE = args.grammar_aside == "always"
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = Path(args.model).resolve()
        else:
            from dynamo_gateway.models.demo import build_demo_model

            model = Path(tmp) / "demo"
            build_demo_model(model)
        results = asyncio.run(measure(model, batches, args.output_tokens, args.repeats))

    lines = ["| batch | free tok/s | JSON-schema tok/s | slowdown |", "|---:|---:|---:|---:|"]
    for b in batches:
        row = results[str(b)]
        lines.append(
            f"| {b} | {row['free']['tok_per_s']:,.0f} | {row['constrained']['tok_per_s']:,.0f} "
            f"| {row['slowdown']:.1%} |"
        )
    print("\n".join(lines))
    print(f"first constrained request (xgrammar import, vocabulary, compile): "
          f"{results['first_constrained_request_s']:.2f} s")  # fmt: skip
    report = {
        "model": args.model or "demo",
        "output_tokens": args.output_tokens,
        "threads": args.threads,
        "grammar_aside": args.grammar_aside,
        "platform": platform.platform(),
        "schema": SCHEMA,
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
