"""The sglang plugin on a real GPU: one prepared check, PASS/FAIL per step, and JSON.

Usage (a machine with an NVIDIA GPU, SGLang installed next to dynamo-gateway and
this plugin; MODEL_DIR a small HF model directory, e.g. SmolLM2-135M-Instruct)::

    python plugins/sglang/gpu_check.py MODEL_DIR [--out gpu_check_sglang.json]
        [--transfer-backend mooncake|nixl] [--server-arg KEY=JSON ...]

Checks: the engine starts through the plugin; greedy generation is repeatable;
streaming yields several deltas that add up; abort ends a long request with
``abort``; load is reported; KV events arrive re-keyed by our hashes; and, with two
GPUs, prefill (GPU 1, a child process: SGLang allows one engine per process) and
decode (GPU 0) through our two legs give the aggregated greedy tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

PROMPT = list(range(1000, 1000 + 64))  # four blocks of 16 tokens
RESULTS: list[dict[str, Any]] = []


def _record(name: str, ok: bool, detail: object = "") -> bool:
    RESULTS.append({"check": name, "ok": ok, "detail": str(detail)})
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    return ok


def _context(model: Path, server_args: dict[str, Any], role: str, sink: Any = None) -> Any:
    from dynamo_gateway.engines.base import EngineContext
    from dynamo_gateway.models.card import ModelCard
    from dynamo_gateway.protocol.engine import WorkerRole
    from dynamo_gateway.settings import load_settings

    settings = load_settings(plugin_config={"sglang": {"server_args": server_args}})
    return EngineContext(
        settings=settings,
        model=ModelCard.load(model),
        worker_id=f"gpu-check-{role}",
        role=WorkerRole(role),
        publish_kv_event=sink,
    )


def _engine(context: Any) -> Any:
    from dynamo_gateway.plugins import load_plugins

    return load_plugins(only=["sglang"]).registry.engines.get("sglang")(context)


def _request(rid: str, max_tokens: int, **sampling: Any) -> Any:
    from dynamo_gateway.protocol.engine import EngineRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling)
    return EngineRequest(request_id=rid, prompt_token_ids=PROMPT, sampling=params)


async def _collect(engine: Any, request: Any) -> list[Any]:
    return [out async for out in engine.generate(request)]


async def _aggregated(model: Path, server_args: dict[str, Any]) -> list[int] | None:
    from dynamo_gateway.kv.hashing import sequence_hashes
    from dynamo_gateway.protocol.engine import FinishReason
    from dynamo_gateway.protocol.kv_events import BlockStored

    events: list[Any] = []
    engine = _engine(_context(model, server_args, "aggregated", events.append))
    t0 = time.monotonic()
    try:
        await engine.start()
    except Exception as exc:
        _record("start", False, repr(exc))
        return None
    _record("start", True, f"{time.monotonic() - t0:.1f}s, block_size={engine.block_size}")
    greedy: list[int] | None = None
    try:
        a = await _collect(engine, _request("greedy-1", 16))
        b = await _collect(engine, _request("greedy-2", 16))
        greedy = [t for o in a for t in o.token_ids]
        again = [t for o in b for t in o.token_ids]
        _record(
            "greedy",
            greedy == again and len(greedy) > 0 and a[-1].finish_reason is not None,
            f"{greedy} {a[-1].finish_reason}",
        )
        _record("cached_tokens", (b[0].cached_tokens or 0) > 0, f"second run: {b[0].cached_tokens}")
        _record("streaming", len(a) > 1, f"{len(a)} deltas")
        lp = await _collect(engine, _request("logprobs", 4, logprobs=2))
        got = [x for o in lp for x in o.logprobs or []]
        _record("logprobs", len(got) == sum(len(o.token_ids) for o in lp), got[:1])

        stream = engine.generate(_request("abort-1", 2000, ignore_eos=True))
        await stream.__anext__()
        await engine.abort("abort-1")
        last = None
        async with asyncio.timeout(30):
            async for out in stream:
                last = out
        _record("abort", last is not None and last.finish_reason is FinishReason.ABORT, last)

        load = engine.load()
        _record("load", load.kv_blocks_total > 0, load)

        await asyncio.sleep(1.0)  # the publisher thread and our subscriber
        stored = [e.data for e in events if isinstance(e.data, BlockStored)]
        ours = set(sequence_hashes(PROMPT, engine.block_size))
        named = {h for s in stored for h in s.block_hashes}
        _record("kv_events", ours <= named, f"{len(events)} events, prompt blocks {len(ours)}")
    except Exception:
        _record("aggregated", False, traceback.format_exc())
    finally:
        await engine.aclose()
    return greedy


def _prefill_child(model: str, server_args: dict[str, Any], inbox: Any, outbox: Any) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = "1"

    async def main() -> None:
        import msgspec

        from dynamo_gateway.disagg.params import prefill_leg
        from dynamo_gateway.protocol.engine import EngineRequest

        engine = _engine(_context(Path(model), server_args, "prefill"))
        await engine.start()
        outbox.put("ready")
        loop = asyncio.get_running_loop()
        while (raw := await loop.run_in_executor(None, inbox.get)) != "stop":
            request = msgspec.msgpack.decode(raw, type=EngineRequest)
            outs = await _collect(engine, prefill_leg(request))
            outbox.put(outs[-1].kv_transfer_params)
        await engine.aclose()

    asyncio.run(main())


async def _disaggregated(model: Path, server_args: dict[str, Any], greedy: list[int]) -> None:
    import msgspec

    from dynamo_gateway.disagg.params import decode_leg

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_prefill_child, args=(str(model), server_args, inbox, outbox))
    child.start()
    decode = None
    try:
        ready = await asyncio.to_thread(outbox.get, True, 900)
        _record("pd_prefill_start", ready == "ready", ready)
        decode = _engine(_context(model, server_args, "decode"))
        await decode.start()
        request = _request("pd-1", 16)
        inbox.put(msgspec.msgpack.encode(request))
        params = await asyncio.to_thread(outbox.get, True, 60)
        _record("pd_handoff", bool(params and "bootstrap_room" in params), params)
        async with asyncio.timeout(120):
            outs = await _collect(decode, decode_leg(request, [], params))
        tokens = [t for o in outs for t in o.token_ids]
        _record("pd_tokens", tokens == greedy, f"{tokens} vs aggregated {greedy}")
    except Exception:
        _record("pd", False, traceback.format_exc())
    finally:
        inbox.put("stop")
        if decode is not None:
            await decode.aclose()
        child.join(60)
        if child.is_alive():
            child.kill()


async def _main(args: argparse.Namespace) -> int:
    import torch

    model = Path(args.model)
    server_args: dict[str, Any] = {"mem_fraction_static": 0.5}
    for item in args.server_arg:
        key, _, value = item.partition("=")
        server_args[key] = json.loads(value)
    gpus = torch.cuda.device_count()
    _record("cuda", gpus > 0, f"{gpus} GPU(s)")
    greedy = await _aggregated(model, server_args)
    if gpus >= 2 and greedy:
        pd_args = {**server_args, "disaggregation_transfer_backend": args.transfer_backend}
        await _disaggregated(model, pd_args, greedy)
    else:
        print("SKIP pd (needs 2 GPUs and a passing aggregated run)", flush=True)
    import sglang

    report = {"sglang": getattr(sglang, "__version__", "?"), "gpus": gpus, "results": RESULTS}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}", flush=True)
    return 0 if all(r["ok"] for r in RESULTS) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a HF model directory")
    parser.add_argument("--out", default="gpu_check_sglang.json")
    parser.add_argument("--transfer-backend", default="mooncake")
    parser.add_argument("--server-arg", action="append", default=[], metavar="KEY=JSON")
    sys.exit(asyncio.run(_main(parser.parse_args())))
