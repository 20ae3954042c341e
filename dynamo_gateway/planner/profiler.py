"""`dynamo-gateway profile`: measure an engine's `Profile` on this machine.

The engine runs in this process (as a worker would run it). Prefill: one
request at a time of each input length, ``max_tokens=1``, the time to its
first output (random token ids, so nothing is cached). Decode: ``batch``
requests of ``context`` prompt tokens started together; once all of them
stream, the inter-token latency is what `batch_itl` reads from their token
times. Their prompts are prefilled once beforehand (``max_tokens=1``), so the
batch finds them cached and starts decoding together: otherwise the first
requests would finish decoding while the last still prefill, and chunked
prefill steps would be measured as decode. Progress goes to `say`.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from collections.abc import Callable, Sequence

from dynamo_gateway.engines.base import Engine
from dynamo_gateway.planner.profile import DecodePoint, Profile
from dynamo_gateway.protocol.engine import EngineRequest, SamplingParams


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


def _request(tokens: list[int], max_tokens: int) -> EngineRequest:
    return EngineRequest(
        request_id=uuid.uuid4().hex,
        prompt_token_ids=tokens,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )


async def _prefill_s(engine: Engine, tokens: list[int]) -> float:
    start = time.perf_counter()
    async for out in engine.generate(_request(tokens, 1)):
        if out.error:
            raise RuntimeError(out.error)
        if out.token_ids:
            return time.perf_counter() - start
    raise RuntimeError("the engine returned no token")


async def _stamps(engine: Engine, tokens: list[int], steps: int) -> list[float]:
    stamps: list[float] = []
    async for out in engine.generate(_request(tokens, steps)):
        if out.error:
            raise RuntimeError(out.error)
        stamps.extend([time.perf_counter()] * len(out.token_ids))
    return stamps


def batch_itl(stamps: Sequence[Sequence[float]]) -> float:
    """Inter-token latency while every request of a batch decodes: the window from
    the last first token to the first last token, over the tokens each request got
    in it (median over requests); a request's own average when there is no window."""
    t0 = max(s[0] for s in stamps)
    t1 = min(s[-1] for s in stamps)
    per: list[float] = []
    for s in stamps:
        inside = [t for t in s if t0 <= t <= t1]
        if t1 > t0 and len(inside) >= 2:
            per.append((inside[-1] - inside[0]) / (len(inside) - 1))
        elif len(s) >= 2:
            per.append((s[-1] - s[0]) / (len(s) - 1))
    if not per:
        raise RuntimeError("too few tokens to measure an inter-token latency")
    return statistics.median(per)


async def measure(
    engine: Engine,
    *,
    engine_name: str,
    model: str,
    vocab_size: int,
    input_lengths: Sequence[int],
    batches: Sequence[int],
    contexts: Sequence[int],
    decode_tokens: int = 32,
    repeats: int = 3,
    say: Callable[[str], None] = lambda _: None,
) -> Profile:
    """A `Profile` of a started engine (see the module docstring)."""
    rng = random.Random(0)
    prefill: list[tuple[int, float]] = []
    for n in input_lengths:
        times = [await _prefill_s(engine, _prompt(rng, n, vocab_size)) for _ in range(repeats)]
        prefill.append((n, statistics.median(times)))
        say(f"prefill {n:>6} tokens: {1000 * prefill[-1][1]:8.2f} ms")
    decode: list[DecodePoint] = []
    for context in contexts:
        for batch in batches:
            prompts = [_prompt(rng, context, vocab_size) for _ in range(batch)]
            await asyncio.gather(*(_prefill_s(engine, p) for p in prompts))  # warm the cache
            stamps = await asyncio.gather(*(_stamps(engine, p, decode_tokens) for p in prompts))
            decode.append(DecodePoint(batch, context, batch_itl(stamps)))
            itl_ms = 1000 * decode[-1].itl_s
            say(f"decode batch {batch:>4} at context {context:>6}: ITL {itl_ms:7.2f} ms")
    return Profile(
        engine=engine_name,
        model=model,
        prefill=prefill,
        decode=decode,
        meta={"decode_tokens": str(decode_tokens), "repeats": str(repeats)},
    )
