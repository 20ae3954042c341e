"""The trtllm plugin on a real GPU: one script, PASS/FAIL per check, JSON out.

Needs an NVIDIA GPU, tensorrt_llm and this plugin installed, and a small Hugging
Face model directory (e.g. SmolLM2-135M-Instruct or Qwen2.5-0.5B)::

    python plugins/trtllm/gpu_check.py --model /models/SmolLM2-135M-Instruct \\
        --out trtllm_gpu_check.json

Checks, each through our plugin's engine (built by the registered factory):
greedy generate, streaming deltas (several outputs, each a delta), abort,
KV events (stored blocks re-keyed by our hashes), stats/load, and
disaggregated context_only -> generation_only equal to aggregated. Exit status 0
when every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any


async def _run(model: Path, max_tokens: int) -> dict[str, Any]:
    import tensorrt_llm

    from dynamo_gateway.disagg.params import decode_leg, prefill_leg
    from dynamo_gateway.engines.base import EngineContext
    from dynamo_gateway.kv.hashing import sequence_hashes
    from dynamo_gateway.models.card import ModelCard
    from dynamo_gateway.plugins import load_plugins
    from dynamo_gateway.protocol.engine import (
        EngineRequest,
        FinishReason,
        SamplingParams,
        WorkerRole,
    )
    from dynamo_gateway.protocol.kv_events import BlockStored, KvEvent
    from dynamo_gateway.settings import load_settings

    results: dict[str, Any] = {"tensorrt_llm": getattr(tensorrt_llm, "__version__", "?")}
    checks: dict[str, dict[str, Any]] = {}
    results["checks"] = checks

    def record(name: str, ok: bool, **detail: Any) -> None:
        checks[name] = {"pass": bool(ok), **detail}
        print(f"{'PASS' if ok else 'FAIL'} {name} {json.dumps(detail, default=str)[:300]}")

    factory = load_plugins(only=["trtllm"]).registry.engines.get("trtllm")
    card = ModelCard.load(model, max_model_len=2048)
    block = 16
    settings = load_settings(
        cache={"block_size": block},
        plugin_config={"trtllm": {"free_gpu_memory_fraction": 0.25}},
    )
    events: list[KvEvent] = []
    prompt = [(i * 37) % 500 + 10 for i in range(4 * block + 3)]

    def request(rid: str, n: int = max_tokens) -> EngineRequest:
        return EngineRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
        )

    async def collect(engine: Any, req: EngineRequest) -> tuple[list[int], list[Any]]:
        outs = [o async for o in engine.generate(req)]
        return [t for o in outs for t in o.token_ids], outs

    agg = factory(
        EngineContext(
            settings=settings, model=card, worker_id="agg", publish_kv_event=events.append
        )
    )
    t0 = time.monotonic()
    async with agg:
        results["start_s"] = round(time.monotonic() - t0, 1)
        tokens, outs = await collect(agg, request("greedy"))
        again, _ = await collect(agg, request("greedy-2"))
        record(
            "greedy_generate",
            len(tokens) == max_tokens
            and tokens == again
            and outs[-1].finish_reason is FinishReason.LENGTH,
            tokens=tokens,
            finish=str(outs[-1].finish_reason),
        )
        record(
            "streaming_deltas",
            len(outs) > 1 and all(len(o.token_ids) <= 4 for o in outs),
            outputs=len(outs),
            sizes=[len(o.token_ids) for o in outs],
            cached_tokens=outs[0].cached_tokens,
        )
        stream = agg.generate(request("abort", 1000))
        await stream.__anext__()
        await agg.abort("abort")
        rest = [o async for o in stream]
        record(
            "abort",
            bool(rest) and rest[-1].finish_reason is FinishReason.ABORT,
            finish=str(rest[-1].finish_reason) if rest else None,
            tokens_after=sum(len(o.token_ids) for o in rest),
        )
        for _ in range(50):
            if events and agg.load().kv_blocks_total:
                break
            await asyncio.sleep(0.2)
        ours = sequence_hashes(prompt, block)
        stored = {h for e in events if isinstance(e.data, BlockStored) for h in e.data.block_hashes}
        record(
            "kv_events",
            set(ours) <= stored,
            events=len(events),
            prompt_blocks=len(ours),
            found=len(set(ours) & stored),
            stats=vars(agg.translator.stats),
        )
        load = agg.load()
        record("stats_load", load.kv_blocks_total > 0, load=str(load))
        aggregated = tokens

    prefill = factory(
        EngineContext(settings=settings, model=card, worker_id="p0", role=WorkerRole.PREFILL)
    )
    decode = factory(
        EngineContext(settings=settings, model=card, worker_id="d0", role=WorkerRole.DECODE)
    )
    async with prefill, decode:
        req = request("disagg")
        first, outs = await collect(prefill, prefill_leg(req))
        params = outs[-1].kv_transfer_params
        rest, _ = await collect(decode, decode_leg(req, first, params)) if params else ([], [])
        record(
            "disaggregated_equals_aggregated",
            params is not None and first + rest == aggregated,
            first=first,
            rest=rest,
            aggregated=aggregated,
            params=params,
        )
    results["passed"] = all(c["pass"] for c in checks.values())
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="a small HF model directory")
    ap.add_argument("--out", type=Path, default=Path("trtllm_gpu_check.json"))
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    try:
        results = asyncio.run(_run(args.model, args.max_tokens))
    except Exception as exc:
        traceback.print_exc()
        results = {"passed": False, "error": repr(exc)}
        print(f"FAIL setup {exc!r}")
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"{'PASS' if results.get('passed') else 'FAIL'} all -> {args.out}")
    return 0 if results.get("passed") else 1


if __name__ == "__main__":  # TensorRT-LLM spawns processes
    sys.exit(main())
