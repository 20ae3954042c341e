"""Engine throughput: the reference engine vs Hugging Face transformers (and vLLM-CPU).

Decode tokens/s on one model with the same prompts, at batch 1 (one stream) and
at B concurrent requests (default 32) x O output tokens (default 128), greedy,
EOS ignored so every request generates exactly O tokens. Each engine runs in
its own subprocess, one after another, so they never share the CPU.

    python benchmarks/engine_throughput.py --model models/demo
    python benchmarks/engine_throughput.py --model models/demo \\
        --vllm-python /path/to/venv-with-vllm-cpu/bin/python

Prints a table and writes JSON (``--json``). Tokens/s counts generated tokens
over the wall time from submitting the batch to the last token (prefill of the
short prompts included). TTFT is submit to each request's first token; ITL is
the gap between a request's successive tokens (for transformers, one batch-wide
`generate` step; for vLLM, each request's mean gap from its stats, or estimated from a
1-token run when it keeps none). Both are in milliseconds, mean/p50/p99.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wise",
    "owls",
    "watch",
    "from",
    "old",
    "oak",
    "trees",
    "near",
    "the",
    "quiet",
    "river",
    "bank",
    "under",
    "a",
    "pale",
    "morning",
    "sky",
]


def prompts(n: int, length: int) -> list[str]:
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(length)]
        out.append(f"{i} " + " ".join(words))
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    """mean, p50, p99 (linear interpolation) of values given in seconds, in ms."""
    if not values:
        return {}
    xs = sorted(v * 1000.0 for v in values)

    def pct(q: float) -> float:
        k = (len(xs) - 1) * q
        lo = int(k)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"mean": sum(xs) / len(xs), "p50": pct(0.5), "p99": pct(0.99)}


def latency(ttfts: list[float], itls: list[float]) -> dict[str, Any]:
    return {"ttft_ms": percentiles(ttfts), "itl_ms": percentiles(itls)}


def log(msg: str) -> None:
    print(f"[engine_throughput {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the runners (each executed in a subprocess: `python engine_throughput.py --run X`) --------


def run_reference(model: str, batch: int, out_tokens: int, prompt_words: int) -> dict[str, Any]:
    import asyncio

    from dynamo_gateway.engines.base import EngineContext
    from dynamo_gateway.models.card import ModelCard
    from dynamo_gateway.plugins import load_plugins
    from dynamo_gateway.preprocess import Tokenizer
    from dynamo_gateway.protocol.engine import EngineRequest, SamplingParams
    from dynamo_gateway.settings import load_settings

    settings = load_settings(
        reference={"device": "cpu", "dtype": "float32"},
        scheduler={"max_num_seqs": max(batch, 1)},
        cache={"num_kv_blocks": 4096},
    )
    card = ModelCard.load(model)
    tok = Tokenizer.from_dir(model)
    ids = [tok.encode(p) for p in prompts(batch, prompt_words)]
    factory = load_plugins(entry_points=False).registry.engines.get("reference")

    async def main() -> dict[str, Any]:
        engine = factory(EngineContext(settings, card, "bench"))
        await engine.start()
        try:
            ttfts: list[float] = []
            itls: list[float] = []

            async def one(i: int, prompt: list[int], tag: str) -> int:
                t_start = time.perf_counter()
                last: float | None = None
                req = EngineRequest(
                    request_id=f"{tag}-{i}",
                    prompt_token_ids=prompt,
                    sampling=SamplingParams(
                        max_tokens=out_tokens, temperature=0.0, ignore_eos=True
                    ),
                )
                n = 0
                async for out in engine.generate(req):
                    k = len(out.token_ids)
                    if not k:
                        continue
                    now = time.perf_counter()
                    if tag == "run":
                        if last is None:
                            ttfts.append(now - t_start)
                            itls.extend([0.0] * (k - 1))
                        else:
                            itls.extend([(now - last) / k] * k)
                    last = now
                    n += k
                return n

            await asyncio.gather(*(one(i, p, "warm") for i, p in enumerate(ids[:2])))
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(one(i, p, "run") for i, p in enumerate(ids)))
            elapsed = time.perf_counter() - t0
            return {"tokens": sum(counts), "seconds": elapsed, **latency(ttfts, itls)}
        finally:
            await engine.aclose()

    return asyncio.run(main())


def run_transformers(model: str, batch: int, out_tokens: int, prompt_words: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        """Times each `generate` step: put() gets the prompt, then each step's new tokens."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    texts = prompts(batch, prompt_words)

    def generate(items: list[str], clock: StepClock | None = None) -> int:
        enc = tok(items, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = lm.generate(
                **enc,
                max_new_tokens=out_tokens,
                min_new_tokens=out_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                streamer=clock,
            )
        return int((out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0])

    generate(texts[:2])
    clock = StepClock()
    t0 = time.perf_counter()
    n = generate(texts, clock)
    elapsed = time.perf_counter() - t0
    steps = clock.times[1:]  # times[0] is the prompt, before prefill
    # The whole batch gets each token at the same step.
    ttfts = [steps[0] - t0] * batch if steps else []
    itls = [b - a for a, b in itertools.pairwise(steps)]
    return {"tokens": n, "seconds": elapsed, **latency(ttfts, itls)}


def run_vllm(model: str, batch: int, out_tokens: int, prompt_words: int) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    # On CPU, gpu_memory_utilization is the share of RAM vLLM reserves for its KV cache.
    llm = LLM(
        model=model,
        dtype="float32",
        # Compiled (torch.compile + CUDA-graph-like capture) unless DG_VLLM_EAGER=1.
        enforce_eager=os.environ.get("DG_VLLM_EAGER") == "1",
        max_model_len=1024,
        seed=0,
        gpu_memory_utilization=0.3,
        disable_log_stats=False,  # keeps per-request timestamps (TTFT/ITL) on the outputs
    )
    params = SamplingParams(max_tokens=out_tokens, temperature=0.0, ignore_eos=True)
    texts = prompts(batch, prompt_words)
    llm.generate(texts[:2], params, use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(texts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttfts: list[float] = []
    itls: list[float] = []
    for o in outs:  # per-request stats (vLLM v1 RequestStateStats)
        m = getattr(o, "metrics", None)
        n = len(o.outputs[0].token_ids)
        ttft = getattr(m, "first_token_latency", 0.0)
        first, last = getattr(m, "first_token_ts", 0.0), getattr(m, "last_token_ts", 0.0)
        if ttft and first and last and n > 1:
            ttfts.append(ttft)
            itls.extend([(last - first) / (n - 1)] * (n - 1))
    result = {"tokens": tokens, "seconds": elapsed}
    if len(ttfts) == len(outs):
        return {**result, **latency(ttfts, itls)}
    # No timestamps: TTFT from the same batch at 1 output token, ITL from the rest.
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    t1 = time.perf_counter()
    llm.generate(texts, one, use_tqdm=False)
    ttft = time.perf_counter() - t1
    per = max(elapsed - ttft, 0.0) / max(out_tokens - 1, 1)
    est = latency([ttft] * batch, [per] * (batch * max(out_tokens - 1, 1)))
    return {**result, **est, "latency_estimated": True}


MARKER = "ENGINE_THROUGHPUT_RESULT "
RUNNERS = {"reference": run_reference, "transformers": run_transformers, "vllm": run_vllm}


def measure(
    python: str, engine: str, model: str, batch: int, out_tokens: int, prompt_words: int
) -> dict[str, Any]:
    cmd = [
        python, __file__, "--run", engine, "--model", model, "--batch", str(batch),
        "--output-tokens", str(out_tokens), "--prompt-words", str(prompt_words),
    ]  # fmt: skip
    log(f"{engine}: batch {batch} x {out_tokens} tokens")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        log(f"{engine} failed: {' | '.join(tail)}")
        return {"error": "\n".join(tail)}
    # Engines print their own logs too: the result is the line after our marker.
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(MARKER))
    result: dict[str, Any] = json.loads(line[len(MARKER) :])
    result["tok_per_s"] = result["tokens"] / result["seconds"]
    t, i = result.get("ttft_ms", {}), result.get("itl_ms", {})
    lat = f", TTFT p50 {t['p50']:,.0f} ms, ITL p50 {i['p50']:.1f} ms" if t and i else ""
    log(f"{engine}: {result['tok_per_s']:,.0f} tok/s{lat}")
    return result


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True)
    p.add_argument("--batches", default="1,32", help="comma list of concurrent requests")
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--engines", default="reference,transformers")
    p.add_argument("--vllm-python", help="python of a venv with vllm-cpu; adds the vllm column")
    p.add_argument(
        "--vllm-eager", action="store_true", help="run vLLM with enforce_eager (no torch.compile)"
    )
    p.add_argument("--json", default="benchmarks/results/engine_throughput.json")
    p.add_argument("--run", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.run:  # a subprocess measuring one engine
        if args.run != "vllm":
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
        result = RUNNERS[args.run](
            str(Path(args.model).resolve()), args.batch, args.output_tokens, args.prompt_words
        )
        print(MARKER + json.dumps(result), flush=True)
        return 0

    if args.vllm_eager:
        os.environ["DG_VLLM_EAGER"] = "1"  # read by the vllm subprocess
    engines = [e for e in args.engines.split(",") if e]
    if args.vllm_python and "vllm" not in engines:
        engines.append("vllm")
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, dict[str, Any]] = {}
    for engine in engines:
        python = args.vllm_python if engine == "vllm" else sys.executable
        for b in batches:
            results.setdefault(engine, {})[str(b)] = measure(
                python, engine, args.model, b, args.output_tokens, args.prompt_words
            )

    header = "| engine | " + " | ".join(f"batch {b} tok/s" for b in batches) + " |"
    lines = [header, "|---|" + "---:|" * len(batches)]
    for engine in engines:
        cells = []
        for b in batches:
            r = results[engine][str(b)]
            cells.append(f"{r['tok_per_s']:,.0f}" if "tok_per_s" in r else "failed")
        lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    ref = results.get("reference", {})
    for other in engines:
        if other == "reference":
            continue
        cells = []
        for b in batches:
            a, o = ref.get(str(b), {}), results[other][str(b)]
            ok = "tok_per_s" in a and "tok_per_s" in o
            cells.append(f"{a['tok_per_s'] / o['tok_per_s']:.2f}x" if ok else "-")
        lines.append(f"| reference / {other} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    head = " | ".join(f"batch {b} TTFT / ITL ms (p50)" for b in batches)
    lat = [f"| engine | {head} |", "|---|" + "---:|" * len(batches)]
    for engine in engines:
        cells = []
        for b in batches:
            r = results[engine][str(b)]
            t, i = r.get("ttft_ms", {}), r.get("itl_ms", {})
            star = "*" if r.get("latency_estimated") else ""
            ok = "p50" in t and "p50" in i
            cells.append(f"{t['p50']:,.0f} / {i['p50']:.1f}{star}" if ok else "-")
        lat.append(f"| {engine} | " + " | ".join(cells) + " |")
    latency_table = "\n".join(lat)
    print(latency_table)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "config": {
                    "model": args.model,
                    "batches": batches,
                    "output_tokens": args.output_tokens,
                    "prompt_words": args.prompt_words,
                },
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "vllm_mode": "eager" if args.vllm_eager else "compiled",
                "results": results,
                "table_markdown": table,
                "latency_table_markdown": latency_table,
            },
            indent=2,
        )
    )
    log(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
